"""Checkpoints of a training run, so that a preempted or killed run continues where it stopped.

A checkpoint holds the complete state of a run between two steps: model (parameters and
buffers, so BN running statistics too), optimizer (momentum buffers), the global torch RNG
streams (CPU and the run's CUDA device), the data order (the batch generator's state at the
start of the current epoch, and the position in the epoch), the step, the last lr, the
running epoch averages, the last eval row, and the sizes of metrics.jsonl and records.jsonl.
It is written with torch.save to a temporary file and renamed over `checkpoint.pt` in the run
folder (store.CHECKPOINT_FILE), only at a step whose metric rows are all written.

A restarted run (store.begin keeps a folder that has a checkpoint) loads it, cuts
metrics.jsonl and records.jsonl back to their sizes at the checkpoint (rows written after it
are written again, so no step appears twice), and replays the current epoch's batch order up
to its position. The resumed run's numbers equal an uninterrupted run's bit for bit on CPU.

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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from normlab.config import ConfigError
from normlab.store import CHECKPOINT_FILE

if TYPE_CHECKING:
    from normlab.train.loop import _Run

CHECKPOINT_ENV = "NORMLAB_CHECKPOINT_EVERY"
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


class Checkpointer:
    """Saves and restores one run's checkpoint; a no-op for a run without a folder."""

    def __init__(self, run: _Run, every: CheckpointEvery | None = None) -> None:
        self.run = run
        self.every = every or CheckpointEvery.from_environment()
        run_dir = run.context.run_dir
        self.path: Path | None = run_dir / CHECKPOINT_FILE if run_dir is not None else None
        self.generator: torch.Generator = run.batches.generator
        self.epoch_start_state = self.generator.get_state()
        self.saved_at, self.saved_step = time.monotonic(), 0
        self.skip = 0

    # -- resume ----------------------------------------------------------------------------------
    def restore(self, step: int, last_lr: float, average: Any,
                final: dict[str, Any]) -> tuple[int, float, Any, dict[str, Any]]:
        """The train loop's variables (step, last lr, epoch average, last eval row): from the
        run's checkpoint when it has one (restoring model, optimizer and RNGs too), else as given.
        """
        if self.path is None or not self.path.exists():
            return step, last_lr, average, final
        state = torch.load(self.path, map_location=self.run.device, weights_only=True)
        self.run.model.load_state_dict(state["model"])
        self.run.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        if self.run.device.type == "cuda" and state["rng_cuda"] is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], self.run.device)
        self.generator.set_state(state["epoch_start_generator"])
        for name, size in state["file_sizes"].items():
            _truncate(self.path.parent / name, size)
        loop = state["loop"]
        self.skip = loop["step"] % self.run.per_epoch
        self.saved_at, self.saved_step = time.monotonic(), loop["step"]
        return loop["step"], loop["last_lr"], type(average)(**loop["average"]), loop["final"]

    def epoch(self, batches: Iterable[Any]) -> Iterator[Any]:
        """One epoch of `batches`, from the resumed position on the first epoch after restore."""
        self.epoch_start_state = self.generator.get_state()  # before the epoch draws its order
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(batches), skip, None)

    # -- save ------------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        if self.path is None:
            return False
        if self.every.epochs is not None:
            return step - self.saved_step >= self.every.epochs * self.run.per_epoch
        if self.every.minutes is not None:
            return time.monotonic() - self.saved_at >= 60 * self.every.minutes
        return False

    def maybe_save(self, step: int, last_lr: float, average: Any,
                   final: dict[str, Any]) -> None:
        """Save when due; call only where every metric row up to `step` is written."""
        if self.due(step):
            self.save(step, last_lr, average, final)

    def save(self, step: int, last_lr: float, average: Any, final: dict[str, Any]) -> None:
        assert self.path is not None
        self.run.context.check_lease()
        device = self.run.device
        state = {
            "model": self.run.model.state_dict(),
            "optimizer": self.run.optimizer.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            # At an epoch boundary the finished epoch has drawn its order: the generator's
            # state now is where the next epoch starts.
            "epoch_start_generator": self.generator.get_state()
            if step % self.run.per_epoch == 0 else self.epoch_start_state,
            "file_sizes": {name: _size(self.path.parent / name)
                           for name in ("metrics.jsonl", "records.jsonl")},
            "loop": {"step": step, "last_lr": last_lr, "average": vars(average),
                     "final": final},
        }
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
        self.saved_at, self.saved_step = time.monotonic(), step


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _truncate(path: Path, size: int) -> None:
    """Cut `path` back to `size` bytes (one system call: readers see before or after)."""
    if path.exists():
        os.truncate(path, size)
