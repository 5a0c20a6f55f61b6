"""RunResult: how a run ended, its final metrics and its provenance."""

from __future__ import annotations

import dataclasses
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATUSES = ("completed", "diverged", "failed")


@dataclass
class RunResult:
    """The outcome of one run. A diverged run is a result, not an error.

    `final` holds the last metrics (e.g. train_loss, train_acc, test_loss, test_acc);
    `diverged_step`/`diverged_loss` are set when status is "diverged"; `error` when "failed".
    """

    status: str
    steps: int = 0
    final: dict[str, Any] = field(default_factory=dict)
    diverged_step: int | None = None
    diverged_loss: float | None = None
    error: str | None = None
    wall_time_s: float = 0.0
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}; got {self.status!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        return cls(**data)


def provenance(spec_id: str, device: str, seed: int) -> dict[str, Any]:
    """What a result needs to be traced: spec hash, code version, torch version, device, seed."""
    import torch

    import normlab

    return {
        "run_id": spec_id,
        "normlab_version": normlab.__version__,
        "git_commit": _git_commit(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": device,
        "device_name": _device_name(device),
        "seed": seed,
    }


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
