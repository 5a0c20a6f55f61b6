"""Checkpoints of a training run, so that a preempted or killed run continues where it stopped.

A checkpoint holds the complete state of a run between two steps: model (parameters and
buffers, so BN running statistics too), the optimizer's per-parameter state (momentum buffers;
its hyper-parameters come from the spec), the global torch RNG streams (CPU and the run's CUDA
device), the data order (the batch generator's state at the start of the current epoch, and
the position in the epoch), the step, the last lr, the running epoch averages, the last eval
row, the state of every callback that keeps one (`state_dict`, train/callbacks.py), the sizes
of metrics.jsonl and records.jsonl, and the numerics the run had so far (`normlab.runs.result.
numerics`, with the pack size). It is written with torch.save to a temporary file and renamed
over `checkpoint.pt` in the run folder (store.CHECKPOINT_FILE), only at a step whose metric rows
are all written. A solo run and each member of a pack (train/packed.py) write the same format
into their own run folders; the `packed` entry says which arithmetic wrote it.

A restarted run (store.begin keeps a folder that has a checkpoint) loads it, cuts
metrics.jsonl and records.jsonl back to their sizes at the checkpoint (rows written after it
are written again, so no step appears twice), and replays the current epoch's batch order up
to its position. The resumed run's numbers equal an uninterrupted run's bit for bit on CPU
when it resumes under the same arithmetic (solo, or a pack of as many members as at the
checkpoint, on the same thread count). A run resumed under other arithmetic (a pack member
resumed alone or in a pack of another size) continues from exactly the checkpointed state,
with float rounding that differs from then on as packed and solo runs differ; its result says
so in `provenance["resumed_from"]`: one entry per resume, the step and the numerics of the
part before it.

How often: `NORMLAB_CHECKPOINT_EVERY` ("10min", the default; "2epochs"; "off"), set by
`normlab run --checkpoint-every`. Cost: one torch.save of model and optimizer state per
checkpoint; on resume, the data preparation (no model compute) of the epoch's batches before
the position.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normlab.runs.store import CHECKPOINT_FILE
from normlab.runs.tasks import RunContext
from normlab.train.callbacks import Callback, Stateful, callback_states, load_callback_states
from normlab.utils.config import ConfigError

CHECKPOINT_ENV = "NORMLAB_CHECKPOINT_EVERY"
CHECKPOINT_FORMAT = 2  # 1 (no "format" key): before callbacks, numerics and packs were saved
DEFAULT_EVERY = "10min"
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(min|epochs?)\s*$")


@dataclass(frozen=True)
class CheckpointEvery:
    """How often to checkpoint: every `minutes` of wall time, or every `epochs`, or never."""

    minutes: float | None = None
    epochs: float | None = None

    @classmethod
    def parse(cls, text: str) -> CheckpointEvery:
        """'10min', '0.5min', '1epoch', '3epochs' or 'off'; ConfigError otherwise."""
        if text.strip() == "off":
            return cls()
        match = _PATTERN.match(text)
        if match is None or float(match.group(1)) <= 0:
            raise ConfigError(f"The 'checkpoint_every' setting must be N minutes ('10min'), "
                              f"N epochs ('2epochs') with N > 0, or 'off'; got {text!r}.")
        value = float(match.group(1))
        return cls(minutes=value) if match.group(2) == "min" else cls(epochs=value)

    @classmethod
    def from_environment(cls) -> CheckpointEvery:
        return cls.parse(os.environ.get(CHECKPOINT_ENV) or DEFAULT_EVERY)


class CheckpointClock:
    """When a run (or a whole pack, which checkpoints all its members at once) is due to save:
    `every` minutes or epochs after the last save or the start."""

    def __init__(self, per_epoch: int, every: CheckpointEvery | None = None,
                 step: int = 0) -> None:
        self.per_epoch = per_epoch
        self.every = every or CheckpointEvery.from_environment()
        self.saved(step)

    def saved(self, step: int) -> None:
        self.saved_at, self.saved_step = time.monotonic(), step

    def due(self, step: int) -> bool:
        if self.every.epochs is not None:
            return step - self.saved_step >= self.every.epochs * self.per_epoch
        if self.every.minutes is not None:
            return time.monotonic() - self.saved_at >= 60 * self.every.minutes
        return False


@dataclass
class Resumed:
    """What a run continues from: the train loop's variables, and the global-RNG streams to set
    (`rng`: "cpu", and "cuda" or None)."""

    step: int
    last_lr: float
    average: dict[str, Any]
    final: dict[str, Any]
    rng: dict[str, torch.Tensor | None]


class RunCheckpoint:
    """The checkpoint of one run (solo, or one member of a pack) in its run folder; a no-op
    without a folder. `restore()` before the first step, `epoch(batches)` for each epoch's
    batches, `save(...)` where every metric row up to the step is written."""

    def __init__(self, context: RunContext, model: nn.Module, optimizer: torch.optim.Optimizer,
                 generator: torch.Generator, callbacks: Sequence[Callback], per_epoch: int,
                 device: torch.device) -> None:
        self.context, self.model, self.optimizer = context, model, optimizer
        self.generator, self.callbacks = generator, list(callbacks)
        self.per_epoch, self.device = per_epoch, device
        run_dir = context.run_dir
        self.path: Path | None = run_dir / CHECKPOINT_FILE if run_dir is not None else None
        self.epoch_start_state = generator.get_state()
        self.skip = 0
        self.resumed_from: list[dict[str, Any]] = []

    # -- resume ----------------------------------------------------------------------------------
    def restore(self) -> Resumed | None:
        """Load the run's checkpoint into model, optimizer, data order and callbacks, and cut
        the run's files back to the checkpoint; None when there is none (or it cannot be read
        or resumed exactly, and the run starts afresh). `resumed_from` then lists the resumes
        with the numerics before each, for the result's provenance."""
        if self.path is None:
            return None
        try:
            state = read_checkpoint(self.path)
        except UnreadableCheckpointError as err:
            self._start_afresh(str(err))
            return None
        if state is None:
            return None
        saved_callbacks = state.get("callbacks")
        if saved_callbacks is None and any(isinstance(c, Stateful) for c in self.callbacks):
            self._start_afresh("it was written before callbacks saved their state")
            return None
        self.model.load_state_dict(state["model"])
        current = self.optimizer.state_dict()  # hyper-parameters from the spec; state saved
        self.optimizer.load_state_dict({**current, "state": state["optimizer"]["state"]})
        if saved_callbacks is not None:
            load_callback_states(self.callbacks, saved_callbacks)
        self.generator.set_state(state["epoch_start_generator"])
        for name, size in state["file_sizes"].items():
            _truncate(self.path.parent / name, size)
        loop = state["loop"]
        self.skip = loop["step"] % self.per_epoch
        numerics = state.get("numerics")
        self.resumed_from = [*state.get("resumed_from", []),
                             {"step": loop["step"], **(numerics or {})}]
        return Resumed(step=loop["step"], last_lr=loop["last_lr"], average=loop["average"],
                       final=loop["final"], rng={"cpu": state["rng_cpu"],
                                                 "cuda": state["rng_cuda"]})

    def _start_afresh(self, reason: str) -> None:
        """Forget a checkpoint that cannot be resumed exactly: empty files, no checkpoint."""
        assert self.path is not None
        warnings.warn(f"{self.path} cannot be resumed exactly ({reason}); the run starts "
                      "again from step 0.", RuntimeWarning, stacklevel=3)
        for name in ("metrics.jsonl", "records.jsonl"):
            _truncate(self.path.parent / name, 0)
        self.path.unlink(missing_ok=True)

    def epoch(self, batches: Iterable[Any]) -> Iterator[Any]:
        """One epoch of `batches`, from the resumed position on the first epoch after restore."""
        self.epoch_start_state = self.generator.get_state()  # before the epoch draws its order
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(batches), skip, None)

    # -- save ------------------------------------------------------------------------------------
    def save(self, step: int, loop: dict[str, Any], rng: dict[str, torch.Tensor | None],
             numerics: dict[str, Any]) -> None:
        """Write the checkpoint of `step`: `loop` holds last_lr, average (a dict) and final;
        `rng` the run's global-RNG streams; `numerics` the settings the run has run under since
        its last resume (`normlab.runs.result.numerics`, pack size, step taken)."""
        if self.path is None:
            return
        self.context.check_lease()
        state = _owned({
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng_cpu": rng["cpu"],
            "rng_cuda": rng.get("cuda"),
            # At an epoch boundary the finished epoch has drawn its order: the generator's
            # state now is where the next epoch starts.
            "epoch_start_generator": self.generator.get_state()
            if step % self.per_epoch == 0 else self.epoch_start_state,
            "file_sizes": {name: _size(self.path.parent / name)
                           for name in ("metrics.jsonl", "records.jsonl")},
            "loop": {"step": step, **loop},
            "callbacks": callback_states(self.callbacks),
            "numerics": numerics,
            "resumed_from": self.resumed_from,
        })
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as handle:
                torch.save(state, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


class UnreadableCheckpointError(RuntimeError):
    """A checkpoint file torch cannot load (damaged on disk); the message names it."""


def read_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at `path` (tensors on the CPU), or None when there is none;
    UnreadableCheckpointError when it cannot be loaded."""
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several kinds for a damaged file
        raise UnreadableCheckpointError(f"it cannot be read: {type(err).__name__}: "
                                        f"{str(err)[:200]}") from err


def checkpoint_step(run_dir: Path) -> tuple[int, bool] | None:
    """(step, written by a pack) of the checkpoint in `run_dir`; None when it has none or it
    cannot be read (the run then starts afresh, see `RunCheckpoint.restore`)."""
    try:
        state = read_checkpoint(run_dir / CHECKPOINT_FILE)
    except UnreadableCheckpointError:
        return None
    if state is None:
        return None
    return state["loop"]["step"], bool((state.get("numerics") or {}).get("packed", False))


def global_rng(device: torch.device) -> dict[str, torch.Tensor | None]:
    """The global RNG streams a checkpoint saves: CPU, and the run's CUDA device's."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng(rng: dict[str, torch.Tensor | None], device: torch.device) -> None:
    """Set the global RNG streams to a checkpoint's (the CUDA one only on a CUDA device)."""
    cpu = rng["cpu"]
    assert cpu is not None
    torch.set_rng_state(cpu)
    if device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)


def _owned(value: Any) -> Any:
    """`value` with every tensor copied to its own storage: torch.save writes a view's whole
    storage (a pack member's weights are views of the stacked weights of every member)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _owned(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_owned(v) for v in value)
    return value


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _truncate(path: Path, size: int) -> None:
    """Cut `path` back to `size` bytes (one system call: readers see before or after)."""
    if path.exists():
        os.truncate(path, size)
