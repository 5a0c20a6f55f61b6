"""RunResult: how a run ended, its final metrics and its provenance."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normlab.utils.version import __version__

STATUSES = ("completed", "diverged", "failed")
FILES_KEY = "files"  # result.json's record of the run's JSON-lines files:
# {name: {bytes, rows, sha256}} (older results hold bytes and rows only, or no record at all)
DATA_FILES = ("metrics.jsonl", "records.jsonl")


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
    """What a result needs to be traced: spec hash, code version, torch version, device, seed,
    and the numerics of this process that change float results (`numerics`)."""

    return {
        "run_id": spec_id,
        "normlab_version": __version__,
        "git_commit": _git_commit(),
        "python_version": platform.python_version(),
        "device": device,
        "seed": seed,
        **numerics(device),
    }


THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
NUMERICS_OPTIONS = ("deterministic", "tf32")  # the "train" options setting them (train/numerics.py)


def numerics(device: str) -> dict[str, Any]:
    """The settings of this process that change float results (read now, so call it while the
    run's settings are in force).

    - `torch_num_threads` (and the OMP/MKL environment it came from): on a CPU the thread count
      changes how reductions are split, so the last bits of every sum (Ray runs each task on
      one thread, a local run on all cores);
    - `tf32_matmul`, `tf32_cudnn`, `float32_matmul_precision`: TF32 on CUDA rounds float32
      inputs of matmuls and convolutions to 10 mantissa bits (about 1e-3 relative);
    - `cudnn_benchmark` (cuDNN picks kernels by timing, so two runs may use different ones),
      `cudnn_deterministic`, `deterministic_algorithms` (torch.use_deterministic_algorithms),
      `cublas_workspace_config` (needed by deterministic cuBLAS);
    - `device_name` (the GPU's, or the CPU's model) and `torch_version`: kernels differ.
    """
    import torch  # imported on use: torch takes 1.3 s to import; this module stays torch-free

    return {
        "device_name": _device_name(device),
        "torch_version": str(torch.__version__),
        "torch_num_threads": torch.get_num_threads(),
        **{name.lower(): os.environ.get(name) for name in THREAD_ENV},
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def _device_name(device: str) -> str:
    """The GPU's name for a CUDA device; else the CPU's model name."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return _cpu_model() or platform.processor() or platform.machine()


def _cpu_model() -> str | None:
    """The CPU model from /proc/cpuinfo (Linux); None elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        return None
    return None


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def result_problems(data: Any) -> list[str]:
    """The fields of a result.json that RunResult would not hold (missing, unknown, wrong type),
    and the values no run can end with (`value_problems`)."""
    if not isinstance(data, dict):
        return [f"must hold a JSON object; got {type(data).__name__}."]
    number = (int, float)
    expected = {"status": (str,), "steps": (int,), "final": (dict,),
                "diverged_step": (int, type(None)), "diverged_loss": (*number, type(None)),
                "error": (str, type(None)), "wall_time_s": number, "provenance": (dict,)}
    problems = field_type_problems(data, expected, optional=set(expected) - {"status"})
    if isinstance(data.get("status"), str) and data["status"] not in STATUSES:
        problems.append(f"'status' must be one of {', '.join(STATUSES)}; got {data['status']!r}.")
    unknown = sorted(set(data) - set(expected) - {FILES_KEY})
    if unknown:
        problems.append(f"unknown field(s) {', '.join(map(repr, unknown))}.")
    files = data.get(FILES_KEY, {})
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        problems.append(f"the field {FILES_KEY!r} must map file names to objects; got "
                        f"{json.dumps(files)[:60]}.")
    return problems or value_problems(data)


def value_problems(data: Mapping[str, Any]) -> list[str]:
    """The values of a well-typed result.json that no run can end with: negative `steps`,
    `wall_time_s` or `diverged_loss`; a `diverged_step` outside [0, steps]; an accuracy in
    `final` (a name `acc` or ending `_acc`) outside [0, 1] or a loss (`loss`, `*_loss`) below 0;
    a status its fields contradict ("diverged" without a `diverged_step`, "failed" without an
    `error`, a `diverged_step` or an `error` on a run of another status)."""
    problems = []
    steps, status = data.get("steps", 0), data["status"]
    for key in ("steps", "wall_time_s", "diverged_loss"):
        value = data.get(key)
        if value is not None and value < 0:
            problems.append(f"the field {key!r} must be >= 0; got {value!r}.")
    step = data.get("diverged_step")
    if step is not None and not 0 <= step <= steps:
        problems.append(f"the field 'diverged_step' must be in [0, steps={steps}]; got {step!r}.")
    for key, value in data.get("final", {}).items():
        kind = "acc" if key == "acc" or key.endswith("_acc") else \
            "loss" if key == "loss" or key.endswith("_loss") else None
        if kind is None or value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind == "acc" and not (number and 0 <= value <= 1):
            problems.append(f"the accuracy 'final.{key}' must be in [0, 1] (or null); "
                            f"got {json.dumps(value)[:60]}.")
        elif kind == "loss" and not (number and value >= 0):
            problems.append(f"the loss 'final.{key}' must be >= 0 (or null); "
                            f"got {json.dumps(value)[:60]}.")
    if (status == "diverged") != (step is not None):
        problems.append(f"the status {status!r} contradicts 'diverged_step' = {step!r}: a run "
                        "has a diverged_step exactly when it diverged.")
    if (status == "failed") != (data.get("error") is not None):
        problems.append(f"the status {status!r} contradicts 'error' = "
                        f"{json.dumps(data.get('error'))[:60]}: a run has an error exactly when "
                        "it failed.")
    return problems


def field_type_problems(data: Mapping[str, Any], expected: Mapping[str, tuple[type, ...]],
                   optional: set[str] | None = None) -> list[str]:
    problems = []
    for key, kinds in expected.items():
        if key not in data:
            if key not in (optional or set()):
                problems.append(f"the field {key!r} is missing.")
            continue
        value = data[key]
        bad_bool = isinstance(value, bool) and bool not in kinds
        bad_float = isinstance(value, float) and not math.isfinite(value) and key != "diverged_loss"
        if not isinstance(value, kinds) or bad_bool or bad_float:
            names = " or ".join("null" if k is type(None) else JSON_NAMES.get(k, k.__name__)
                                for k in kinds)
            problems.append(f"the field {key!r} must be {names}; got {json.dumps(value)[:60]}.")
    return problems


JSON_NAMES = {str: "a string", int: "an integer", float: "a number", dict: "an object",
               list: "a list"}
