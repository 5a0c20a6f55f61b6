"""Batch coupling and normalization layers, decided by what modules do, never by their class.

- `is_batch_coupled(model, x)`: whether example i's output depends on the other examples of
  the batch `x`, in the model's current train/eval flags (BatchNorm or BatchRenorm in train
  mode, a user's own batch-centring layer, ...). It decides whether per-example gradients
  and per-example contributions differ, and whether vmap may run examples one at a time.
- `norm_layers(model, x)`: the modules that are normalization layers in the sense that matters
  for `mode="train"`: their own training flag switches batch coupling on (a user's own
  BatchNorm counts; LayerNorm, whose flag changes nothing, does not).

The test (`couples`): the module runs on its own input with its parameters moved by a small
random step (so that a zero-initialised gate, head or affine weight cannot hide a coupled
path), a random cotangent is put on the output rows of one example, and one backward asks
whether the input rows of any other example receive a nonzero gradient; repeated for the
first and the last example. Through example-independent operations that gradient is exactly
zero, so no tolerance is involved, and being a gradient test it sees coupling that a forward
value hides (BatchRenorm with unclipped r, d). Rows are examples as `example_axes` finds them
(a (B*T, D) fold or a (T, B, D) layout included).

Cost (first call per model structure and input shape; then cached): `example_axes`, one
forward and backward of the model for `is_batch_coupled`; for `norm_layers` one forward to
capture each module's input and, per distinct (module, input shape), one or two forward and
backward passes of that module alone. Layers of torch.nn other than its batch and instance
norms are not run (their code keeps no batch statistics). Nothing the model holds changes;
user hooks run during these passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from normlab.nn._probing import LearnedCache, run_privately, structure_key, tensor_key
from normlab.nn.example_axes import Axis, Call, ExampleAxis, example_axes
from normlab.utils.config import ConfigError

Run = Callable[[tuple, dict[str, torch.Tensor]], Any]

# torch's own modules whose code may keep batch statistics: every other torch.nn class is known
# not to switch batch coupling with its flag and is not run.
_TORCH_STATISTICS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass(frozen=True)
class NormLayers:
    """`names`: modules whose own training flag switches batch coupling on; `random`: those of
    them whose flag also switches randomness on (Dropout in the same module); `unknown`:
    (module name, why) for modules normlab could not run alone to find out."""

    names: tuple[str, ...] = ()
    random: tuple[str, ...] = ()
    unknown: tuple[tuple[str, str], ...] = ()


def couples(run: Run, params: Mapping[str, torch.Tensor], args: tuple, arg_axes: tuple[Axis, ...],
            output_axis: Axis | tuple[Axis, ...], batch: int) -> bool | None:
    """Whether `run(args, params)` mixes the examples of the batch (see the module docstring);
    None when no floating-point argument carries the examples (nothing to test)."""
    args = list(args)
    leaves = []
    for i, (a, axis) in enumerate(zip(args, arg_axes, strict=False)):
        if isinstance(a, torch.Tensor) and isinstance(axis, ExampleAxis) \
                and a.is_floating_point():
            args[i] = a.detach().clone().requires_grad_(True)
            leaves.append((args[i], axis))
    if not leaves:
        return None
    generator = torch.Generator().manual_seed(0)
    moved = {n: _moved(p, generator) for n, p in params.items()}
    with torch.enable_grad():
        output = run(tuple(args), moved)
    return _mixes(_paired(output, output_axis), leaves, batch, generator)


def batch_coupling(model: nn.Module, x: torch.Tensor) -> bool | None:
    """`is_batch_coupled`, or None when it cannot be tested: `x` is not floating point and no
    module receives it directly (an embedding, at whose output the test then starts)."""
    key = (structure_key(model), tensor_key(x))
    cached = _COUPLED.get(key)
    if cached is not None:
        return cached[0]
    axes = example_axes(model, x)
    root = axes.call("", 0)
    # the model's output holds one row per example (the probes' losses need it)
    output_axis = root.output if isinstance(root, Call) else ExampleAxis(0)
    params = dict(model.named_parameters())
    if x.is_floating_point():
        verdict = _couples_on_few(lambda a, p: run_privately(model, a, params=p), params, x,
                                  output_axis)
    else:
        verdict = _couples_after_lookup(model, x, axes, params, output_axis)
    _COUPLED.put(key, (verdict,))
    return verdict


def _couples_on_few(run: Run, params: Mapping[str, torch.Tensor], x: torch.Tensor,
                    output_axis: Axis | tuple[Axis, ...]) -> bool | None:
    """`couples` for the model's input `x` on its first `_FEW` examples (the verdict does not
    depend on the batch size, the cost does), on the whole batch if the model refuses that."""
    if x.shape[0] > _FEW:
        try:
            return couples(run, params, (x[:_FEW],), (ExampleAxis(0),), output_axis, _FEW)
        except Exception:  # e.g. a model written for one batch size
            pass
    return couples(run, params, (x,), (ExampleAxis(0),), output_axis, x.shape[0])


def is_batch_coupled(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether example i's output of `model` depends on the other examples of the batch `x`,
    in the model's current train/eval flags (decided by running it; see the module docstring).
    Raises ConfigError when that cannot be tested (integer input used by no module directly)."""
    verdict = batch_coupling(model, x)
    if verdict is None:
        raise ConfigError("normlab cannot tell whether the model couples the examples of a "
                          "batch: its input is not floating point and no module receives it "
                          "directly (an embedding), where the test would start.")
    return verdict


