"""Benchmark helpers: the device asked for, timing (a warm-up run, device synchronization, the
median of repeats), and the measured rows as JSON (`--json`) for scripts/gpu-targets.py."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from normlab.execute.preflight import device_problem
from normlab.train.build import resolve_device


def benchmark_device(name: str) -> torch.device:
    """The device of a benchmark's --device ("auto": $NORMLAB_DEVICE, else CUDA when there is
    one); exits with the CLI's message, before any work, when this machine does not have it."""
    device = resolve_device(name)
    problem = device_problem(str(device), f"--device {name}")
    if problem:
        raise SystemExit(f"error: {problem}")
    return device


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA), so a timing covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of `fn` over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()}, {torch.get_num_threads()} threads"


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="also write the measured rows to FILE (for scripts/gpu-targets.py)")


def write_json(args: argparse.Namespace, benchmark: str, device: torch.device,
               rows: list[dict[str, Any]]) -> None:
    """The rows a benchmark printed, with its settings, device and torch version, to the file
    `args.json` (its --json option); nothing when that is None."""
    if args.json is None:
        return
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    Path(args.json).write_text(json.dumps(
        {"benchmark": benchmark, "device": device_name(device), "torch": torch.__version__,
         "date": datetime.date.today().isoformat(), "settings": settings, "rows": rows},
        indent=1) + "\n", encoding="utf-8")
