"""Per-example gradients: the exact loss gradients g_i and the batch-gradient contributions c_i.

Two different quantities (see science.md, "Definitions"):

- `per_example_loss_grads`: g_i = d ell_i / d theta through the forward pass *as run on the
  whole batch*. With BatchNorm/BatchRenorm in train mode ell_i depends on every example through
  the batch statistics, and g_i includes those paths. sum_i g_i = d (sum_i ell_i) / d theta.
- `per_example_contributions`: c_i, the share of the batch gradient that flows through example
  i's activations at each layer (layer hooks, one backward). sum_i c_i = the batch gradient of
  `loss_fn` as given (mean-reduced: sum_i c_i = (1/B) sum_i g_i).

Without batch coupling (no norm, LayerNorm, GroupNorm, InstanceNorm, BN in eval mode) the two
coincide up to the reduction factor: c_i = g_i / B for a mean-reduced loss, c_i = g_i for a sum.
With BN in train mode they differ completely. Every result carries `.quantity` saying which,
and `.method` saying how it was computed (with `.reason` when "auto" could not use vmap).
Both take one batch: `probe(model, loss_fn, (x, y), *, ...)`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from normlab.nn.coupling import batch_coupling
from normlab.probes._calling import convention, one_batch, per_example_losses
from normlab.probes._contributions import contributions
from normlab.probes._hygiene import preserved
from normlab.probes._modes import norm_mode, probe_mode
from normlab.probes._modules import hooks_removed, param_layers, select_params
from normlab.probes._results import RecordsMixin, all_finite, rounding_slack
from normlab.probes._stateless import Stateless, leaves
from normlab.train.graphed import cudnn_autotuned, hooks_refusal, on_side_stream
from normlab.utils.config import ConfigError, check_choice, check_interval
from normlab.utils.silence import silenced

METHODS = ("auto", "vjp", "vmap")
LOSS_GRADS = "per_example_loss_grads"
CONTRIBUTIONS = "per_example_contributions"


class PerExampleGradients(dict, RecordsMixin):
    """Parameter name -> tensor of shape (B, *param.shape), with what it is.

    `quantity`: "per_example_loss_grads" or "per_example_contributions"; `bn_mode`: "train"
    (batch statistics) or "eval"; `mode`: the probe mode asked for; `layers`: parameter name ->
    (module name, depth or None); `method`: how it was computed ("vmap", "vjp",
    "layer_hooks"); `reason`: why "auto" did not use vmap (None if it did or was not asked);
    `finite`: False when the input, a loss or a gradient was not finite; `left_out`: parameter
    name -> why it has no rows (contributions only).
    `records()`: one row per parameter and example with the gradient's norm.
    """

    def __init__(self, grads: dict[str, torch.Tensor], *, quantity: str, bn_mode: str,
                 layers: dict[str, tuple[str, int | None]], method: str, mode: str = "keep",
                 reason: str | None = None, finite: bool = True,
                 left_out: dict[str, str] | None = None) -> None:
        super().__init__(grads)
        self.quantity = quantity
        self.bn_mode = bn_mode
        self.layers = layers
        self.method = method
        self.mode = mode
        self.reason = reason
        self.finite = finite
        self.left_out = dict(left_out or {})

    def records(self) -> list[dict[str, Any]]:
        rows = []
        for name, g in self.items():
            layer, depth = self.layers.get(name, (None, None))
            norms = g.reshape(g.shape[0], -1).double().norm(dim=1).tolist()
            rows += [{"parameter": name, "layer": layer, "depth": depth, "example": i,
                      "quantity": "grad_norm", "value": v, "gradient": self.quantity,
                      "bn_mode": self.bn_mode, "mode": self.mode, "method": self.method,
                      **({} if self.finite else {"finite": False})}
                     for i, v in enumerate(norms)]
        return rows


def _vmap_obstacle(model: nn.Module, coupled: bool | None) -> str | None:
    """Why vmap cannot run this model's forward faithfully, known before trying (None: try)."""
    if coupled:
        return ("batch coupling: the output of one example depends on the others (BatchNorm/"
                "BatchRenorm using batch statistics, or a layer of your own)")
    if coupled is None:
        return "whether the model couples the examples cannot be tested (integer input)"
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            return f"Dropout in train mode ({name or 'model'}): random masks"
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks \
                or m._backward_pre_hooks:
            return f"user hooks on {name or 'the model'} (they would see batched tensors)"
    from torch.nn.modules import module as module_globals

    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks \
            or module_globals._global_backward_hooks:
        return "global module hooks"
    return None


