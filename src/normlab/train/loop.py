"""`train(spec)`: SGD on the spec's data and model, with evaluation, divergence and callbacks.

Conventions:
- Budget: `spec.steps` optimizer steps if set, else ceil(spec.epochs * batches_per_epoch).
- "step" in every metric row is the number of optimizer updates applied to the weights the
  number was measured on. A per-step row {"step", "epoch", "lr", "loss", "acc"} is written for
  every step index s with s % log_every == 0: the mini-batch loss and accuracy computed in train
  mode (batch statistics) *before* update s + 1, and the lr that update used.
- After every epoch (and at the end of a run that stops mid-epoch) an eval row
  {"step", "epoch", "kind": "eval", "test_loss", "test_acc", "train_loss", "train_acc"}:
  test_* on the whole test set with the model in eval mode (BatchNorm/BatchRenorm use running
  statistics), mean cross-entropy; train_* the running average of the epoch's mini-batch losses
  and accuracies in train mode, on augmented data (free, but not an eval-mode number).
- `RunResult.final` (its keys never collide with RunSpec settings, since the runs table joins
  both): a completed run has train_loss, train_acc, test_loss, test_acc (the last eval row) and
  final_lr (the lr of the last step); a diverged run has final_lr (the lr of the diverging step),
  diverged_reason and diverged_epoch, and no accuracy (a diverged run has no final accuracy).
- Divergence (see divergence.py): the run stops at the first step s whose mini-batch loss is
  non-finite or above `spec.diverge_loss`; `diverged_step` = s, status "diverged".
- Determinism: the run draws all randomness from `spec.seed` (model init, batch order and
  augmentation, anything else through a forked global RNG that is restored afterwards), so the
  same spec on the same CPU gives the same numbers.
- Preemption: the run checkpoints its state into its folder (train/checkpoint.py) and a
  restarted run continues from it, with the same numbers as an uninterrupted run.
- Numerics: TF32 off unless `options.tf32`; `options.deterministic` for runs that must repeat
  bit for bit on a GPU (numerics.py). The settings in force, the thread count, the pack size
  (1) and any resume are recorded in `RunResult.provenance`.
- Callbacks (and `spec.probes`, built by `callbacks.scheduled`) are called with a `TrainState`
  at step 0 (first mini-batch, before any update) and after every optimizer step.
- On CUDA the step and the evaluation are replayed from CUDA graphs unless `options.cuda_graph`
  says otherwise or callbacks, an update projection or `compile` need the eager loop (see
  graphed.py); `RunResult.provenance["train_step"]` records which step ran.

Cost: one forward and backward per step. Losses are read back to the host in windows of 32
steps (every step when callbacks are present, since they receive the loss as a float), so a GPU
is not synchronized every step; a run that diverges inside a window has done at most 31 more
updates than recorded, which changes nothing that is reported.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from normlab.nn import set_training_fraction
from normlab.runs.result import RunResult, numerics, provenance
from normlab.runs.spec import RunSpec
from normlab.runs.tasks import RunContext
from normlab.train.build import (
    build_data,
    build_model,
    build_optimizer,
    resolve_device,
    train_options,
)
from normlab.train.callbacks import Callback, TrainState, scheduled
from normlab.train.checkpoint import (
    CheckpointClock,
    RunCheckpoint,
    global_rng,
    set_rng,
)
from normlab.train.divergence import Divergence, check_divergence, json_safe
from normlab.train.graphed import (
    CapturedCall,
    GraphedStep,
    StaticStep,
    cuda_graph_path,
    step_provenance,
)
from normlab.train.numerics import run_numerics
from normlab.train.projection import UpdateProjection
from normlab.train.schedules import lr_at

READ_WINDOW = 32  # steps between host read-backs of the losses when no callback needs them


@dataclass
class _Pending:
    """Per-step values kept on the device until the next read-back."""

    steps: list[int] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    losses: list[torch.Tensor] = field(default_factory=list)
    correct: list[torch.Tensor] = field(default_factory=list)

    def add(self, step: int, lr: float, loss: torch.Tensor, correct: torch.Tensor) -> None:
        self.steps.append(step)
        self.lrs.append(lr)
        self.losses.append(loss)
        self.correct.append(correct)

    def drain(self) -> Iterator[tuple[int, float, float, int]]:
        """(step, lr, loss, correct) per pending step, with one device-to-host copy."""
        if not self.steps:
            return iter(())
        losses = torch.stack(self.losses).float().cpu().tolist()
        correct = torch.stack(self.correct).cpu().tolist()
        rows = list(zip(self.steps, self.lrs, losses, correct, strict=True))
        self.steps, self.lrs, self.losses, self.correct = [], [], [], []
        return iter(rows)


@dataclass
class _EpochAverage:
    """Running average of the mini-batch loss and accuracy over one epoch (train mode)."""

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0

    def add(self, loss: float, correct: int, n: int) -> None:
        self.loss_sum += loss * n
        self.correct += correct
        self.count += n

    def values(self) -> tuple[float, float]:
        return self.loss_sum / max(self.count, 1), self.correct / max(self.count, 1)


def train(spec: RunSpec, callbacks: Sequence[Callback] = (),
          context: RunContext | None = None) -> RunResult:
    """Train the spec's model with SGD; return a RunResult ("completed" or "diverged").

    BN mode: train mode (batch statistics) for the steps, eval mode (running statistics) for
    the per-epoch test evaluation. Cost: one forward+backward per step, one test-set forward per
    epoch. Metric rows go to `context` (in memory when None). See the module docstring for the
    conventions of steps, rows and divergence.
    """
    context = context or RunContext(run_id=spec.run_id)
    options = train_options(spec)
    device = resolve_device(spec.device)
    start = time.perf_counter()
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), \
            run_numerics(deterministic=options["deterministic"], tf32=options["tf32"]):
        torch.manual_seed(spec.seed)
        run = _Run(spec, list(callbacks), context, device)
        result = run.run()
    result.provenance.update(run.how_it_ran())
    result.wall_time_s = time.perf_counter() - start
    return result


class _Run:
    """One training run; `run()` executes it."""

    def __init__(self, spec: RunSpec, callbacks: list[Callback], context: RunContext,
                 device: torch.device) -> None:
        options = train_options(spec)
        self.spec, self.context, self.device = spec, context, device
        self.eval_batch_size = options["eval_batch_size"]
        self.callbacks = callbacks + [scheduled(**entry) for entry in spec.probe_schedules()]
        self.train_set, self.test_set, self.batches = build_data(spec, device)
        self.model = build_model(spec, self.train_set, device)
        self.forward: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(self.model) if spec.compile else self.model)
        self.optimizer = build_optimizer(spec, self.model, fused=options["fused_sgd"])
        self.loss_fn = nn.CrossEntropyLoss()
        self.projection = UpdateProjection(self.model, spec.update_projection)
        self.per_epoch = len(self.batches)
        self.total = spec.steps or max(1, math.ceil(spec.epochs * self.per_epoch))
        self.renorm_schedule = any(callable(getattr(m, "set_training_fraction", None))
                                   for m in self.model.modules())
        self.read_window = 1 if self.callbacks else READ_WINDOW
        self.step_path = cuda_graph_path(options["cuda_graph"], device,
                                         callbacks=bool(self.callbacks),
                                         update_projection=spec.update_projection,
                                         compile=spec.compile)
        self.graphed: GraphedStep | None = None  # built at the first step taken
        self.eval_sums = CapturedCall(self.test_sums, capture=self.step_path == "cuda_graph",
                                      warmup=1)
        self.checkpoint = RunCheckpoint(context, self.model, self.optimizer,
                                        self.batches.generator, self.callbacks, self.per_epoch,
                                        device)

    # -- pieces ----------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.spec.autocast == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                                  cache_enabled=False)  # required under a CUDA graph
        return contextlib.nullcontext()

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.spec.channels_last else x

    def state(self, step: int, x: torch.Tensor, y: torch.Tensor, loss: float | None,
              lr: float) -> TrainState:
        return TrainState(spec=self.spec, step=step, epoch=step / self.per_epoch,
                          total_steps=self.total, model=self.model, optimizer=self.optimizer,
                          loss_fn=self.loss_fn, x=x, y=y, loss=loss, lr=lr, device=self.device,
                          context=self.context, train_data=self.train_set,
                          test_data=self.test_set)

    def call_back(self, state: TrainState) -> None:
        for callback in self.callbacks:
            callback(state)
        self.model.train()  # callbacks restore modes; this is a guard, not a change

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) on the test set, model in eval mode."""
        self.model.eval()
        loss_sum, correct = self.eval_sums()
        self.model.train()
        n = len(self.test_set)
        return loss_sum.item() / n, correct.item() / n

    def test_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed cross-entropy, number correct) on the test set, as device tensors."""
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        x_all, y_all = self.test_set.x, self.test_set.y
        for start in range(0, len(self.test_set), self.eval_batch_size):
            x = self.prepare(x_all[start:start + self.eval_batch_size])
            y = y_all[start:start + self.eval_batch_size]
            with self.autocast():
                logits = self.forward(x).float()
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(dim=1) == y).sum()
        return loss_sum, correct

    def sgd_step(self, step: int, x: torch.Tensor, y: torch.Tensor
                 ) -> tuple[float, torch.Tensor, torch.Tensor]:
        """One optimizer step on (x, y); returns (lr, loss, correct) with loss/correct on device."""
        lr = lr_at(step, self.total, self.spec)
        if self.renorm_schedule:
            set_training_fraction(self.model, step / self.total)
        if self.step_path != "optimizer":  # the same step on static tensors (graphed.py)
            self.graphed = self.graphed or self.graphed_step(step)
            return lr, *self.graphed.step(x, y)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self.autocast():
            logits = self.forward(x).float()
        loss = self.loss_fn(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.projection.before()
        self.optimizer.step()
        self.projection.after()
        return lr, loss.detach(), (logits.detach().argmax(dim=1) == y).sum()

    def graphed_step(self, start: int) -> GraphedStep:
        """The step on static tensors from step `start` on, with the optimizer's state as it is
        now (a restored checkpoint's momentum included)."""
        lrs = torch.tensor([lr_at(s, self.total, self.spec) for s in range(self.total)])
        autocast = torch.bfloat16 if self.spec.autocast == "bf16" else None
        return GraphedStep(StaticStep(self.model, self.optimizer, lrs, start_step=start,
                                      autocast=autocast),
                           capture=self.step_path == "cuda_graph")

    # -- the loop --------------------------------------------------------------------------------
    def step_taken(self) -> dict[str, str]:
        """Provenance of the step that ran (`graphed.step_provenance`): the step's and the
        evaluation's captures."""
        calls = [self.eval_sums] + ([self.graphed.call] if self.graphed else [])
        return step_provenance(self.step_path, calls)

    def arithmetic(self) -> dict[str, Any]:
        """The step taken, and solo: what besides `numerics` sets this run's float rounding."""
        return {**self.step_taken(), "packed": False, "pack_size": 1}

    def how_it_ran(self) -> dict[str, Any]:
        """Provenance of the arithmetic, and each resume with the numerics before it."""
        resumed = self.checkpoint.resumed_from
        return {**self.arithmetic(), **({"resumed_from": resumed} if resumed else {})}

    def run(self) -> RunResult:
        self.model.train()
        pending, average = _Pending(), _EpochAverage()
        step, last_lr = 0, self.spec.lr
        divergence: Divergence | None = None
        final: dict[str, Any] = {}
        checkpoint = self.checkpoint
        clock = CheckpointClock(self.per_epoch)
        resumed = checkpoint.restore()
        if resumed is not None:
            step, last_lr, final = resumed.step, resumed.last_lr, resumed.final
            average = _EpochAverage(**resumed.average)
            set_rng(resumed.rng, self.device)
            clock.saved(step)
        while step < self.total and divergence is None:
            for x, y in checkpoint.epoch(self.batches):
                x = self.prepare(x)
                if step == 0 and self.callbacks:
                    self.call_back(self.state(0, x, y, None, lr_at(0, self.total, self.spec)))
                last_lr, loss, correct = self.sgd_step(step, x, y)
                pending.add(step, last_lr, loss, correct)
                step += 1
                end_of_epoch = step % self.per_epoch == 0 or step == self.total
                if len(pending.steps) >= self.read_window or end_of_epoch:
                    divergence = self.read_back(pending, average, len(y))
                    if divergence is not None:
                        break
                    if self.callbacks:
                        self.call_back(self.state(step, x, y, loss.item(), last_lr))
                    self.context.progress(step / self.total, f"step {step}/{self.total}")
                if end_of_epoch:  # the last step always ends an epoch: every run ends evaluated
                    final = self.log_eval(step, average)
                    average = _EpochAverage()
                if step == self.total:
                    break
                if not pending.steps and clock.due(step):  # every row up to `step` written
                    self.save_checkpoint(step, last_lr, average, final)
                    clock.saved(step)
        if divergence is not None:
            return self.diverged(divergence)
        return RunResult(status="completed", steps=step, final={**final, "final_lr": last_lr},
                         provenance=provenance(self.spec.run_id, str(self.device),
                                               self.spec.seed))

    def save_checkpoint(self, step: int, last_lr: float, average: _EpochAverage,
                        final: dict[str, Any]) -> None:
        self.checkpoint.save(step, {"last_lr": last_lr, "average": vars(average),
                                    "final": final},
                             rng=global_rng(self.device),
                             numerics={**numerics(str(self.device)), **self.arithmetic()})

    def read_back(self, pending: _Pending, average: _EpochAverage,
                  batch_size: int) -> Divergence | None:
        """Check and log the pending steps; the first divergence found, if any."""
        return record_steps(pending.drain(), self.spec, self.context, self.per_epoch, average,
                            batch_size)

    def log_eval(self, step: int, average: _EpochAverage) -> dict[str, float]:
        return log_eval_row(self.context, step, self.per_epoch, average, *self.evaluate())

    def diverged(self, divergence: Divergence) -> RunResult:
        return diverged_result(self.spec, divergence, self.total, self.per_epoch, self.device)


def record_steps(rows: Iterable[tuple[int, float, float, int]], spec: RunSpec,
                 context: RunContext, per_epoch: int, average: _EpochAverage,
                 batch_size: int) -> Divergence | None:
    """Check and log (step, lr, loss, correct) rows of one run; the first divergence, if any."""
    for s, lr, loss, correct in rows:
        divergence = check_divergence(loss, s, spec.diverge_loss)
        if divergence is not None or s % spec.log_every == 0:
            context.log_metrics(json_safe({
                "step": s, "epoch": s / per_epoch, "lr": lr, "loss": loss,
                "acc": correct / batch_size}))
        if divergence is not None:
            return divergence
        average.add(loss, correct, batch_size)
    return None


def log_eval_row(context: RunContext, step: int, per_epoch: int, average: _EpochAverage,
                 test_loss: float, test_acc: float) -> dict[str, float]:
    """Log the eval row of `step` (test numbers and the epoch's train average); return it."""
    train_loss, train_acc = average.values()
    row = {"train_loss": train_loss, "train_acc": train_acc,
           "test_loss": test_loss, "test_acc": test_acc}
    context.log_metrics(json_safe({"step": step, "epoch": step / per_epoch, "kind": "eval",
                                   **row}))
    return json_safe(row)


def diverged_result(spec: RunSpec, divergence: Divergence, total: int, per_epoch: int,
                    device: torch.device) -> RunResult:
    """The RunResult of a run that diverged at `divergence.step` of `total` steps."""
    lr = lr_at(divergence.step, total, spec)
    return RunResult(
        status="diverged", steps=divergence.step, diverged_step=divergence.step,
        diverged_loss=divergence.stored_loss,
        final={"final_lr": lr, "diverged_reason": divergence.reason,
               "diverged_epoch": divergence.step / per_epoch},
        provenance=provenance(spec.run_id, str(device), spec.seed))