def norm_layers(model: nn.Module, x: torch.Tensor) -> NormLayers:
    """The modules of `model` whose own training flag switches batch coupling on, found by
    running each module alone on its input from `model(x)` with its own flag on and off
    (every submodule in eval mode); see the module docstring."""
    key = (structure_key(model, flags=False), tensor_key(x))
    cached = _NORMS.get(key)
    if cached is not None:
        return cached
    axes = example_axes(model, x)
    verdicts: dict[Any, str] = {}
    names, random, unknown = [], [], []
    for name, module, args, kwargs, test_key in _first_inputs(model, x):
        if test_key not in verdicts:
            call = axes.call(name, 0)
            if not isinstance(call, Call):  # e.g. a model written for one batch size
                call = _rows_first(args, x.shape[0])
            verdicts[test_key] = _verdict(module, args, kwargs, call, x.shape[0])
        verdict = verdicts[test_key]
        if verdict in ("norm", "random"):
            names.append(name)
        if verdict == "random":
            random.append(name)
        elif verdict.startswith("unknown: "):
            unknown.append((name, verdict.removeprefix("unknown: ")))
    return _NORMS.put(key, NormLayers(tuple(names), tuple(random), tuple(unknown)))


_COUPLED = LearnedCache()
_NORMS = LearnedCache()


