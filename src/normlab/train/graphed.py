"""CUDA-graph training: one SGD step, and the test evaluation, recorded once and replayed.

On a GPU a small model's step is bound by kernel launches, not by arithmetic (ResNet-20 at batch
128 runs at under half the images/s of batch 1024 on an H200). A CUDA graph
(`torch.cuda.CUDAGraph`) records every kernel of a step once and replays them with one launch.

What is captured (`StaticStep`): forward in train mode (batch statistics; BN running statistics
updated as in eager mode), mean cross-entropy in float32, backward (`torch.autograd.grad`, so no
`.grad` attribute is touched), weight decay, momentum (+ Nesterov), the parameter update with
the learning rate read from a device table of the schedule, and the step's loss and number of
correct predictions written to a device ring that the trainer reads back in windows. The
divergence check runs on those read-backs, per step, with the same `check_divergence` as the
eager loop. Outside the graph, per step: the `BatchIterator` (data, augmentation and crops on
the device) copies its batch into the static input buffers, and BatchRenorm's r/d limits
(device buffers) are set by `set_training_fraction`, as in the eager loop.

Exact by construction: the graph replays `StaticStep.__call__`, the same Python function that
runs eagerly on a CPU (`options.cuda_graph="eager"`). On a CPU that function gives the same
numbers as the eager loop with `torch.optim.SGD` bit for bit (tests/test_graphed.py); on a GPU
the captured and uncaptured step are compared in the `device` tests.

Cost: per step, two copies (x, y) and one graph launch; once, 3 eager warm-up steps (real
training steps, on a side stream as torch's CUDA-graph docs require) and one capture.

User hooks (`hooks_refusal`): a module hook runs while a graph is recorded, never when it
replays. A model that carries one is not captured; its step runs eagerly and says why.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from normlab.utils.config import ConfigError, choice_problem

CUDA_GRAPH_SETTINGS = ("auto", "on", "off", "eager")
RING = 64  # per-step loss slots; at least the trainer's read-back window (32 steps)
WARMUP_STEPS = 3  # eager steps before capture (torch's docs: a few, on a side stream)


def sgd_update_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                momentum_buffers: Sequence[torch.Tensor], lr: torch.Tensor, *,
                momentum: float, weight_decay: float, nesterov: bool) -> None:
    """torch.optim.SGD's update (dampening 0, coupled weight decay), in place, with `lr` a
    0-d tensor so that a changing learning rate needs no host value:

        g = grad + weight_decay * p;  b = momentum * b + g;  d = g + momentum * b if nesterov
        else b;  p = p - lr * d

    `momentum_buffers` start at zero (equal to SGD's first step, which copies g); empty when
    momentum is 0. Same float32 roundings as torch.optim.SGD on a CPU (p + d * (-lr) in one
    operation). Cost: a few foreach kernels over the parameters.
    """
    if weight_decay:
        grads = torch._foreach_add(list(grads), list(params), alpha=weight_decay)
    directions = list(grads)
    if momentum:
        torch._foreach_mul_(list(momentum_buffers), momentum)
        torch._foreach_add_(list(momentum_buffers), directions)
        directions = (torch._foreach_add(directions, list(momentum_buffers), alpha=momentum)
                      if nesterov else list(momentum_buffers))
    neg_lr = -lr
    torch._foreach_addcmul_(list(params), directions, [neg_lr] * len(directions))


class StaticStep:
    """One SGD step of `model` on the batch in the fixed tensors `x`, `y`: a function of fixed
    tensors only, so that it can be recorded in a CUDA graph and replayed.

    Contract (for the trainer here and for any other trainer that reuses it):
    - reads `x`, `y` (allocated on the first `load`; later batches are copied into them),
      `lrs[step_index]` (the learning-rate table of the schedule, float32, on the device),
      the model's parameters and buffers and the momentum buffers;
    - writes in place the parameters, the buffers (BN running statistics), the momentum buffers,
      `losses[step_index % RING]`, `correct[step_index % RING]`, and `step_index += 1`;
    - never synchronizes with the host and branches on no tensor value.
    Train mode, cross-entropy of `model(x).float()` (bf16 autocast when `autocast` is set), SGD
    as `optimizer`'s single param group says (dampening must be 0). The momentum buffers are
    stored in `optimizer.state` (existing ones are reused), so the optimizer's state_dict
    stays current. Cost: one forward and backward, one SGD update, two scalar writes.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, lrs: torch.Tensor,
                 *, start_step: int = 0, autocast: torch.dtype | None = None) -> None:
        if len(optimizer.param_groups) != 1:
            raise ValueError("StaticStep supports one parameter group; "
                             f"got {len(optimizer.param_groups)}.")
        group = optimizer.param_groups[0]
        if group.get("dampening", 0):
            raise ValueError(f"StaticStep needs SGD with dampening 0; got {group['dampening']}.")
        self.model, self.autocast = model, autocast
        self.params: list[torch.Tensor] = list(group["params"])
        self.momentum = float(group["momentum"])
        self.weight_decay = float(group["weight_decay"])
        self.nesterov = bool(group["nesterov"])
        self.momentum_buffers: list[torch.Tensor] = []
        if self.momentum:
            for p in self.params:
                state = optimizer.state[p]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(p)
                self.momentum_buffers.append(state["momentum_buffer"])
        device = self.params[0].device
        self.lrs = lrs.to(device=device, dtype=torch.float32)
        self.step_index = torch.tensor([start_step], device=device)  # (1,) int64
        self.losses = torch.zeros(RING, device=device)
        self.correct = torch.zeros(RING, device=device, dtype=torch.long)
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None

    def load(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Copy a batch into the static inputs (allocated like the first batch: shape, dtype,
        memory format)."""
        if self.x is None or self.y is None:
            self.x, self.y = torch.empty_like(x), torch.empty_like(y)
        self.x.copy_(x)
        self.y.copy_(y)

    def __call__(self) -> None:
        assert self.x is not None and self.y is not None, "load() a batch first"
        lr = self.lrs.index_select(0, self.step_index).reshape(())
        with (torch.autocast(self.x.device.type, dtype=self.autocast, cache_enabled=False)
              if self.autocast is not None else contextlib.nullcontext()):
            logits = self.model(self.x).float()  # (B, classes)
        loss = F.cross_entropy(logits, self.y)
        grads = torch.autograd.grad(loss, self.params)
        with torch.no_grad():
            sgd_update_(self.params, grads, self.momentum_buffers, lr, momentum=self.momentum,
                        weight_decay=self.weight_decay, nesterov=self.nesterov)
            slot = self.step_index % RING
            self.losses.index_copy_(0, slot, loss.detach().reshape(1))
            self.correct.index_copy_(0, slot, (logits.argmax(dim=1) == self.y).sum().reshape(1))
            self.step_index += 1


class CapturedCall:
    """`fn()` recorded in a CUDA graph and replayed; eager while `capture` is False.

    With `capture`, the first `warmup` calls run `fn` eagerly on a side stream (torch's rule
    for capture: lazy initializations happen there, not in the graph); the next call records
    `fn` once and replays it; later calls replay. Warm-up and capture run with cuDNN's
    autotuning on (`cudnn_autotuned`). The value returned after capture is the one
    `fn` returned while being recorded: the same tensors, refilled by each replay.
    The call is not captured, and runs eagerly now and later with `refused` keeping the reason
    (recorded in the run's provenance, and warned), where CUDA refuses the capture (an
    operation that cannot be recorded, such as a host synchronization; nothing has run then)
    or where a module of `modules` (the ones `fn` runs) carries a user hook (`hooks_refusal`,
    asked at every call until the capture: a hook runs while a graph is recorded, never when
    it replays, so its effect would be frozen or lost). `pool` (a callable that
    returns a `torch.cuda.graph_pool_handle()`, called at capture) lets several calls share one
    memory pool; safe when each call's outputs are read before another of them replays (a
    replay may overwrite what another graph returned).
    """

    def __init__(self, fn: Callable[[], Any], *, capture: bool, warmup: int,
                 what: str = "the step", modules: Sequence[object] = (),
                 pool: Callable[[], Any] | None = None) -> None:
        self.fn, self.capture, self.warmup, self.what = fn, capture, warmup, what
        self.modules, self.pool = tuple(modules), pool
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: Any = None
        self.refused: str | None = None

    def __call__(self) -> Any:
        if not self.capture:
            return self.fn()
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        refusal = hooks_refusal(*self.modules)
        if refusal:
            return self._refuse(refusal)
        with cudnn_autotuned():
            if self.calls < self.warmup:
                self.calls += 1
                return on_side_stream(self.fn)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self.pool() if self.pool else None):
                    self.outputs = self.fn()
            except RuntimeError as err:  # recorded, not run: the state is as before the call
                return self._refuse(f"CUDA refused the capture: {type(err).__name__}: {err}")
            self.graph = graph
        self.graph.replay()
        return self.outputs

    def _refuse(self, reason: str) -> Any:
        """Give up the capture for good: say why, and run `fn` eagerly (now and later)."""
        self.capture, self.refused = False, reason
        warnings.warn(f"Not captured in a CUDA graph, {self.what} runs eagerly: {reason}",
                      RuntimeWarning, stacklevel=3)
        return self.fn()


def hooks_refusal(*modules: object) -> str | None:
    """Why a call that runs `modules` must not be captured in a CUDA graph: their user hooks
    (`capture_hooks`), named; None when they have none. Checked before every capture (the
    training step, the Hessian-vector products, the per-example rows)."""
    hooks = capture_hooks(*modules)
    if not hooks:
        return None
    return ("user hooks run only while a CUDA graph is recorded, never when it replays: "
            + "; ".join(hooks))


def capture_hooks(*modules: object) -> list[str]:
    """The hooks that would run only while a CUDA graph is recorded, never when it replays: the
    forward, forward-pre, backward and backward-pre hooks of every submodule of `modules`
    (objects that are not modules are skipped), named by hook and module ("forward hook 'log'
    on 'stage1.conv' (Conv2d)"), and torch's global module hooks. Cost: one walk over the
    modules."""
    kinds = (("forward pre-hook", "_forward_pre_hooks"), ("forward hook", "_forward_hooks"),
             ("backward hook", "_backward_hooks"), ("backward pre-hook", "_backward_pre_hooks"))
    found = [f"global {kind} {_hook_name(hook)!r}" for kind, attribute in kinds
             for hook in getattr(torch_module, f"_global{attribute}").values()]
    for root in modules:
        if not isinstance(root, nn.Module):
            continue
        for name, module in root.named_modules():
            found += [f"{kind} {_hook_name(hook)!r} on {name or 'the model'!r} "
                      f"({type(module).__name__})" for kind, attribute in kinds
                      for hook in getattr(module, attribute).values()]
    return found


def _hook_name(hook: object) -> str:
    return getattr(hook, "__qualname__", None) or type(hook).__name__


def on_side_stream(fn: Callable[[], Any]) -> Any:
    """`fn()` on a fresh CUDA stream, ordered after and before the current stream's work: how
    torch's CUDA-graph docs want the eager warm-up before a capture (lazy initializations,
    cuDNN's autotuning and allocator state happen there, not in the graph)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream().wait_stream(side)
    return out


def step_provenance(step_path: str, calls: list[CapturedCall]) -> dict[str, str]:
    """Provenance of the step a run took: `step_path`, or "step_function" where CUDA refused to
    capture one of `calls` (with the first reason, as "cuda_graph_refused")."""
    refused = [c.refused for c in calls if c.refused]
    if not refused:
        return {"train_step": step_path}
    return {"train_step": "step_function", "cuda_graph_refused": refused[0]}


@contextlib.contextmanager
def cudnn_autotuned() -> Iterator[None]:
    """cuDNN times its convolution algorithms for each shape and keeps the fastest
    (`torch.backends.cudnn.benchmark`) inside the block; the previous setting is restored.
    Used for the warm-up calls and the capture, so the graph records the fastest kernels.
    A kernel choice, not a different function (float32 rounding aside). Off in a deterministic
    run (`cudnn.deterministic`, train/numerics.py): a choice by timing may differ between runs.
    """
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = not torch.backends.cudnn.deterministic
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


class GraphedStep:
    """The trainer's view: `step(x, y)` runs one `StaticStep` (captured or eager) on (x, y)
    and returns (loss, correct) as 0-d device tensors, valid until RING more steps have run.
    """

    def __init__(self, static: StaticStep, *, capture: bool) -> None:
        self.static = static
        self.call = CapturedCall(static, capture=capture, warmup=WARMUP_STEPS,
                                 modules=(static.model,))
        self.next_step = int(static.step_index.item())

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.static.load(x, y)
        self.call()
        slot = self.next_step % RING
        self.next_step += 1
        return self.static.losses[slot], self.static.correct[slot]


def cuda_graph_path(setting: Any, device: torch.device, *, callbacks: bool,
                    update_projection: str, compile: bool) -> str:
    """Which step a run takes for `options.cuda_graph` = `setting`:
    "cuda_graph" (StaticStep captured), "step_function" (StaticStep eager) or "optimizer"
    (the eager loop with torch.optim.SGD).

    "auto": a graph on CUDA unless something needs the eager loop (callbacks or probes, which
    get the model and the loss between steps; an update projection, which acts between
    optimizer steps; `compile`); else the optimizer loop. "on" and "eager" raise ConfigError
    when something prevents them; "off" is the optimizer loop.
    """
    if setting not in CUDA_GRAPH_SETTINGS:
        raise ConfigError(choice_problem("options.cuda_graph", setting, CUDA_GRAPH_SETTINGS))
    blockers = [reason for reason, present in (
        ("callbacks or probes (they run between steps with the loss on the host)", callbacks),
        (f"update_projection={update_projection!r}", update_projection != "none"),
        ("compile=True", compile),
    ) if present]
    if setting == "on" and device.type != "cuda":
        blockers.append(f"device {str(device)!r} (a CUDA graph needs a CUDA device)")
    if setting in ("on", "eager") and blockers:
        raise ConfigError(f"The 'options.cuda_graph' setting {setting!r} cannot be used with "
                          f"{'; '.join(blockers)}. Use 'auto' or 'off'.")
    if setting == "off" or (setting == "auto" and (blockers or device.type != "cuda")):
        return "optimizer"
    return "step_function" if setting == "eager" else "cuda_graph"
