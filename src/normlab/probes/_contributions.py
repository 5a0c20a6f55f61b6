"""Per-example contributions c_i: example i's share of the batch gradient, layer by layer.

One backward of the batch loss delivers d, the gradient at each module's output (captured
before any user forward hook changes that output), and c_i is what flows through example i's
rows of it:
- Conv2d, Linear: sum over positions of d_i (x) a_i (one weight-gradient convolution, an
  einsum); other convolutions: the layer's own VJP per row;
- nn.Embedding: d_i added to the rows of example i's tokens (padding and frequency scaling as
  torch's backward does them);
- torch's and normlab's normalization layers: sum over positions of d_i * xhat_i (weight) and
  of d_i (bias), xhat recomputed by the norm's own forward from the buffers it read *before*
  that forward updated them (BatchRenorm's r and d read the running statistics);
- any other module without submodules (a user's own layer): when it treats examples
  independently, the VJP of its forward with the cotangent d kept on example i's rows only
  (batched over examples); when it couples them, each parameter must be a per-channel scale
  or shift of its output (checked), and c_i is d_i times that factor.
Rows are examples as `normlab.nn.example_axes` finds them: a (B*T, D) fold is summed per
example, a layer whose input is not example-major is refused by name. A weight used by several
modules adds up every use; a weight computed by a parametrization (weight_norm, spectral_norm,
old-style hooks included) has its rows pulled back through that computation to the original
parameters. The rows of every parameter must add up to its batch gradient (checked), so a use
that no module accounts for (a weight tied into a functional call) is refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.grad import conv2d_weight
from torch.nn.modules import module as module_globals
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from normlab.nn import BatchRenorm, InstanceNorm
from normlab.nn.coupling import couples
from normlab.nn.example_axes import Call, ExampleAxes, ExampleAxis, example_axes
from normlab.probes._calling import batch_loss
from normlab.probes._modules import (
    canonical_names,
    hooks_removed,
    padded_conv_input,
    parametrization_outputs,
    tensor_used,
)
from normlab.probes._results import all_finite, rounding_slack
from normlab.probes._stateless import Stateless
from normlab.utils.config import ConfigError

_CONV_FORWARDS = {c.forward for c in (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d,
                                      nn.ConvTranspose2d, nn.ConvTranspose3d)}
_NORM_FORWARDS = {nn.modules.batchnorm._BatchNorm.forward, nn.GroupNorm.forward,
                  nn.LayerNorm.forward, nn.modules.instancenorm._InstanceNorm.forward,
                  BatchRenorm.forward, InstanceNorm.forward}
_CHUNK_ELEMENTS = 2 ** 24  # cotangent numbers per batched VJP of a user's layer


@dataclass
class Contributions:
    """`rows`: parameter name -> (B, *shape); `left_out`: parameter name -> why it has none;
    `finite`: False when the input, the loss or a gradient was not finite."""

    rows: dict[str, torch.Tensor]
    left_out: dict[str, str]
    finite: bool


def contributions(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor,
                  selected: dict[str, nn.Parameter]) -> Contributions:
    """c_i of every parameter in `selected` (see the module docstring), in the model's current
    flags; raises ConfigError naming every parameter normlab cannot attribute exactly."""
    _refuse_global_hooks()
    axes = example_axes(model, x)
    leaves = {n: p.detach().requires_grad_(True) for n, p in selected.items()}
    with parametrization_outputs(model.modules()) as latest:
        tracker = _Tracker(axes, x.shape[0], canonical_names(model), leaves, latest)
        with hooks_removed(tracker.attach(model, set(selected))):
            loss = batch_loss(loss_fn, Stateless(model)(x, leaves), y)
            got = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True,
                                      retain_graph=tracker.retain)
    for task in tracker.deferred:
        task()
    batch_grads = dict(zip(leaves, got, strict=True))
    finite = all_finite([x, loss]) and all_finite(g for g in got if g is not None)
    return tracker.result(selected, batch_grads, finite)


def _refuse_global_hooks() -> None:
    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks \
            or module_globals._global_backward_hooks:
        raise ConfigError("per_example_contributions cannot see a layer's own output while "
                          "global module hooks (torch.nn.modules.module.register_module_"
                          "forward_hook and friends) are registered; remove them for the call.")


@dataclass
class _Tracker:
    """The hooks of one contributions pass and what they collect."""

    axes: ExampleAxes
    batch: int
    canonical: dict[tuple[str, str], str]
    leaves: dict[str, torch.Tensor]
    latest: dict[tuple[int, str], torch.Tensor]  # parametrization outputs
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    covered: dict[str, list[str]] = field(default_factory=dict)  # parameter -> its modules
    uncovered: dict[str, str] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    deferred: list[Callable[[], None]] = field(default_factory=list)
    retain: bool = False
    active: bool = True

    # -- registration ----------------------------------------------------------------------------

    def attach(self, model: nn.Module, selected: set[str]) -> list:
        handles = []
        for name, module in model.named_modules():
            rule = _rule(module)
            sources = {t: self._sources(name, module, t) for t in _tensor_names(module, rule)}
            wanted = {t: s for t, s in sources.items() if s & selected}
            if rule is None:
                for pname, p in module._parameters.items():
                    if p is not None:
                        self.uncovered.setdefault(self.canonical[(name, pname)], (
                            f"it is used in the own code of {name or 'the model'!r}, a module "
                            f"with submodules, where normlab cannot attribute it to examples"))
                continue
            if not wanted:
                continue
            for s in set().union(*wanted.values()):
                self.covered.setdefault(s, []).append(name or "the model")
            handles += self._hooks(name, module, rule, wanted)
        return handles

    def _sources(self, name: str, module: nn.Module, tensor: str) -> set[str]:
        """The parameters (canonical names) the module's tensor `tensor` is made of."""
        if tensor in module._parameters:
            return {self.canonical[(name, tensor)]}
        if parametrize.is_parametrized(module, tensor):
            plist = module.parametrizations[tensor]
            prefix = f"{name}.parametrizations.{tensor}" if name else \
                f"parametrizations.{tensor}"
            return {self.canonical[(f"{prefix}", p)] for p, _ in plist.named_parameters(
                recurse=False)} | {self.canonical[(f"{prefix}.{m}", p)]
                                   for m, sub in plist.named_modules() if m
                                   for p, _ in sub.named_parameters(recurse=False)}
        hook = _legacy_hook(module, tensor)
        if hook is not None:
            own = [f"{tensor}_g", f"{tensor}_v"] if isinstance(hook, WeightNorm) \
                else [f"{tensor}_orig"]
            return {self.canonical[(name, p)] for p in own if (name, p) in self.canonical}
        return set()

    def _hooks(self, name: str, module: nn.Module, rule: str, wanted: dict[str, set[str]]
               ) -> list:
        snapshots: list[dict[str, torch.Tensor]] = []
        calls = [0]

        def pre(mod, args, kwargs):
            if self.active:
                snapshots.append({n: b.detach().clone() for n, b in mod.named_buffers()})

        def post(mod, args, kwargs, output):
            if not self.active:
                return
            index, calls[0] = calls[0], calls[0] + 1
            buffers = snapshots.pop()
            if not torch.is_grad_enabled():
                return
            call = self.axes.call(name, index)
            tensors = {t: tensor_used(mod, t, self.latest) for t in wanted}
            self._on_call(name, mod, rule, call, args, kwargs, output, buffers, tensors, wanted)

        return [module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True),
                module.register_forward_hook(post, with_kwargs=True, prepend=True)]

    # -- one call --------------------------------------------------------------------------------

    def _on_call(self, name, module, rule, call, args, kwargs, output, buffers, tensors, wanted):
        label = name or "the model"
        if not isinstance(output, torch.Tensor):
            for s in set().union(*wanted.values()):
                self.uncovered.setdefault(s, f"{label!r} returns several tensors (or none), "
                                             f"whose rows normlab does not attribute")
                self.covered.pop(s, None)
            return
        if not output.requires_grad:
            return
        why = _layout_problem(label, rule, module, call, args, output)
        if why is None and any(t is None for t in tensors.values()):
            why = f"normlab could not find the tensor that {label!r} computed its output with"
        if why is not None:
            for s in set().union(*wanted.values()):
                self.problems.setdefault(s, why)
            return
        a = args[0] if args else None
        if rule == "leaf":
            kept = tuple(v.detach().clone() if isinstance(v, torch.Tensor) else v for v in args)
            sources = set().union(*wanted.values())
            output.register_hook(lambda d: self.deferred.append(lambda: self._leaf(
                label, module, call, kept, kwargs, buffers, tensors, sources, d)))
            self.retain = self.retain or any(t.grad_fn is not None for t in tensors.values())
            return
        xhat = _normalized(module, a, buffers, tensors) if rule == "norm" else None
        output.register_hook(lambda d: self._add(tensors, _fast_rows(
            rule, module, call, a.detach(), d.detach(), xhat, tensors, self.batch)))
        self.retain = self.retain or any(t.grad_fn is not None for t in tensors.values())

    def _add(self, tensors: dict[str, torch.Tensor], rows: dict[str, torch.Tensor]) -> None:
        """Add the per-example rows of each tensor to the parameters it is made of."""
        for tensor, value in rows.items():
            used = tensors[tensor]
            if used.grad_fn is None:  # a parameter itself
                self._accumulate(self._name_of(used), value)
            else:  # computed from parameters (a parametrization): pull the rows back
                self.deferred.append(lambda used=used, value=value: self._pull_back(used, value))

    def _name_of(self, leaf: torch.Tensor) -> str:
        return next(n for n, t in self.leaves.items() if t is leaf)

    def _accumulate(self, name: str, value: torch.Tensor) -> None:
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    def _pull_back(self, used: torch.Tensor, rows: torch.Tensor) -> None:
        names = list(self.leaves)
        got = _batched_vjp(used, [self.leaves[n] for n in names], rows)
        for n, g in zip(names, got, strict=True):
            if g is not None:
                self._accumulate(n, g)

    def _leaf(self, label, module, call, args, kwargs, buffers, tensors, sources, d) -> None:
        """A user's own layer: see the module docstring."""
        inputs = {t: v.detach().requires_grad_(True) for t, v in tensors.items()}

        def run(a: tuple, p: dict[str, torch.Tensor]) -> torch.Tensor:
            return _call_with(module, {**{n: b.clone() for n, b in buffers.items()}, **p}, a,
                              kwargs)

        self.active = False
        try:
            coupled = couples(run, {t: v.detach() for t, v in tensors.items()}, tuple(args),
                              call.received, call.output, self.batch)
            if coupled:
                rows = _scale_or_shift_rows(label, run, tuple(args), tensors, d, call.output,
                                            self.batch)
            else:
                with torch.enable_grad():
                    out = run(tuple(args), inputs)
                rows = _masked_vjp(out, inputs, d, call.output, self.batch)
        except _NotAttributable as err:
            for source in sources:
                self.problems.setdefault(source, str(err))
            return
        finally:
            self.active = True
        self._add(tensors, rows)

    # -- the result ------------------------------------------------------------------------------

    def result(self, selected: dict[str, nn.Parameter], batch_grads: dict[str, Any],
               finite: bool) -> Contributions:
        rows, left_out = {}, {}
        # the rows must add up to the batch gradient within sqrt(eps) of their own size, or
        # within 1000 eps of the largest parameter's (where a parameter's true gradient
        # vanishes, its rows and its batch gradient are both rounding noise)
        scales = {n: float(v.abs().sum(0).norm()) for n, v in self.sums.items()}
        floor = max(scales.values(), default=0.0)
        for name, p in selected.items():
            if name in self.problems:
                continue
            if name not in self.covered:
                left_out[name] = self.uncovered.get(
                    name, "no module normlab covers uses it")
                continue
            g = batch_grads[name]
            if name not in self.sums:
                if g is not None and bool((g != 0).any()):
                    left_out[name] = ("it is used only outside the forward of the layers "
                                      "normlab covers (e.g. in a functional call of a parent "
                                      "module)")
                    continue
                rows[name] = torch.zeros(self.batch, *p.shape, dtype=p.dtype, device=p.device)
                continue
            value = self.sums[name]
            if finite and g is not None:
                gap = float((value.sum(0) - g).norm())
                error = gap / max(scales[name], 1e-300)
                allowed = max(rounding_slack(value.dtype) * scales[name],
                              1000 * torch.finfo(value.dtype).eps * floor)
                if gap > allowed:
                    self.problems[name] = (
                        f"its contributions through {', '.join(map(repr, self.covered[name]))} "
                        f"add up to a gradient {error:.1e} off the batch gradient: it is also "
                        f"used outside the forward of those layers (a weight tied into a "
                        f"functional call, or used in a parent module's own code)")
                    continue
            rows[name] = value
        problems = {n: why for n, why in self.problems.items() if n in selected}
        if problems:
            raise ConfigError(
                "per_example_contributions cannot attribute these parameters to examples "
                "exactly: " + "; ".join(f"{n!r}: {why}" for n, why in problems.items())
                + ". Leave them out with the 'params' setting (the names of the parameters "
                "to attribute).")
        return Contributions(rows, left_out, finite)