def _verdict(module: nn.Module, args: tuple, kwargs: dict, call: Call, batch: int) -> str:
    """'norm', 'random' (a norm whose flag also switches randomness), 'not', or 'unknown: why'.

    Run on the first `_FEW` examples where the arguments allow it (every tensor argument has a
    known example axis or none, no tensor keyword): the verdict does not depend on the batch
    size, the cost does; on the whole batch if that fails."""
    if not any(isinstance(a, ExampleAxis) for a in call.called):
        return "not"  # nothing it receives depends on the batch: no batch statistics
    few = _first_examples(args, kwargs, call.called, batch)
    if few is not None:
        try:
            return _flag_switches(module, few, kwargs, call, min(batch, _FEW))
        except Exception:  # the module may need the whole batch: try that
            pass
    try:
        return _flag_switches(module, args, kwargs, call, batch)
    except Exception as err:  # the user's module may refuse to run alone
        return (f"unknown: it could not be run alone on its recorded input "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")


_FEW = 4


def _rows_first(args: tuple, batch: int) -> Call:
    """The axes `example_axes` could not find, assumed: the examples on dim 0 (consecutive
    rows) of every tensor whose dim 0 is a multiple of the batch, output included."""
    def assumed(a: Any) -> Axis:
        if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] % batch == 0:
            return ExampleAxis(0, a.shape[0] // batch)
        return None

    axes = tuple(assumed(a) for a in args)
    return Call(axes, axes, ExampleAxis(0, next((a.per_example for a in axes
                                                 if isinstance(a, ExampleAxis)), 1)))


def _first_examples(args: tuple, kwargs: dict, axes: tuple[Axis, ...], batch: int
                    ) -> tuple | None:
    """`args` cut to their first `_FEW` examples, or None when they cannot be cut safely."""
    if batch <= _FEW or _has_tensor(kwargs):
        return None
    out = []
    for a, axis in zip(args, axes, strict=False):
        if isinstance(axis, ExampleAxis):
            rows = (axis.example_of_rows(batch) < _FEW).nonzero().flatten().to(a.device)
            a = a.index_select(axis.axis, rows)
        elif isinstance(axis, str) or (axis is None and _has_tensor(a)
                                       and not isinstance(a, torch.Tensor)):
            return None
        out.append(a)
    return tuple(out) + tuple(args[len(out):])


def _has_tensor(values: Any) -> bool:
    if isinstance(values, torch.Tensor):
        return True
    if isinstance(values, (tuple, list)):
        return any(_has_tensor(v) for v in values)
    if isinstance(values, dict):
        return any(_has_tensor(v) for v in values.values())
    return False


def _flag_switches(module: nn.Module, args: tuple, kwargs: dict, call: Call, batch: int) -> str:
    """The verdict of `_verdict` on these arguments (exceptions pass through)."""
    params = dict(module.named_parameters())
    saved = [(m, m.training) for m in module.modules()]

    def run(a: tuple, p: dict[str, torch.Tensor], seed: int | None = None) -> Any:
        return run_privately(module, a, kwargs, params=p, seed=seed)

    try:
        for m in module.modules():
            m.training = False
        module.training = True
        on = couples(run, params, args, call.called, call.output, batch)
        if on is None:
            with torch.no_grad():
                same = _equal(run(args, {}, 0), _with_flag(module, False, run, args))
            return "not" if same else ("unknown: its training flag changes its output and its "
                                       "inputs are not floating point, so whether it uses batch "
                                       "statistics cannot be tested")
        if not on:
            return "not"
        module.training = False
        if couples(run, params, args, call.called, call.output, batch):
            return "not"  # coupled with the flag off too: the flag does not switch it
        module.training = True
        with torch.no_grad():
            return "norm" if _equal(run(args, {}, 1), run(args, {}, 2)) else "random"
    finally:
        for m, flag in saved:
            m.training = flag


def _with_flag(module: nn.Module, flag: bool, run: Callable, args: tuple) -> Any:
    saved = module.training
    module.training = flag
    try:
        return run(args, {}, 0)
    finally:
        module.training = saved


def _first_inputs(model: nn.Module, x: torch.Tensor
                  ) -> Iterator[tuple[str, nn.Module, tuple, dict, Any]]:
    """(name, module, args, kwargs, test key) of the first call of every module of `model(x)`
    that normlab must run to classify; arguments are copied only for a test key not seen."""
    captured: list[tuple[str, nn.Module, tuple, dict, Any]] = []
    seen: set = set()
    done: set[int] = set()

    def hook(name: str):
        def pre(module, args, kwargs):
            if id(module) in done:
                return
            done.add(id(module))
            if _known_not_norm(module):
                return
            key = (structure_key(module, flags=False), tensor_key(args), tensor_key(kwargs))
            if key in seen:
                captured.append((name, module, (), {}, key))
                return
            seen.add(key)
            captured.append((name, module, _copied(args), _copied(kwargs), key))

        return pre

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True, prepend=True)
               for n, m in model.named_modules()]
    try:
        with torch.no_grad():
            run_privately(model, (x,), seed=0)
    finally:
        for handle in handles:
            handle.remove()
    return iter(captured)


def _known_not_norm(module: nn.Module) -> bool:
    cls = type(module)
    if parametrize.is_parametrized(module):  # torch's subclass made for the parametrization
        cls = cls.__bases__[0]
    return cls.__module__.startswith("torch.nn.") and not issubclass(cls, _TORCH_STATISTICS)


def _copied(values: Any) -> Any:
    if isinstance(values, torch.Tensor):
        return values.detach().clone()
    if isinstance(values, (tuple, list)):
        return type(values)(_copied(v) for v in values)
    if isinstance(values, dict):
        return {k: _copied(v) for k, v in values.items()}
    return values