@convention(old_positional=("params", "chunk_size", "max_memory", "method"))
def per_example_loss_grads(model: nn.Module, loss_fn, data, *,
                           params: Iterable[str] | None = None, chunk_size: int | None = None,
                           max_memory: float | None = None, method: str = "auto",
                           mode: str = "keep") -> PerExampleGradients:
    """Exact g_i = d ell_i / d theta on one batch `data` = (x, y) in `mode` ("keep": the model's
    own modes; "train"/"eval", see `probes._modes`); cost ~B backward passes with batch coupling
    (BN/BatchRenorm in train mode), ~1-2 backward passes without.

    ell_i is the per-example loss (see `probes._calling`), so for a mean-reduced loss the batch
    gradient is (1/B) sum_i g_i; that holds under BN too. Running statistics are not updated,
    parameters are never written; `params` may name frozen parameters.

    method: "vjp" runs the batch forward once and takes batched vector-Jacobian products over
    one-hot cotangents in chunks of `chunk_size` rows (exact for any model); "vmap" vectorizes
    d ell(f(x_i)) / d theta over examples with torch.func (correct only without batch coupling:
    it runs each example alone); "auto" uses vmap when nothing known stands in its way (batch
    coupling, Dropout in train mode, user hooks), checks that the per-example losses under vmap
    equal those of the batch forward (a batch-coupled layer of the user's own makes them
    differ), and otherwise, or if vmap fails, uses "vjp"; `.method` and `.reason` record it.
    `chunk_size` bounds the rows (vjp) or examples (vmap) processed at once; `max_memory`
    (bytes, vjp only) sets the chunk from an estimate of its working memory. By default "vjp"
    takes one row at a time, on CUDA replayed from a CUDA graph and checked against the batch
    gradient (see `_captured_rows`). The result itself always takes B x P numbers.
    """
    x, y = one_batch(data, "per_example_loss_grads")
    check_choice("method", method, METHODS)
    if chunk_size is not None:
        check_interval("chunk_size", chunk_size, 1, kind=int, low_open=False)
    if max_memory is not None:
        check_interval("max_memory", max_memory, 0)
    with preserved(model), probe_mode(model, mode, x):
        selected = select_params(model, params)
        forward = Stateless(model)
        coupled = batch_coupling(model, x) if method != "vjp" else None
        reason = _vmap_obstacle(model, coupled) if method == "auto" else None
        if method == "vmap" and coupled:
            raise ConfigError("The 'method' setting 'vmap' runs each example alone, which is a "
                              "different function for a batch-coupled model (BatchNorm or "
                              "BatchRenorm in train mode, or a layer of your own whose output "
                              "for one example depends on the others); use 'vjp' or 'auto'.")
        grads = None
        if method == "vmap" or (method == "auto" and reason is None):
            try:
                grads = _vmap_grads(forward, loss_fn, x, y, selected, chunk_size)
            except _VmapMismatch as err:
                if method == "vmap":
                    raise ConfigError(f"The 'method' setting 'vmap' gives a different function "
                                      f"for this model: {err}; use 'vjp' or 'auto'.") from err
                reason = str(err)
            except Exception as err:  # any vmap failure: fall back to the VJP
                if method == "vmap":
                    raise
                reason = f"vmap failed: {type(err).__name__}: {str(err).splitlines()[0]}"
        if grads is None:
            grads = _vjp_grads(forward, loss_fn, x, y, selected, chunk_size, max_memory)
            used = "vjp"
        else:
            used, reason = "vmap", None
        finite = all_finite([x]) and all_finite(grads.values())
        return PerExampleGradients(grads, quantity=LOSS_GRADS, bn_mode=norm_mode(model, mode, x),
                                   layers={k: param_layers(model)[k] for k in grads},
                                   method=used, mode=mode, reason=reason, finite=finite)