class _NotAttributable(Exception):
    """A user's layer whose parameters normlab cannot attribute to examples exactly."""


# -- which rule, and is the layout one it can use ----------------------------------------------

def _rule(module: nn.Module) -> str | None:
    forward = type(module).forward
    if forward is nn.Conv2d.forward:
        return "conv2d"
    if forward in _CONV_FORWARDS:
        return "conv"
    if forward is nn.Linear.forward:
        return "linear"
    if forward is nn.Embedding.forward:
        return "embedding"
    if forward in _NORM_FORWARDS:
        return "norm"
    if not any(n != "parametrizations" for n in module._modules) and _tensor_names(module, "leaf"):
        return "leaf"
    return None


def _tensor_names(module: nn.Module, rule: str | None) -> list[str]:
    """The tensors of `module` that its rule attributes."""
    if rule is None:
        return []
    if rule == "leaf":
        names = [n for n, p in module._parameters.items() if p is not None]
        if parametrize.is_parametrized(module):
            names += [n for n in module.parametrizations if n not in names]
        return names
    names = ["weight"] if rule == "embedding" else ["weight", "bias"]
    return [n for n in names if module._parameters.get(n) is not None
            or parametrize.is_parametrized(module, n) or _legacy_hook(module, n) is not None]


def _legacy_hook(module: nn.Module, tensor: str) -> WeightNorm | SpectralNorm | None:
    """torch's old-style weight_norm / spectral_norm hook that computes `tensor`, if any."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, (WeightNorm, SpectralNorm)) and hook.name == tensor:
            return hook
    return None


def _layout_problem(label: str, rule: str, module: nn.Module, call: Call | str, args: tuple,
                    output: torch.Tensor) -> str | None:
    """Why the rule cannot tell example i's rows of this call, or None."""
    if isinstance(call, str):
        return f"normlab cannot find the example axis of {label!r}: {call}"
    out_axis = call.output
    if not isinstance(out_axis, ExampleAxis):
        return (f"the output of {label!r} (shape {tuple(output.shape)}) "
                + ("does not depend on the batch" if out_axis is None else out_axis)
                + "; normlab needs to know which rows belong to which example")
    if rule == "leaf":
        return None
    in_axis = call.received[0] if call.received else None
    shape = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else None
    if not isinstance(in_axis, ExampleAxis):
        return (f"the input of {label!r} (shape {shape}) "
                + ("does not depend on the batch" if in_axis is None else in_axis)
                + "; normlab needs to know which rows belong to which example")
    if (in_axis.per_example, in_axis.strided) != (out_axis.per_example, out_axis.strided):
        return f"{label!r} maps the rows of its examples to other rows"
    channel_first = rule in ("conv2d", "conv") or (rule == "norm"
                                                   and not isinstance(module, nn.LayerNorm))
    if channel_first and (in_axis.axis, out_axis.axis) != (0, 0):
        return (f"the input of {label!r} (shape {shape}) holds the examples along dim "
                f"{in_axis.axis}, not dim 0, which this layer treats as the batch")
    if rule == "linear" and (in_axis.axis == len(shape) - 1 or in_axis.axis != out_axis.axis):
        return (f"the input of {label!r} (shape {shape}) holds the examples along its "
                f"feature dim")
    if rule == "norm" and isinstance(module, nn.LayerNorm) \
            and in_axis.axis >= len(shape) - len(module.normalized_shape):
        return (f"the input of {label!r} (shape {shape}) holds the examples along a "
                f"normalized dim")
    return None