def _couples_after_lookup(model: nn.Module, x: torch.Tensor, axes, params, output_axis
                          ) -> bool | None:
    """The coupling test started at the outputs of the layers (modules without submodules)
    that receive the integer input `x` itself (embeddings): each output becomes a leaf whose
    example rows are tested."""
    leaves: list[tuple[torch.Tensor, ExampleAxis]] = []
    counts: dict[str, int] = {}

    def hook(name: str):
        def post(module, args, output):
            index = counts.get(name, 0)
            counts[name] = index + 1
            call = axes.call(name, index)
            if not (args and args[0] is x and not module._modules  # a layer, not a container
                    and isinstance(output, torch.Tensor)
                    and output.is_floating_point() and isinstance(call, Call)
                    and isinstance(call.output, ExampleAxis)):
                return None
            leaf = output.detach().clone().requires_grad_(True)
            leaves.append((leaf, call.output))
            return leaf

        return post

    handles = [m.register_forward_hook(hook(n), prepend=True) for n, m in model.named_modules()]
    generator = torch.Generator().manual_seed(0)
    moved = {n: _moved(p, generator) for n, p in params.items()}
    try:
        with torch.enable_grad():
            output = run_privately(model, (x,), params=moved)
    finally:
        for handle in handles:
            handle.remove()
    if not leaves:
        return None
    return _mixes(_paired(output, output_axis), leaves, x.shape[0], generator)


def _mixes(outputs: list[tuple[torch.Tensor, Axis]], leaves: list[tuple[torch.Tensor,
           ExampleAxis]], batch: int, generator: torch.Generator) -> bool:
    outputs = [(o, a) for o, a in outputs if o.requires_grad]
    if not outputs:
        return False
    if not all(isinstance(a, ExampleAxis) for _, a in outputs):
        return True  # an output that depends on the input without the examples' axis
    # the first and the last example watched at once where others are left to receive the
    # gradient (B >= 3: one backward), else each alone
    watched = [(0, batch - 1)] if batch >= 3 else [(e,) for e in range(batch)]
    for examples in watched:
        cotangents = [_on_examples(o, a, examples, batch, generator) for o, a in outputs]
        grads = torch.autograd.grad([o for o, _ in outputs], [leaf for leaf, _ in leaves],
                                    cotangents, retain_graph=True, allow_unused=True)
        for g, (_, axis) in zip(grads, leaves, strict=True):
            if g is not None and _reaches_others(g, axis, examples, batch):
                return True
    return False


def _paired(output: Any, axis: Axis | tuple[Axis, ...]) -> list[tuple[torch.Tensor, Axis]]:
    if isinstance(output, torch.Tensor):
        return [(output, axis)]
    if isinstance(output, (tuple, list)):
        axes = axis if isinstance(axis, tuple) else (axis,) * len(output)
        return [(o, a) for o, a in zip(output, axes, strict=False)
                if isinstance(o, torch.Tensor) and o.is_floating_point()]
    return []


def _on_examples(output: torch.Tensor, axis: ExampleAxis, examples: tuple[int, ...], batch: int,
                 generator: torch.Generator) -> torch.Tensor:
    """A random cotangent on the rows of `examples`, zero elsewhere."""
    cotangent = torch.zeros_like(output).movedim(axis.axis, 0)
    rows = torch.isin(axis.example_of_rows(batch), torch.tensor(examples)).nonzero().flatten()
    noise = torch.randn(len(rows), *cotangent.shape[1:], generator=generator, dtype=output.dtype)
    cotangent[rows.to(output.device)] = noise.to(output.device)
    return cotangent.movedim(0, axis.axis)


def _reaches_others(grad: torch.Tensor, axis: ExampleAxis, examples: tuple[int, ...],
                    batch: int) -> bool:
    others = ~torch.isin(axis.example_of_rows(batch), torch.tensor(examples)).to(grad.device)
    return bool((grad.movedim(axis.axis, 0)[others] != 0).any())


def _moved(p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`p` plus a random step of 1e-3 of its mean magnitude (1e-3 if it is zero)."""
    p = p.detach()
    if not p.is_floating_point() or p.numel() == 0:
        return p
    size = float(p.abs().mean())
    step = 1e-3 * (size if size > 0 else 1.0)
    return p + step * torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) \
            and all(_equal(u, v) for u, v in zip(a, b, strict=True))
    return True