def _vjp_grads(forward, loss_fn, x, y, selected, chunk_size, max_memory):
    outputs_numel = [0]

    def count(_module, _inputs, output):
        if isinstance(output, torch.Tensor):
            outputs_numel[0] += output.numel()

    model = forward.model
    leaf_modules = [m for m in model.modules() if not list(m.children())]
    names = list(selected)
    tensors = list(leaves(selected).values())

    def losses_of_batch() -> torch.Tensor:  # (B,)
        return per_example_losses(loss_fn, forward(x, dict(zip(names, tensors, strict=True))), y)

    with hooks_removed([m.register_forward_hook(count) for m in leaf_modules]):
        losses = losses_of_batch()
    batch = losses.shape[0]
    if chunk_size is None:
        chunk_size = _default_chunk(batch, x, tensors, outputs_numel[0], max_memory)
    if chunk_size == 1:
        rows = None
        if x.device.type == "cuda":
            rows = _captured_rows(losses_of_batch, tensors, losses, (model, loss_fn))
        if rows is None:
            rows = _rows_one_at_a_time(losses, tensors, lambda step: step())
        return dict(zip(names, rows, strict=True))
    eye = torch.eye(batch, dtype=losses.dtype, device=losses.device)
    parts: list[list[torch.Tensor]] = [[] for _ in names]
    for start in range(0, batch, chunk_size):
        cotangents = eye[start:start + chunk_size]
        with silenced(_HOOK_WARNING):
            got = torch.autograd.grad(losses, tensors, cotangents, retain_graph=True,
                                      is_grads_batched=True, allow_unused=True)
        for i, (g, p) in enumerate(zip(got, tensors, strict=True)):
            parts[i].append(torch.zeros(cotangents.shape[0], *p.shape, dtype=p.dtype,
                                        device=p.device) if g is None else g.detach())
    return {n: torch.cat(chunks) for n, chunks in zip(names, parts, strict=True)}


# torch's UserWarning raised on every backward through a user's full backward hook on a module
# whose input needs no gradient (the first layer: its input is the data). The hook runs as
# before; only the per-example backwards' repetition of the warning (B per call) is dropped.
_HOOK_WARNING = ("Full backward hook is firing when gradients are computed with respect to "
                 "module outputs since no inputs require gradients")


def _rows_one_at_a_time(losses: torch.Tensor, tensors: list[torch.Tensor],
                        run: Callable[[Callable[[], Any]], Any]) -> list[torch.Tensor]:
    """g_i = d losses[i] / d tensors for every i, one backward per row with the one-hot
    cotangent in a static buffer; `run(step)` runs the backward `step` (eagerly, or by replaying
    its CUDA graph) and returns its gradients."""
    cotangent = torch.zeros_like(losses)

    def step() -> tuple[torch.Tensor | None, ...]:
        with silenced(_HOOK_WARNING):
            return torch.autograd.grad(losses, tensors, cotangent, retain_graph=True,
                                       allow_unused=True)

    out = [torch.zeros(len(losses), *p.shape, dtype=p.dtype, device=p.device) for p in tensors]
    for i in range(len(losses)):
        cotangent.zero_()
        cotangent[i] = 1.0
        for rows, g in zip(out, run(step), strict=True):
            if g is not None:
                rows[i].copy_(g)
    return out