# -- the fast rules ------------------------------------------------------------------------------

def _fast_rows(rule: str, module: nn.Module, call: Call, a: torch.Tensor, d: torch.Tensor,
               xhat: torch.Tensor | None, tensors: dict[str, torch.Tensor], batch: int
               ) -> dict[str, torch.Tensor]:
    """(B, *tensor shape) per attributed tensor for one call of a layer with a fast rule."""
    axis = call.output
    assert isinstance(axis, ExampleAxis)
    a = a.movedim(call.received[0].axis, 0)
    d = d.movedim(axis.axis, 0)
    out: dict[str, torch.Tensor] = {}
    if rule == "conv2d":
        out["weight"] = _conv_weight_rows(module, a, d, tensors["weight"].shape)
        if "bias" in tensors:
            out["bias"] = d.sum(dim=(2, 3))
    elif rule == "conv":
        out = _module_vjp_rows(module, a, d, tensors)
    elif rule == "linear":
        a2 = a.reshape(a.shape[0], -1, a.shape[-1])  # (rows, positions, in)
        d2 = d.reshape(d.shape[0], -1, d.shape[-1])  # (rows, positions, out)
        out["weight"] = torch.einsum("bpo,bpi->boi", d2, a2)
        if "bias" in tensors:
            out["bias"] = d2.sum(dim=1)
    elif rule == "embedding":
        out["weight"] = _embedding_rows(module, a, d, tensors["weight"])
    else:  # a norm's affine parameters
        assert xhat is not None
        out["weight"] = _reduce_to(d * xhat.movedim(axis.axis, 0), module)
        if "bias" in tensors:
            out["bias"] = _reduce_to(d, module)
    return {t: _per_example(v, axis, batch) for t, v in out.items() if t in tensors}


