"""`train_packed(specs)`: K compatible runs trained as one computation, each exactly as alone.

What is shared and what may differ is `normlab.train.packable.pack_key` (architecture, data,
batch size, budget, device and numerics shared; lr, schedule, momentum, Nesterov, weight decay,
init, seed, update projection, probes, ... per member).

How: each member's model is built exactly as `train` builds it (its seed, init and gain), then
the K models' parameters and buffers are stacked along a new leading dimension
(`torch.func.stack_module_state`), and one step is `vmap` over `functional_call` of a template
module: the member's own mini-batch (own data order and augmentation) through the member's own
weights. Under vmap a convolution with batched weights and batched input becomes one grouped
convolution, a BatchNorm normalizes each member over its own batch and updates its own running
statistics in place (the stacked buffers are batched too), and BatchRenorm does the same with its
r/d limits (a stacked buffer each member's module fills as in a solo run). The loss of the
pack is the sum of the members' mean cross-entropies, so member k's gradient is exactly its own.
SGD (momentum, Nesterov, coupled weight decay as torch.optim.SGD computes them) runs on the
stacked tensors with per-member hyper-parameters of shape (K,), and the update projection per
member. Per step and member this is the same arithmetic as a solo run: the numbers agree up to
float reassociation (grouped instead of single convolutions, fused multiply-adds).

Each member also has an ordinary `nn.Module` whose parameters and buffers are views into its
slice of the stacked tensors, so callbacks and probes see the member's model as it is, with an
`torch.optim.SGD` of the member's settings, its own batch and its own global-RNG state (seeded
and advanced as in the solo run). A member that diverges is recorded at the step where it would
be alone and is masked (its weights stop changing); when at least half of the stacked members
have stopped the stack shrinks to the live ones. Cost per step: one vmapped forward and
backward of K models (about K solo steps of arithmetic in one computation), a few elementwise
passes over the parameters for SGD and masking.

Checkpoints: each live member writes, into its own run folder, the checkpoint a solo run writes
(train/checkpoint.py: its model and momentum, global-RNG state, data position, epoch averages,
callback states), all at the same step. A pack resumes members that stand at one step: each
member's module is loaded from its checkpoint before the stack is built, and the stacked
momentum from their momentum buffers. `execute_pack` groups its members by where they stand:
a run the plain loop checkpointed continues by the plain loop, the others one pack per
checkpoint step.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from normlab.data import load
from normlab.nn import set_training_fraction
from normlab.nn.geometry import radial_part, tangential_part
from normlab.runs.lease import Lease, claimed
from normlab.runs.live import LiveLog, open_stream
from normlab.runs.result import RunResult, numerics, provenance
from normlab.runs.spec import RunSpec
from normlab.runs.store import RunStore
from normlab.runs.tasks import ProgressFn, RunContext, run_claimed
from normlab.train.build import (
    build_batches,
    build_model,
    build_optimizer,
    resolve_device,
    train_options,
)
from normlab.train.callbacks import Callback, TrainState, scheduled
from normlab.train.checkpoint import CheckpointClock, RunCheckpoint, checkpoint_step
from normlab.train.divergence import Divergence
from normlab.train.graphed import (
    WARMUP_STEPS,
    CapturedCall,
    capture_hooks,
    cuda_graph_path,
    step_provenance,
)
from normlab.train.invariance import pack_threads, stack_rows
from normlab.train.loop import (
    READ_WINDOW,
    _EpochAverage,
    diverged_result,
    log_eval_row,
    record_steps,
)
from normlab.train.numerics import run_numerics
from normlab.train.packable import pack_key
from normlab.train.projection import projected_weights
from normlab.train.schedules import lr_at
from normlab.utils.config import ConfigError
from normlab.utils.silence import silenced

OnDone = Callable[[int, RunResult], None]
# said with the error of a crashed pack: a researcher's own layer may not be vmappable
PLAIN_LOOP_HINT = ("normlab trained this run as a pack (torch.func.vmap over stacked models, "
                   "also a lone run on a CPU); a model that cannot be vmapped trains by the "
                   "plain loop with --set options='{\"plain_loop\": true}'")


def _hooks_refusal(*models: nn.Module) -> str | None:
    """Why `models` cannot be trained in a pack: their user hooks (and torch's global module
    hooks, `graphed.capture_hooks`), named; None when they have none. A pack's step runs one
    vmapped copy of the model, never the members' own modules, so such a hook would not run or
    would see every member at once. Cost: one walk over the modules."""
    hooks = capture_hooks(*models)
    if not hooks:
        return None
    return ("A pack's step runs one vmapped copy of the model, never the members' modules, so "
            "these hooks would not run in it (or would see every member at once): "
            + "; ".join(hooks) + ". Train such a run by the plain loop: --set "
            "options='{\"plain_loop\": true}'.")


# torch's UserWarning that an op (BatchRenorm's in-place `lerp_` of its running statistics) has
# no vmap batching rule and runs as a loop over the members: the numbers are the same, only
# slower, and the warning (which asks users to file a torch issue) would reach the progress
# display once per pack; silenced around the vmapped calls.
BATCHING_RULE_WARNING = ("There is a performance drop because we have not yet implemented the "
                         "batching rule")


@dataclass
class _Member:
    """One run of the pack: its spec, reporting channel, model view and bookkeeping."""

    spec: RunSpec
    context: RunContext
    callbacks: list[Callback]
    batches: Any
    model: nn.Module
    optimizer: torch.optim.SGD
    rng: dict[str, torch.Tensor]
    checkpoint: RunCheckpoint
    average: _EpochAverage = field(default_factory=_EpochAverage)
    final: dict[str, Any] = field(default_factory=dict)
    last_lr: float = 0.0
    last_loss: float | None = None
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    result: RunResult | None = None


class PackedSGD:
    """The pure step of a pack over stacked state: forward, loss, backward and SGD update.

    State (all tensors with a leading member dimension K, updated in place so that a CUDA graph
    can capture `step` after its first call): `flat` (K, P), every parameter of every member in
    one buffer, with `params` its per-tensor views (K, *shape); `buffers`; `momentum` (K, P),
    created by the first step; and per member `momentum_coef`, `weight_decay`, `nesterov`,
    `active` (masked members keep their weights). `projections` maps stacked indices to
    "tangential"/"radial". The flat buffer makes the SGD update a few kernels over (K, P)
    instead of a few per parameter tensor (a step on a GPU is launch-bound at small K).

    The K members may be followed by ghost rows (`normlab.train.invariance.stack_rows`: on a
    CPU, stacks of an odd size or of fewer than four round some members unlike larger ones):
    copies of the first member, masked from the start, fed its batch and never read. Inputs
    and outputs of `step` and `evaluate` have the K members' rows only.
    """

    def __init__(self, template: nn.Module, models: Sequence[nn.Module],
                 specs: Sequence[RunSpec], autocast: str) -> None:
        self.members = len(models)
        self.device = next(iter(models[0].parameters())).device
        ghosts = stack_rows(self.device, len(models)) - len(models)
        models, specs = [*models, *[models[0]] * ghosts], [*specs, *[specs[0]] * ghosts]
        params, buffers = stack_module_state(list(models))
        self.template = template
        self.shapes = {n: p.shape[1:] for n, p in params.items()}
        self.flat = torch.cat([p.detach().flatten(1) for p in params.values()], dim=1)  # (K, P)
        self.params = self._views(self.flat)
        self.buffers = buffers
        self.momentum: torch.Tensor | None = None
        device = self.device
        self.momentum_coef = torch.tensor([s.momentum for s in specs], device=device)
        self.weight_decay = torch.tensor([s.weight_decay for s in specs], device=device)
        self.nesterov = torch.tensor([s.nesterov for s in specs], device=device)
        self.active = torch.arange(len(specs), device=device) < self.members
        self.projections = {k: s.update_projection for k, s in enumerate(specs[:self.members])
                            if s.update_projection != "none"}
        names = {id(p): n for n, p in template.named_parameters()}
        self.projected = [names[id(w)] for w in projected_weights(template)]
        self.autocast = autocast

    def _views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-tensor views (K, *shape) of a (K, P) buffer, in parameter order."""
        views, start = {}, 0
        for name, shape in self.shapes.items():
            size = shape.numel()
            views[name] = flat[:, start:start + size].view(flat.shape[0], *shape)
            start += size
        return views

    def _member_loss(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                     x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with _autocast(self.autocast, x.device):
            logits = functional_call(self.template, (params, buffers), (x,)).float()
        return F.cross_entropy(logits, y), (logits.argmax(dim=1) == y).sum()

    def padded(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-member `rows` (K, ...) with the first member's row repeated for each ghost."""
        ghosts = self.flat.shape[0] - self.members
        if not ghosts:
            return rows
        return torch.cat([rows, rows[:1].expand(ghosts, *rows.shape[1:])])

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step of every member on its batch x[k], y[k] with lr[k]; returns the (K,)
        mini-batch losses and correct counts measured before the update (train mode)."""
        x, y, lr = self.padded(x), self.padded(y), self.padded(lr)
        leaves = {n: p.detach().requires_grad_(True) for n, p in self.params.items()}
        with silenced(BATCHING_RULE_WARNING):
            losses, correct = vmap(self._member_loss)(leaves, self.buffers, x, y)
        grads = torch.autograd.grad(losses.sum(), list(leaves.values()))
        with torch.no_grad():
            saved = {(k, n): self.params[n][k].clone() for k in self.projections
                     for n in self.projected}
            grad = torch.cat([g.flatten(1) for g in grads], dim=1)  # (K, P)
            self._update(grad, lr)
            for (k, name), before in saved.items():
                part = tangential_part if self.projections[k] == "tangential" else radial_part
                w = self.params[name][k]
                w.copy_(before + part(w - before, before, "filter"))
        return losses.detach()[:self.members], correct[:self.members]

    def _update(self, grad: torch.Tensor, lr: torch.Tensor) -> None:
        """torch.optim.SGD's update (dampening 0) of the (K, P) parameters, per member, masked
        by `active`; the first call creates the momentum buffer as torch does (buf = d_p)."""
        p, m, active = self.flat, self.momentum_coef[:, None], self.active[:, None]
        d_p = grad + self.weight_decay[:, None] * p
        if self.momentum is None:
            self.momentum = torch.zeros_like(p)
            new_buf = d_p
        else:
            new_buf = m * self.momentum + d_p
        direction = torch.where(self.nesterov[:, None], d_p + m * new_buf, new_buf)
        direction = torch.where(m > 0, direction, d_p)
        self.momentum.copy_(torch.where(active, new_buf, self.momentum))
        p.copy_(torch.where(active, p - lr[:, None] * direction, p))

    @torch.no_grad()
    def evaluate(self, x_all: torch.Tensor, y_all: torch.Tensor, chunk: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(K,) summed cross-entropy and correct counts on (x_all, y_all), template in eval mode
        (BatchNorm/BatchRenorm use each member's running statistics)."""
        self.template.eval()
        k = self.active.numel()
        loss_sum = torch.zeros(k, device=x_all.device)
        correct = torch.zeros(k, device=x_all.device, dtype=torch.long)

        def member(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                   x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with _autocast(self.autocast, x.device):
                logits = functional_call(self.template, (params, buffers), (x,)).float()
            return (F.cross_entropy(logits, y, reduction="sum"),
                    (logits.argmax(dim=1) == y).sum())

        try:
            for start in range(0, len(y_all), chunk):
                x, y = x_all[start:start + chunk], y_all[start:start + chunk]
                # the chunk repeated per member: with an unbatched input and batched weights,
                # vmap's convolution output has strides group_norm cannot query under vmap
                x = x.unsqueeze(0).expand(k, *x.shape).contiguous()  # (K, n, C, H, W)
                with silenced(BATCHING_RULE_WARNING):
                    losses, hits = vmap(member, in_dims=(0, 0, 0, None))(
                        self.params, self.buffers, x, y)
                loss_sum += losses
                correct += hits
        finally:
            self.template.train()
        return loss_sum[:self.members], correct[:self.members]

    def keep(self, index: torch.Tensor) -> None:
        """Shrink the stack to the members at `index` (copies; views must be re-pointed), with
        the ghost rows `stack_rows` asks for."""
        members = index.numel()
        ghosts = stack_rows(self.device, members) - members
        positions = index.tolist()
        index = torch.cat([index, index[:1].expand(ghosts)])
        self.flat = self.flat.index_select(0, index)
        self.params = self._views(self.flat)
        if self.momentum is not None:
            self.momentum = self.momentum.index_select(0, index)
        for name in self.buffers:
            self.buffers[name] = self.buffers[name].index_select(0, index)
        for name in ("momentum_coef", "weight_decay", "nesterov", "active"):
            setattr(self, name, getattr(self, name).index_select(0, index))
        self.members = members
        self.active[members:] = False
        self.projections = {positions.index(k): kind for k, kind in self.projections.items()
                            if k in positions}


class PackStep:
    """`PackedSGD.step` on static inputs, recorded in a CUDA graph and replayed when `capture`
    (the same function eagerly otherwise, so a captured pack is exact by construction).

    Each call copies the batch (K, B, ...) and the lrs (K,) into fixed buffers, runs the step
    (the first `WARMUP_STEPS` eagerly on a side stream, which also creates the momentum buffer,
    then one capture, then replays) and returns copies of the (K,) losses and correct counts,
    which later replays overwrite. A pack that shrinks re-stacks its state, so it needs a new
    `PackStep`. Cost per step: three copies in, two out, and one graph launch.
    """

    def __init__(self, sgd: PackedSGD, *, capture: bool) -> None:
        self.sgd = sgd
        self.inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.call = CapturedCall(self._step, capture=capture, warmup=WARMUP_STEPS)

    def _step(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.inputs is not None
        return self.sgd.step(*self.inputs)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inputs is None:
            self.inputs = (torch.empty_like(x), torch.empty_like(y), torch.empty_like(lr))
        for fixed, value in zip(self.inputs, (x, y, lr), strict=True):
            fixed.copy_(value)
        losses, correct = self.call()
        return losses.clone(), correct.clone()


def _autocast(kind: str, device: torch.device) -> contextlib.AbstractContextManager:
    if kind == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _point_into(model: nn.Module, sgd: PackedSGD, k: int) -> None:
    """Make `model`'s parameters, buffers and momentum buffers views of slice k of the stack."""
    for name, p in model.named_parameters():
        p.data = sgd.params[name][k]
    for name in dict(model.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = sgd.buffers[name][k]


def _momentum_of(member: _Member) -> torch.Tensor:
    """The member's momentum buffers as one (P,) vector in parameter order (zeros where its
    optimizer has none: momentum 0)."""
    state = member.optimizer.state
    buffers = [state.get(p, {}).get("momentum_buffer") for p in member.model.parameters()]
    return torch.cat([(b if b is not None else torch.zeros_like(p)).flatten()
                      for b, p in zip(buffers, member.model.parameters(), strict=True)])


def _attach_momentum(member: _Member, sgd: PackedSGD, k: int) -> None:
    """Show the member's momentum buffers in its optimizer's state, as torch.optim.SGD keeps
    them (read by probes such as curvature's stability threshold)."""
    if sgd.momentum is None or member.spec.momentum == 0:
        return
    momentum = sgd._views(sgd.momentum)
    for name, p in member.model.named_parameters():
        member.optimizer.state[p]["momentum_buffer"] = momentum[name][k]


def check_packable(specs: Sequence[RunSpec]) -> None:
    """ConfigError unless `specs` (at least one) may be trained as one pack."""
    if not specs:
        raise ConfigError("A pack needs at least one RunSpec; got none.")
    keys = {pack_key(s) for s in specs}
    if None in keys:
        bad = [s.run_id for s in specs if pack_key(s) is None]
        raise ConfigError(f"Runs {bad} cannot be packed (only 'train' runs without 'compile' "
                          "or 'channels_last' can).")
    if len(keys) > 1:
        raise ConfigError("The runs of a pack must share the settings "
                          "normlab.train.packable.SHARED_SETTINGS; these differ in some of them.")


def train_packed(specs: Sequence[RunSpec],
                 callbacks: Sequence[Sequence[Callback]] | None = None,
                 contexts: Sequence[RunContext] | None = None,
                 on_done: OnDone | None = None) -> list[RunResult]:
    """Train the compatible `specs` as one computation; one RunResult per spec, in order.

    Each member's metric rows, probe records, divergence step and result equal those of
    `train(spec)` up to float reassociation. `callbacks[k]` run for member k only (its spec's
    probes are added, as in `train`). `on_done(k, result)` is called as soon as member k ends
    (a diverged member ends before the others). BN mode: train mode for the steps, eval mode for
    the per-epoch test evaluation, per member. The global RNG is restored afterwards.
    Members whose run folders hold checkpoints resume from them; they must all stand at the same
    step (ValueError otherwise; `execute_pack` groups them so).
    """
    check_packable(specs)
    options = train_options(specs[0])  # the numerics options are shared (packable.pack_key)
    device = resolve_device(specs[0].device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    start = time.perf_counter()
    with torch.random.fork_rng(devices=cuda), pack_threads(device), \
            run_numerics(deterministic=options["deterministic"], tf32=options["tf32"]):
        pack = _Pack(list(specs), callbacks, contexts, device, on_done, start)
        return pack.run()


class _Pack:
    """A pack in progress; `run()` executes it."""

    def __init__(self, specs: list[RunSpec], callbacks: Sequence[Sequence[Callback]] | None,
                 contexts: Sequence[RunContext] | None, device: torch.device,
                 on_done: OnDone | None, start: float) -> None:
        first = specs[0]
        options = [train_options(s) for s in specs]  # validates every member's options
        self.device, self.on_done, self.start = device, on_done, start
        self.eval_batch_size = options[0]["eval_batch_size"]
        train_set, test_set = load(first.data, **first.mapping("data_options"))
        train_set, self.test_set = train_set.to(device), test_set.to(device)
        self.members: list[_Member] = []
        models = []
        for k, spec in enumerate(specs):
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(spec.seed)  # the solo run's global-RNG state after its set-up
                batches = build_batches(spec, train_set, device)
                model = build_model(spec, batches.dataset, device)
                rng = {"cpu": torch.get_rng_state()}
                if device.type == "cuda":
                    rng["cuda"] = torch.cuda.get_rng_state(device)
            context = contexts[k] if contexts else RunContext(run_id=spec.run_id)
            extra = list(callbacks[k]) if callbacks else []
            member_callbacks = extra + [scheduled(**e) for e in spec.probe_schedules()]
            optimizer = build_optimizer(spec, model, fused=False)
            self.members.append(_Member(
                spec=spec, context=context, batches=batches, model=model, rng=rng,
                callbacks=member_callbacks, optimizer=optimizer,
                checkpoint=RunCheckpoint(context, model, optimizer, batches.generator,
                                         member_callbacks, len(batches), device)))
            models.append(model)
        refusal = _hooks_refusal(*models)
        if refusal:
            raise ConfigError(refusal)
        self.per_epoch = len(self.members[0].batches)
        self.total = first.steps or max(1, math.ceil(first.epochs * self.per_epoch))
        self.start_step = self.restore()  # into the members' modules, before they are stacked
        self.clock = CheckpointClock(self.per_epoch, step=self.start_step)
        self.renorm_schedule = any(callable(getattr(m, "set_training_fraction", None))
                                   for m in models[0].modules())
        self.read_window = 1 if any(m.callbacks for m in self.members) else READ_WINDOW
        template = copy.deepcopy(models[0]).train()
        self.sgd = PackedSGD(template, models, specs, first.autocast)
        # a graph when every member would take one alone (train/graphed.py's rule)
        paths = {cuda_graph_path(o["cuda_graph"], device, callbacks=bool(m.callbacks),
                                 update_projection=m.spec.update_projection,
                                 compile=m.spec.compile)
                 for o, m in zip(options, self.members, strict=True)}
        self.step_path = "cuda_graph" if paths == {"cuda_graph"} else "step_function"
        if self.start_step > 0:  # the momentum buffers the checkpoints restored
            self.sgd.momentum = self.sgd.padded(torch.stack([_momentum_of(m)
                                                             for m in self.members]))
        self.pack_step = PackStep(self.sgd, capture=self.step_path == "cuda_graph")
        self.stacked = list(self.members)  # members in stack order (live or masked)
        for k, member in enumerate(self.stacked):
            _point_into(member.model, self.sgd, k)
            _attach_momentum(member, self.sgd, k)
        self.pending: list[tuple[int, list[float], torch.Tensor, torch.Tensor]] = []

    def restore(self) -> int:
        """Load each member's checkpoint (model, momentum, RNG, data position, averages,
        callback states); the step they all stand at (0 when none has one)."""
        resumed = [m.checkpoint.restore() for m in self.members]
        steps = {r.step if r is not None else 0 for r in resumed}
        if len(steps) > 1:
            raise ValueError("The members of a pack must resume from the same step; their "
                             f"checkpoints stand at steps {sorted(steps)}.")
        for member, state in zip(self.members, resumed, strict=True):
            if state is None:
                continue
            member.rng["cpu"] = state.rng["cpu"]
            if "cuda" in member.rng and state.rng["cuda"] is not None:
                member.rng["cuda"] = state.rng["cuda"]
            member.last_lr, member.final = state.last_lr, state.final
            member.average = _EpochAverage(**state.average)
        return steps.pop()

    # -- members ---------------------------------------------------------------------------------
    def live(self) -> list[_Member]:
        return [m for m in self.stacked if m.result is None]

    def state(self, member: _Member, step: int) -> TrainState:
        return TrainState(spec=member.spec, step=step, epoch=step / self.per_epoch,
                          total_steps=self.total, model=member.model,
                          optimizer=member.optimizer, loss_fn=nn.CrossEntropyLoss(),
                          x=member.x, y=member.y, loss=member.last_loss, lr=member.last_lr,
                          device=self.device, context=member.context,
                          train_data=member.batches.dataset, test_data=self.test_set)

    def call_back(self, member: _Member, step: int) -> None:
        """The member's callbacks with its own global-RNG state; a crash fails that member."""
        torch.set_rng_state(member.rng["cpu"])
        if "cuda" in member.rng:
            torch.cuda.set_rng_state(member.rng["cuda"], self.device)
        for group in member.optimizer.param_groups:
            group["lr"] = member.last_lr
        try:
            for callback in member.callbacks:
                callback(self.state(member, step))
        except Exception as err:  # a crashed member is recorded, the others go on
            self.finish(member, RunResult(status="failed", error=f"{type(err).__name__}: "
                                          f"{err}\n" + traceback.format_exc()))
        refusal = _hooks_refusal(member.model)  # a callback may have left a hook on the model
        if refusal and member.result is None:
            self.finish(member, RunResult(status="failed", error=refusal))
        member.model.train()
        member.rng["cpu"] = torch.get_rng_state()
        if "cuda" in member.rng:
            member.rng["cuda"] = torch.cuda.get_rng_state(self.device)

    def arithmetic(self) -> dict[str, Any]:
        """The step taken and the pack: what besides `numerics` sets the members' rounding."""
        return {**step_provenance(self.step_path, [self.pack_step.call]), "packed": True,
                "pack_size": len(self.members)}

    def finish(self, member: _Member, result: RunResult) -> None:
        k = self.stacked.index(member)
        self.sgd.active[k] = False
        result.wall_time_s = time.perf_counter() - self.start
        if result.provenance:
            result.provenance.update(self.arithmetic())
            if member.checkpoint.resumed_from:
                result.provenance["resumed_from"] = member.checkpoint.resumed_from
        member.result = result
        if self.on_done is not None:
            self.on_done(self.members.index(member), result)

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> list[RunResult]:
        step = self.start_step
        while step < self.total and self.live():
            epoch = {id(m): m.checkpoint.epoch(m.batches) for m in self.live()}
            for _ in range(self.per_epoch - step % self.per_epoch):  # resumed mid-epoch: less
                for member in self.live():
                    member.x, member.y = next(epoch[id(member)])
                if step == 0:
                    for member in self.live():
                        member.last_lr = lr_at(0, self.total, member.spec)
                        if member.callbacks:
                            self.call_back(member, 0)
                self.sgd_step(step)
                step += 1
                end_of_epoch = step % self.per_epoch == 0 or step == self.total
                if len(self.pending) >= self.read_window or end_of_epoch:
                    self.read_back(step)
                if end_of_epoch and self.live():
                    self.log_eval(step)
                self.shrink()
                if step == self.total or not self.live():
                    break
                if not self.pending and self.clock.due(step):  # every row up to step written
                    self.save_checkpoints(step)
                    self.clock.saved(step)
        for member in self.live():
            self.finish(member, RunResult(
                status="completed", steps=step,
                final={**member.final, "final_lr": member.last_lr},
                provenance=provenance(member.spec.run_id, str(self.device), member.spec.seed)))
        return [m.result for m in self.members]  # type: ignore[misc]

    def save_checkpoints(self, step: int) -> None:
        """Each live member's checkpoint of `step`, in its run folder, as a solo run's."""
        segment = {**numerics(str(self.device)), **self.arithmetic(),
                   "stack_size": len(self.stacked)}  # members stacked now (it shrinks)
        for member in self.live():
            member.checkpoint.save(step, {"last_lr": member.last_lr,
                                          "average": vars(member.average),
                                          "final": member.final},
                                   rng=member.rng, numerics=segment)

    def sgd_step(self, step: int) -> None:
        lrs = []
        for member in self.stacked:
            lr = lr_at(step, self.total, member.spec)
            lrs.append(lr)
            if member.result is None:
                member.last_lr = lr
                if self.renorm_schedule:
                    set_training_fraction(member.model, step / self.total)
        # (K, B, C, H, W), contiguous: vmap cannot query channels-last strides, which the
        # augmentation gather can produce; masked members reuse their last batch
        x = torch.stack([m.x for m in self.stacked]).contiguous()
        y = torch.stack([m.y for m in self.stacked])
        losses, correct = self.pack_step(x, y, torch.tensor(lrs, device=self.device))
        self.pending.append((step, lrs, losses, correct))
        if step == 0:
            for k, member in enumerate(self.stacked):
                _attach_momentum(member, self.sgd, k)

    def read_back(self, step: int) -> None:
        """Log each live member's pending steps (one device-to-host copy); record divergences;
        then the callbacks and progress of the members still live."""
        losses = torch.stack([p[2] for p in self.pending]).float().cpu().tolist()  # (W, K)
        correct = torch.stack([p[3] for p in self.pending]).cpu().tolist()
        steps = [(p[0], p[1]) for p in self.pending]
        self.pending = []
        for k, member in enumerate(self.stacked):
            if member.result is not None:
                continue
            rows = [(s, lrs[k], losses[w][k], correct[w][k]) for w, (s, lrs) in enumerate(steps)]
            divergence = record_steps(rows, member.spec, member.context, self.per_epoch,
                                      member.average, member.spec.batch_size)
            if divergence is not None:
                self.finish(member, self.diverged(member, divergence))
                continue
            member.last_loss = losses[-1][k]
            if member.callbacks:
                self.call_back(member, step)
            member.context.progress(step / self.total, f"step {step}/{self.total}")

    def diverged(self, member: _Member, divergence: Divergence) -> RunResult:
        return diverged_result(member.spec, divergence, self.total, self.per_epoch, self.device)

    def log_eval(self, step: int) -> None:
        loss_sum, correct = self.sgd.evaluate(self.test_set.x, self.test_set.y,
                                              self.eval_batch_size)
        n = len(self.test_set)
        losses, hits = loss_sum.cpu().tolist(), correct.cpu().tolist()
        for k, member in enumerate(self.stacked):
            if member.result is None:
                member.final = log_eval_row(member.context, step, self.per_epoch,
                                            member.average, losses[k] / n, hits[k] / n)
                member.average = _EpochAverage()

    def shrink(self) -> None:
        """Re-stack the live members once at least half of the stacked ones have stopped."""
        live = self.live()
        if not live or len(live) > len(self.stacked) // 2:
            return
        index = torch.tensor([self.stacked.index(m) for m in live], device=self.device)
        self.sgd.keep(index)
        self.pack_step = PackStep(self.sgd, capture=self.step_path == "cuda_graph")
        self.stacked = live
        for k, member in enumerate(self.stacked):
            _point_into(member.model, self.sgd, k)
            _attach_momentum(member, self.sgd, k)


def execute_pack(specs: Sequence[RunSpec], out_dir: str | Path,
                 on_progress: ProgressFn | None = None,
                 live: LiveLog | None = None) -> list[RunResult | None]:
    """Run a pack into the store at `out_dir`: each member in its own run folder, written as
    `execute_run` writes a solo run (claimed first with a lease, spec.json first, result.json
    atomically when the member ends). A member that another writer holds or has finished is
    left out of the pack and gets None, as does one whose lease was taken over meanwhile. A
    crash of the pack records its unfinished members as "failed"; an interruption leaves them
    unfinished, with their checkpoints, so they are resumed (alone or packed) and finished ones
    are kept. The members are trained in the groups `resume_groups` makes. With `live`, each
    member's rows also stream to a tracking tool (normlab.runs.live).
    """
    store = RunStore(out_dir)
    results: list[RunResult | None] = [None] * len(specs)
    with contextlib.ExitStack() as stack:
        leases = [stack.enter_context(claimed(store, s)) for s in specs]
        run_dirs = {k: store.begin(specs[k]) for k, lease in enumerate(leases)
                    if lease is not None}
        for members, packed in resume_groups(run_dirs):
            if not packed:  # a run the plain loop checkpointed continues by the plain loop
                k = members[0]
                results[k] = run_claimed(specs[k], store, leases[k], on_progress, live)
                continue
            _pack_into_store([specs[k] for k in members], [leases[k] for k in members],
                             store, on_progress, results, members, live)
    return results


def _pack_into_store(specs: list[RunSpec], leases: list[Lease], store: RunStore,
                     on_progress: ProgressFn | None, results: list[RunResult | None],
                     slots: list[int], live: LiveLog | None = None) -> None:
    """`train_packed(specs)` with claimed runs (`leases`), each member's result stored as it
    ends and put in `results[slots[i]]`; a crash records the unfinished members as failed."""
    streams = [open_stream(live, s, store.run_dir(s)) for s in specs]
    contexts = [RunContext(run_id=s.run_id, run_dir=store.run_dir(s), on_progress=on_progress,
                           lease=lease, stream=stream)
                for s, lease, stream in zip(specs, leases, streams, strict=True)]
    ended: set[int] = set()

    def done(i: int, result: RunResult) -> None:
        ended.add(i)
        stored = None
        if leases[i].held:
            results[slots[i]] = result
            store.finish(specs[i], result)
            stored = result
        if streams[i] is not None:
            streams[i].close(stored)

    try:
        train_packed(specs, contexts=contexts, on_done=done)
    except Exception as err:  # a crashed pack is recorded per member, never lost
        error = f"{type(err).__name__}: {err}\n({PLAIN_LOOP_HINT})\n" + traceback.format_exc()
        for i in range(len(specs)):
            if i not in ended:
                done(i, RunResult(status="failed", error=error))
    finally:  # interrupted: the members not ended stop without a result
        for i, stream in enumerate(streams):
            if stream is not None and i not in ended:
                stream.close(None)


def resume_groups(run_dirs: dict[int, Path]) -> list[tuple[list[int], bool]]:
    """The members of a pack (index -> claimed run folder) grouped by where they resume:
    (indices, packed). A run whose checkpoint the plain loop wrote continues alone (packed
    False; the "train" task gives it the plain loop again), so that it stays bit for bit the run
    it was; the others form one pack per checkpoint step
    (fresh runs at step 0), since a pack advances its members in lockstep."""
    packs: dict[int, list[int]] = {}
    alone: list[list[int]] = []
    for k, run_dir in run_dirs.items():
        point = checkpoint_step(run_dir)
        if point is not None and not point[1]:
            alone.append([k])
        else:
            packs.setdefault(point[0] if point is not None else 0, []).append(k)
    return [(group, True) for group in packs.values()] + [(group, False) for group in alone]