def _captured_rows(losses_of_batch: Callable[[], torch.Tensor], tensors: list[torch.Tensor],
                   eager_losses: torch.Tensor, modules: tuple[object, ...]
                   ) -> list[torch.Tensor] | None:
    """`_rows_one_at_a_time` on CUDA with the forward recorded in one CUDA graph and the
    one-row backward in another (sharing its memory pool; retain_graph, so the saved
    activations outlive every replay), replayed once per row: a backward at B = 128 is
    launch-bound eagerly on a GPU. Checked at run time against eager backwards
    (`_rows_disagree`: the first, middle and last rows and the sum of all of them, within
    `rounding_slack`; probes run without TF32, so only float rounding separates the two); None
    (with a RuntimeWarning) when `modules` carry user hooks (they would run only while the graph
    is recorded), CUDA refuses the capture or the check fails, and the caller takes the eager
    path."""
    refusal = hooks_refusal(*modules)
    if refusal:
        warnings.warn(f"Not captured in a CUDA graph, the per-example backward runs eagerly: "
                      f"{refusal}", RuntimeWarning, stacklevel=4)
        return None

    def warm_up() -> None:
        warm = losses_of_batch()
        torch.autograd.grad(warm, tensors, torch.ones_like(warm), allow_unused=True)

    try:
        with cudnn_autotuned():
            on_side_stream(warm_up)
            pool = torch.cuda.graph_pool_handle()
            forward_graph, backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(forward_graph, pool=pool):
                losses = losses_of_batch()
            captured: list[Any] = []

            def run(step: Callable[[], Any]) -> Any:
                if not captured:
                    with torch.cuda.graph(backward_graph, pool=pool):
                        captured.append(step())
                    forward_graph.replay()
                backward_graph.replay()
                return captured[0]

            rows = _rows_one_at_a_time(losses, tensors, run)
    except RuntimeError as err:
        warnings.warn(f"CUDA refused to capture the per-example backward in a graph; the rows "
                      f"run eagerly instead ({type(err).__name__}: {err})", RuntimeWarning,
                      stacklevel=4)
        return None
    batch = len(eager_losses)
    eager = {i: torch.autograd.grad(eager_losses[i], tensors, retain_graph=True,
                                    allow_unused=True) for i in sorted({0, batch // 2, batch - 1})}
    whole = torch.autograd.grad(eager_losses.sum(), tensors, retain_graph=True, allow_unused=True)
    problem = _rows_disagree(rows, eager, whole)
    if problem is not None:
        warnings.warn(f"The per-example rows replayed from a CUDA graph are not trusted: "
                      f"{problem}; they run eagerly instead.", RuntimeWarning, stacklevel=4)
        return None
    return rows


def _rows_disagree(rows: list[torch.Tensor], eager: Mapping[int, Sequence[torch.Tensor | None]],
                   whole: Sequence[torch.Tensor | None]) -> str | None:
    """Why per-example `rows` (one (B, *shape) tensor per parameter) cannot be trusted, or
    None: each row i in `eager` (its gradients from an eager backward, None where unused) and
    the sum of all rows against `whole` (the eager gradient of the summed losses) must agree
    within `rounding_slack` of the dtype, relative to the norm over all parameters; nothing is
    checked when the eager gradients are not finite (the result says finite=False)."""
    if not all_finite(g for g in [*whole, *(g for gs in eager.values() for g in gs)]
                      if g is not None):
        return None
    slack = rounding_slack(rows[0].dtype) if rows else 0.0

    def gap(got: list[torch.Tensor], want: Sequence[torch.Tensor | None],
            scale: float) -> float:
        diff = sum(float(((g - (torch.zeros_like(g) if w is None else w)).double() ** 2).sum())
                   for g, w in zip(got, want, strict=True))
        return diff ** 0.5 / max(scale, 1e-30)

    for i, grads in eager.items():
        got = [r[i] for r in rows]
        scale = max(_norm(got), _norm([g for g in grads if g is not None]))
        error = gap(got, grads, scale)
        if not error <= slack:
            return f"row {i} differs from an eager backward by {error:.1e} (relative)"
    scale = _norm([r.abs().sum(0) for r in rows])
    error = gap([r.sum(0) for r in rows], whole, scale)
    if not error <= slack:
        return f"the rows add up to the batch gradient only within {error:.1e} (relative)"
    return None


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    return sum(float((t.double() ** 2).sum()) for t in tensors) ** 0.5


def _default_chunk(batch: int, x: torch.Tensor, tensors: list[torch.Tensor], activations: int,
                   max_memory: float | None) -> int:
    """Rows per batched VJP: one row at a time unless `max_memory` is given (then as many as it
    allows; each row costs ~ (activations + params) numbers). On a CPU vectorizing the backward
    over cotangents does not pay (measured here); on a GPU the one-row backward is replayed from
    a CUDA graph (`_captured_rows`), which avoids the launch-bound eager backward that made the
    naive loop slow there, without the batched VJP's B-fold working memory."""
    if max_memory is None:
        return 1
    per_row = (activations + sum(p.numel() for p in tensors)) * x.element_size()
    return int(max(1, min(batch, max_memory // max(per_row, 1))))


class _VmapMismatch(RuntimeError):
    """The per-example losses under vmap differ from the batch forward's."""


def _vmap_grads(forward, loss_fn, x, y, selected, chunk_size):
    from torch.func import grad_and_value, vmap

    names = list(selected)
    # contiguous (not channels_last) copies: inside vmap torch cannot query other memory formats
    trainable = {k: selected[k].detach().contiguous() for k in names}

    def example_loss(params, xi, yi):
        out = forward(xi.unsqueeze(0), params)
        return per_example_losses(loss_fn, out, yi.unsqueeze(0))[0]

    grad_fn = vmap(grad_and_value(example_loss), in_dims=(None, 0, 0), chunk_size=chunk_size)
    grads, values = grad_fn(trainable, x.contiguous(), y)
    with torch.no_grad():
        batch = per_example_losses(loss_fn, forward(x, trainable), y)
    slack = rounding_slack(values.dtype)
    if not torch.allclose(values, batch, rtol=slack, atol=slack * float(batch.abs().max()) + 1e-12,
                          equal_nan=True):
        raise _VmapMismatch("the per-example losses computed one example at a time differ from "
                            "those of the batch forward (a batch-coupled layer?)")
    return {k: v.detach() for k, v in grads.items()}


@convention()
def per_example_contributions(model: nn.Module, loss_fn, data, *,
                              params: Iterable[str] | None = None, mode: str = "keep"
                              ) -> PerExampleGradients:
    """c_i, example i's share of the batch gradient of `loss_fn` on one batch `data` = (x, y),
    in `mode` (default "keep": the model's own modes); cost ~2-3 backward passes (one backward
    plus per-example products in layer hooks), plus two forwards without gradients the first
    time a model structure and input shape is seen (to find the example axis of every layer).

    For Conv2d/Linear weight and bias, c_i = sum over positions of d_i (x) a_i (output gradient
    of example i times its input); for other convolutions the layer's own VJP per example; for
    nn.Embedding d_i at example i's tokens; for norm affine parameters c_i(weight) = sum over
    positions of d_i * xhat_i (the normalized input) and c_i(bias) = sum of d_i; for a layer of
    your own without submodules, the VJP of its forward with d kept on example i's rows (or,
    when it couples the examples, d_i times the factor by which each parameter scales or
    shifts its output). Examples are found per layer (a (B*T, D) fold is summed per example);
    a weight tied across modules adds up every use; a parametrized weight (weight_norm,
    spectral_norm) is pulled back to its original parameters. sum_i c_i equals the batch
    gradient (checked). `params` names the parameters to attribute (default: every parameter
    that requires grad); those no covered layer uses are left out and listed in `.left_out`
    with the reason; a parameter that cannot be attributed exactly (a layer whose input is not
    example-major, a weight also used in a functional call, ...) raises ConfigError naming it.
    Note: the d_i are gradients of the *reduced* batch loss (mean: they carry 1/B), and with BN
    in train mode c_i is not d ell_i / d theta (see `per_example_loss_grads`).
    Running statistics are not updated and parameters never written.
    """
    x, y = one_batch(data, "per_example_contributions")
    with preserved(model), probe_mode(model, mode, x):
        selected = select_params(model, params)
        got = contributions(model, loss_fn, x, y, selected)
        layers = param_layers(model)
        return PerExampleGradients(got.rows, quantity=CONTRIBUTIONS,
                                   bn_mode=norm_mode(model, mode, x),
                                   layers={k: layers[k] for k in got.rows}, method="layer_hooks",
                                   mode=mode, finite=got.finite, left_out=got.left_out)
