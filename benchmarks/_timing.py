"""Benchmark helpers: the device asked for, and timing (a warm-up run, device synchronization,
the median of repeats)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from normlab.preflight import device_problem
from normlab.train.build import resolve_device


def benchmark_device(name: str) -> torch.device:
    """The device of a benchmark's --device ("auto": $NORMLAB_DEVICE, else CUDA when there is
    one); exits with the CLI's message, before any work, when this machine does not have it."""
    device = resolve_device(name)
    problem = device_problem(str(device), f"--device {name}")
    if problem:
        raise SystemExit(f"error: {problem}")
    return device


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of `fn` over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