def _per_example(rows: torch.Tensor, axis: ExampleAxis, batch: int) -> torch.Tensor:
    """Rows (along the example axis, moved first) summed into their examples: (B, ...)."""
    if axis.per_example == 1:
        return rows
    index = axis.example_of_rows(batch, rows.device)
    return torch.zeros(batch, *rows.shape[1:], dtype=rows.dtype,
                       device=rows.device).index_add_(0, index, rows)


def _conv_weight_rows(conv: nn.Conv2d, a: torch.Tensor, d: torch.Tensor,
                      weight_shape: torch.Size) -> torch.Tensor:
    """sum over positions of d[n, o, p] * patch(a)[n, (c, kh, kw), p]: (N, *weight_shape).

    One weight-gradient convolution with the rows folded into the groups (row n's channels form
    groups of their own), exact, and on a CPU 1-9x faster than unfold + einsum (ResNet-20 layer
    shapes at B = 128, measured here) without the unfolded copy of the input."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        a = padded_conv_input(conv, a)  # 'same'/'valid' or reflect/replicate/circular padding
        padding: tuple[int, ...] | int = 0
    else:
        padding = conv.padding
    rows = a.shape[0]
    out, fan_in = weight_shape[:2]
    per = conv2d_weight(a.reshape(1, -1, *a.shape[2:]), (rows * out, fan_in, *conv.kernel_size),
                        d.reshape(1, -1, *d.shape[2:]), stride=conv.stride, padding=padding,
                        dilation=conv.dilation, groups=rows * conv.groups)
    return per.reshape(rows, *weight_shape)


def _module_vjp_rows(module: nn.Module, a: torch.Tensor, d: torch.Tensor,
                     tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VJP of the layer's own forward for each row (a_n, d_n), vectorized: exact for any
    layer that treats rows independently (every convolution)."""
    from torch.func import vjp, vmap

    used = {k: v.detach().contiguous() for k, v in tensors.items()}

    def one(an: torch.Tensor, dn: torch.Tensor) -> dict[str, torch.Tensor]:
        _, pull = vjp(lambda p: _call_with(module, p, (an.unsqueeze(0),)), used)
        return pull(dn.unsqueeze(0))[0]

    with torch.enable_grad():
        return vmap(one)(a.contiguous(), d.contiguous())


