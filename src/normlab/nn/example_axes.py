"""Where the examples are in every tensor a model's modules see, found by running the model.

normlab does not assume that dim 0 of a layer's input indexes the examples of the batch: a
layer may see (B*T, D) (tokens or frames folded into the batch), (T, B, D) (sequence first), or
a tensor that does not depend on the batch at all (a learned query). `example_axes(model, x)`
runs the model on the batch x and on x concatenated with itself, records the shapes of the
tensors of every module call, and reads the example axis of each from them: the one dimension
whose size doubles. When that size is k*B, each example owns k rows along it, either
consecutive ((B, T) folded) or strided ((T, B) folded); which of the two is read in the doubled
run, whose second half of examples repeats the first. A tensor whose shape changes otherwise,
or whose rows cannot be told apart, gets a sentence saying why instead of an axis.

Cost: two forwards without gradients on private copies of the buffers (nothing the model
holds changes, the RNG is restored), in the model's current train/eval flags; cached per model
structure and input shape (`_probing.structure_key`). User hooks run during both forwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from normlab.nn._probing import LearnedCache, run_privately, structure_key, tensor_key


@dataclass(frozen=True)
class ExampleAxis:
    """The dimension `axis` of a tensor indexes the examples; each example owns `per_example`
    rows along it: consecutive ((B, k) folded) or, when `strided`, one row in each of k groups
    of all B examples ((k, B) folded)."""

    axis: int
    per_example: int = 1
    strided: bool = False

    def example_of_rows(self, batch: int, device: torch.device | None = None) -> torch.Tensor:
        """The example each row along `axis` belongs to, shape (batch * per_example,)."""
        rows = torch.arange(batch * self.per_example, device=device)
        return rows % batch if self.strided else rows // self.per_example

    def to_examples(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """`t` with the examples first and their rows second: (B, per_example, *other dims)."""
        t = t.movedim(self.axis, 0)
        if self.strided:
            return t.reshape(self.per_example, batch, *t.shape[1:]).transpose(0, 1)
        return t.reshape(batch, self.per_example, *t.shape[1:])


# What is known of one tensor: its ExampleAxis; None when it does not depend on the batch (or
# is not a tensor); or a sentence saying why normlab cannot tell.
Axis = ExampleAxis | str | None


@dataclass(frozen=True)
class Call:
    """One call of a module: the axes of its positional arguments as called (`called`, before
    its forward pre-hooks) and as its forward received them (`received`), and of its output
    (a tuple for a tuple or list output) before its forward hooks change it."""

    called: tuple[Axis, ...]
    received: tuple[Axis, ...]
    output: Axis | tuple[Axis, ...]


@dataclass(frozen=True)
class ExampleAxes:
    """The calls of every module (by name, in call order) on the batch they were found on;
    `failure` says why none could be found (the model does not run on the doubled batch)."""

    batch: int
    calls: dict[str, tuple[Call, ...]] = field(default_factory=dict)
    failure: str | None = None

    def call(self, name: str, index: int) -> Call | str:
        """The `index`-th call of module `name`, or why normlab does not know its axes."""
        if self.failure is not None:
            return self.failure
        calls = self.calls.get(name, ())
        if index >= len(calls):
            return (f"{name or 'the model'} was called {len(calls)} time(s) on the batch twice "
                    f"over, not {index + 1}")
        return calls[index]


_CACHE = LearnedCache()


def example_axes(model: nn.Module, x: torch.Tensor) -> ExampleAxes:
    """The example axis of the arguments and output of every module call of `model(x)` (see
    the module docstring); two forwards without gradients, cached."""
    key = (structure_key(model), tensor_key(x))
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    batch = x.shape[0]
    shapes: dict[str, list[tuple]] = {}
    with _recording(model, _shape_hooks(shapes)), torch.no_grad():
        run_privately(model, (x,), seed=0)
    calls: dict[str, list[Call]] = {}
    try:
        with _recording(model, _axis_hooks(shapes, calls, batch)), torch.no_grad():
            run_privately(model, (torch.cat([x, x]),), seed=0)
    except Exception as err:  # any failure of the user's forward on 2B examples
        failure = (f"the model did not run on the batch twice over, which normlab needs to "
                   f"find the example axis of each layer ({type(err).__name__}: "
                   f"{str(err).splitlines()[0] if str(err) else ''})")
        return _CACHE.put(key, ExampleAxes(batch, failure=failure))
    return _CACHE.put(key, ExampleAxes(batch, {k: tuple(v) for k, v in calls.items()}))


@contextmanager
def _recording(model: nn.Module, hooks) -> Iterator[None]:
    """Register (pre_hook, hook) made by `hooks(name)` on every module, first in line."""
    handles = []
    try:
        for name, module in model.named_modules():
            pre, post = hooks(name)
            handles.append(module.register_forward_pre_hook(pre, prepend=True))
            handles.append(module.register_forward_hook(post, prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _shapes(values: Any) -> Any:
    if isinstance(values, torch.Tensor):
        return tuple(values.shape)
    if isinstance(values, (tuple, list)):
        return tuple(_shapes(v) if isinstance(v, torch.Tensor) else None for v in values)
    return None


def _shape_hooks(shapes: dict[str, list[tuple]]):
    def hooks(name: str):
        pending: list[Any] = []

        def pre(_module, args):
            pending.append(_shapes(args))

        def post(_module, args, output):
            shapes.setdefault(name, []).append((pending.pop(), _shapes(args), _shapes(output)))

        return pre, post

    return hooks


def _axis_hooks(shapes: dict[str, list[tuple]], calls: dict[str, list[Call]], batch: int):
    def hooks(name: str):
        pending: list[Any] = []

        def reference(index: int) -> tuple | None:
            seen = shapes.get(name, [])
            return seen[index] if index < len(seen) else None

        def pre(_module, args):
            ref = reference(len(pending) + len(calls.get(name, [])))
            pending.append(_axes(args, None if ref is None else ref[0], batch))

        def post(_module, args, output):
            ref = reference(len(calls.get(name, [])))
            called = pending.pop()
            received = _axes(args, None if ref is None else ref[1], batch)
            if isinstance(output, torch.Tensor):
                out = _axis(None if ref is None else ref[2], output, batch)
            else:
                out = _axes(output, None if ref is None else ref[2], batch)
            calls.setdefault(name, []).append(Call(called, received, out))

        return pre, post

    return hooks


def _axes(values: Any, reference: tuple | None, batch: int) -> tuple[Axis, ...]:
    if not isinstance(values, (tuple, list)):
        return ()
    ref = reference if isinstance(reference, tuple) else ()
    return tuple(_axis(ref[i] if i < len(ref) else None, v, batch)
                 if isinstance(v, torch.Tensor) else None for i, v in enumerate(values))


def _axis(before: tuple | None, after: torch.Tensor, batch: int) -> Axis:
    """The example axis of `after` (on 2B examples) given its shape `before` (on B)."""
    now = tuple(after.shape)
    if not isinstance(before, tuple) or not all(isinstance(n, int) for n in before):
        return f"it was not a tensor, or not there, on the batch of {batch}"
    if before == now:
        return None
    grown = [d for d in range(len(before)) if len(before) == len(now) and before[d] != now[d]]
    if len(grown) != 1 or now[grown[0]] != 2 * before[grown[0]] or before[grown[0]] % batch:
        return (f"its shape {before} at a batch of {batch} became {now} at {2 * batch}: not "
                f"one dimension that grows with the batch")
    axis = grown[0]
    per_example = before[axis] // batch
    if per_example == 1:
        return ExampleAxis(axis)
    return _folded(after, axis, per_example, batch)


def _folded(after: torch.Tensor, axis: int, per_example: int, batch: int) -> Axis:
    """Consecutive or strided rows: in the doubled batch, the rows of examples B..2B-1 repeat
    those of 0..B-1, at an offset of k*B rows (consecutive) or of B rows within each of the k
    groups (strided)."""
    rows = after.detach().movedim(axis, 0)
    halves = rows.reshape(2, per_example * batch, -1)
    groups = rows.reshape(per_example, 2, batch, -1)
    consecutive = _alike(halves[0], halves[1])
    strided = _alike(groups[:, 0], groups[:, 1])
    if consecutive != strided:
        return ExampleAxis(axis, per_example, strided)
    shape = tuple(after.shape)
    if consecutive:
        return (f"its {per_example * 2 * batch} rows along dim {axis} (shape {shape} at a batch "
                f"of {2 * batch}) are alike, so the rows of each example cannot be told apart")
    return (f"dim {axis} holds {per_example} rows per example (shape {shape} at a batch of "
            f"{2 * batch}), neither as (B, {per_example}) nor as ({per_example}, B) folded")


def _alike(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    scale = float(a.abs().max()) if a.numel() else 0.0
    return bool((a - b).abs().max() <= 1e-4 * scale) if a.numel() else True