def _embedding_rows(module: nn.Embedding, tokens: torch.Tensor, d: torch.Tensor,
                    weight: torch.Tensor) -> torch.Tensor:
    """d added to the weight rows of each row's tokens, as torch's embedding backward does
    (nothing for `padding_idx`; divided by the batch's token counts with
    `scale_grad_by_freq`): (N, vocabulary, dim)."""
    rows, vocabulary = tokens.shape[0], weight.shape[0]
    index = tokens.reshape(rows, -1)  # (N, positions)
    grad = d.reshape(rows, index.shape[1], -1)  # (N, positions, dim)
    if module.scale_grad_by_freq:
        counts = torch.bincount(index.flatten(), minlength=vocabulary)
        grad = grad / counts[index].unsqueeze(-1).to(grad.dtype)
    if module.padding_idx is not None:
        grad = grad * (index != module.padding_idx).unsqueeze(-1).to(grad.dtype)
    flat = (index + vocabulary * torch.arange(rows, device=index.device).unsqueeze(1)).flatten()
    out = torch.zeros(rows * vocabulary, grad.shape[-1], dtype=grad.dtype, device=grad.device)
    return out.index_add_(0, flat, grad.reshape(-1, grad.shape[-1])).reshape(rows, vocabulary, -1)


def _normalized(module: nn.Module, a: torch.Tensor, buffers: dict[str, torch.Tensor],
                tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """xhat: the norm's output with unit scale and zero shift (so output = xhat * w + b),
    recomputed by the norm's own forward on the buffers as they were before its forward ran
    (exact for every norm kind, BatchRenorm's r/d corrections included)."""
    state = {"weight": torch.ones_like(tensors["weight"]), **buffers}
    if "bias" in tensors:
        state["bias"] = torch.zeros_like(tensors["bias"])
    with torch.no_grad():
        return _call_with(module, state, (a.detach(),))


def _reduce_to(t: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Sum a (rows, ...) tensor to (rows, *affine shape): over positions for per-channel affine
    parameters (BN, BatchRenorm, GN, IN: channel dim 1), over the leading dims for
    nn.LayerNorm's affine parameters shaped like its trailing `normalized_shape`."""
    if isinstance(module, nn.LayerNorm):
        lead = t.dim() - 1 - len(module.normalized_shape)
        return t.sum(dim=tuple(range(1, 1 + lead))) if lead else t
    return t.sum(dim=tuple(range(2, t.dim()))) if t.dim() > 2 else t


def _call_with(module: nn.Module, state: dict[str, torch.Tensor], args: tuple,
               kwargs: dict | None = None) -> Any:
    """`module(*args, **kwargs)` without its own hooks, reading `state` (name -> tensor): its
    parameters and buffers, and the tensors a parametrization or an old-style weight_norm hook
    computes, used as given (a functional call would pass those through the parametrization's
    right_inverse and forward, which changes them: weight_norm of zeros is NaN)."""
    direct, handles, saved = {}, [], {}
    for name, value in state.items():
        if parametrize.is_parametrized(module, name):
            handles.append(module.parametrizations[name].register_forward_hook(
                lambda _m, _i, _o, value=value: value))
        elif name in module._parameters or name in module._buffers or "." in name:
            direct[name] = value
        else:  # a plain attribute that an old-style hook sets before each forward
            saved[name] = module.__dict__.get(name)
            module.__dict__[name] = value
    try:
        with _hooks_off(module):
            return functional_call(module, direct, tuple(args), dict(kwargs or {}), strict=False)
    finally:
        for handle in handles:
            handle.remove()
        module.__dict__.update(saved)


class _hooks_off:
    """Run a module's forward without its own hooks (ours, and those of an old-style
    weight_norm, whose tensor is passed in; user hooks are not part of the layer's rows)."""

    _KINDS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
              "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
              "_backward_pre_hooks")

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.saved = {k: getattr(self.module, k) for k in self._KINDS}
        for k, v in self.saved.items():
            setattr(self.module, k, type(v)())

    def __exit__(self, *exc) -> None:
        for k, v in self.saved.items():
            setattr(self.module, k, v)


# -- a user's own layer --------------------------------------------------------------------------

def _masked_vjp(out: torch.Tensor, inputs: dict[str, torch.Tensor], d: torch.Tensor,
                axis: ExampleAxis, batch: int) -> dict[str, torch.Tensor]:
    """For each example i, the VJP of `out` w.r.t. `inputs` with the cotangent d kept on
    example i's rows: (B, *shape) each; batched over examples in chunks."""
    mask = (axis.example_of_rows(batch, d.device).unsqueeze(0)
            == torch.arange(batch, device=d.device).unsqueeze(1)).to(d.dtype)  # (B, rows)
    moved = d.movedim(axis.axis, 0)
    chunk = max(1, _CHUNK_ELEMENTS // max(d.numel(), 1))
    parts: dict[str, list[torch.Tensor]] = {t: [] for t in inputs}
    for start in range(0, batch, chunk):
        m = mask[start:start + chunk]
        cot = (m.reshape(*m.shape, *([1] * (moved.dim() - 1))) * moved.unsqueeze(0))
        cot = cot.movedim(1, axis.axis + 1)
        got = _batched_vjp(out, list(inputs.values()), cot)
        for (t, v), g in zip(inputs.items(), got, strict=True):
            parts[t].append(torch.zeros(len(m), *v.shape, dtype=v.dtype, device=v.device)
                            if g is None else g)
    return {t: torch.cat(p) for t, p in parts.items()}


def _batched_vjp(out: torch.Tensor, wrt: list[torch.Tensor], cotangents: torch.Tensor
                 ) -> list[torch.Tensor | None]:
    """One VJP of `out` per leading row of `cotangents` (vectorized; a loop where torch
    cannot batch an op)."""
    try:
        return list(torch.autograd.grad(out, wrt, cotangents, retain_graph=True,
                                        is_grads_batched=True, allow_unused=True))
    except RuntimeError:  # an op without a batching rule
        rows = [torch.autograd.grad(out, wrt, c, retain_graph=True, allow_unused=True)
                for c in cotangents]
        return [None if rows[0][j] is None else torch.stack([r[j] for r in rows])
                for j in range(len(wrt))]


def _scale_or_shift_rows(label: str, run: Callable, args: tuple,
                         tensors: dict[str, torch.Tensor], d: torch.Tensor, axis: ExampleAxis,
                         batch: int) -> dict[str, torch.Tensor]:
    """Rows of the parameters of a layer that couples the examples: each must enter its output
    y as a per-channel scale or shift, y(p) = y(0) + p (.) s (checked at a random p), whose
    rows are then d (.) s summed to p's shape; else _NotAttributable."""
    base = {t: v.detach() for t, v in tensors.items()}
    generator = torch.Generator().manual_seed(0)
    out = {}
    with torch.no_grad():
        for t, value in base.items():
            zero = run(args, {**base, t: torch.zeros_like(value)})
            factor = run(args, {**base, t: torch.ones_like(value)}) - zero
            probe = torch.randn(value.shape, generator=generator, dtype=value.dtype).to(value)
            moved = run(args, {**base, t: probe}) - zero
            view = _broadcast_view(value.shape, factor.shape, axis.axis, moved, probe, factor)
            if view is None:
                raise _NotAttributable(
                    f"{label!r} couples the examples of the batch, and its parameter {t!r} "
                    f"is not a per-channel scale or shift of its output, so its share per "
                    f"example is not defined by its output rows")
            product = d * factor
            dims = tuple(i for i, size in enumerate(view) if size == 1 and i != axis.axis)
            summed = product.sum(dim=dims, keepdim=True) if dims else product
            rows = summed.movedim(axis.axis, 0).reshape(-1, *value.shape)
            out[t] = _per_example(rows, axis, batch)
    return out


def _broadcast_view(shape: torch.Size, out_shape: torch.Size, example_axis: int,
                    moved: torch.Tensor, probe: torch.Tensor, factor: torch.Tensor
                    ) -> tuple[int, ...] | None:
    """The view of a parameter of `shape` that broadcasts it over the output (trailing dims,
    or dim 1 for a per-channel vector; never along the examples) under which
    moved == probe (.) factor, or None."""
    views = []
    if len(shape) <= len(out_shape) and tuple(out_shape[len(out_shape) - len(shape):]) == \
            tuple(shape):
        views.append((1,) * (len(out_shape) - len(shape)) + tuple(shape))
    if len(shape) == 1 and len(out_shape) >= 2 and out_shape[1] == shape[0]:
        views.append((1, shape[0]) + (1,) * (len(out_shape) - 2))
    tolerance = rounding_slack(moved.dtype) * float(moved.abs().max().clamp_min(1e-30))
    for view in views:
        if view[example_axis] == 1 and \
                float((moved - probe.reshape(view) * factor).abs().max()) <= tolerance:
            return view
    return None


