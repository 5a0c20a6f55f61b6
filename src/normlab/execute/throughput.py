"""The measured throughput table, and what `normlab run` reads off it: the --pack and --workers
defaults and the --dry-run estimate of device-hours.

Rows (`packing_throughput.json`, written by `benchmarks/packed.py --record`): aggregate images/s
of K runs trained as one pack ("packed"), of one run alone ("solo"), or of K separate processes
on one device ("processes"), each for a device kind and a workload: the model and depth, its
width, the pixels per image, the norm and the batch size, with the device it was measured on.

A plan is matched to the rows of its nearest measured workload (width and pixels per image,
then depth), so a CIFAR-sized plan reads CIFAR-sized rows and the digits' smoke plans read rows
measured on 8x8 images. Cost: pure Python over the specs and the table (the estimate loads a
small data set once to count its images); nothing is imported from torch.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from normlab.data import load
from normlab.execute.packing import pack_key, pack_specs
from normlab.runs.spec import RunSpec
from normlab.train.build import resolve_device
from normlab.train.invariance import CPU_MIN_STACK

THROUGHPUT_TABLE = Path(__file__).with_name("packing_throughput.json")
ROW_CONFIG = ("device_kind", "model", "depth", "width", "pixels", "norm", "batch_size", "kind",
              "pack")
MIN_GAIN = 1.05  # packing is on by default only where it beats one run by at least 5 %
REFERENCE = {"width": 16, "pixels": 3 * 32 * 32, "depth": 20, "batch_size": 128}  # no plan given
CIFAR10 = (50_000, 3 * 32 * 32)  # CIFAR-10's training images and pixels per image
DataFacts = dict[tuple[Any, ...], tuple[int, int]]  # (data, data_options) -> (images, pixels)


@cache
def throughput_table() -> list[dict[str, Any]]:
    """The measured rows of `packing_throughput.json` (see benchmarks/packed.py)."""
    return json.loads(THROUGHPUT_TABLE.read_text(encoding="utf-8"))["rows"]


def with_measured_rows(rows: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]
                       ) -> list[dict[str, Any]]:
    """The table's `rows` with `new` in place of the rows of the same configuration
    (`ROW_CONFIG`: the device kind, not the device's name): one measurement per device kind and
    configuration, the latest, which is what `--pack` and `--dry-run` read."""
    def key(row: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(row[name] for name in ROW_CONFIG)

    replaced = {key(row) for row in new}
    return [row for row in rows if key(row) not in replaced] + list(new)


def data_facts(spec: RunSpec, cache: DataFacts
               ) -> tuple[int, int]:
    """(training images, pixels per image) of `spec`'s data set, cached per (data,
    data_options) in `cache`; CIFAR-10's are known without reading it, the other data sets are
    loaded once (they are small or synthetic)."""
    key = (spec.data, spec.data_options)
    if key not in cache:
        if spec.data == "cifar10":
            cache[key] = CIFAR10
        else:
            train = load(spec.data, **spec.mapping("data_options"))[0]
            cache[key] = (len(train), train.x[0].numel())
    return cache[key]


def workload(spec: RunSpec | None, cache: DataFacts) -> dict[str, int]:
    """The workload of `spec` as the table describes one (`REFERENCE` without a spec)."""
    if spec is None:
        return REFERENCE
    return {"width": spec.width, "pixels": data_facts(spec, cache)[1], "depth": spec.depth,
            "batch_size": spec.batch_size}


def _rows(device_kind: str, want: dict[str, int], kind: str, model: str = "resnet"
          ) -> list[dict[str, Any]]:
    """The rows of `kind` on `device_kind` for the measured workload nearest to `want`: width
    and pixels nearest on a log scale, then the nearest depth."""
    rows = [r for r in throughput_table() if r["device_kind"] == device_kind
            and r["model"] == model and r["kind"] == kind]
    if not rows:
        return []
    shape = min({(r["width"], r["pixels"]) for r in rows}, key=lambda wp: (
        abs(math.log(wp[0] / want["width"])) + abs(math.log(wp[1] / want["pixels"]))))
    rows = [r for r in rows if (r["width"], r["pixels"]) == shape]
    depth = min({r["depth"] for r in rows}, key=lambda d: abs(d - want["depth"]))
    return [r for r in rows if r["depth"] == depth]


def default_pack(device_kind: str, spec: RunSpec | None = None,
                 cache: DataFacts | None = None) -> int:
    """The pack size with the best measured aggregate images/s on `device_kind` for runs like
    `spec` (the nearest measured workload and batch size; without a spec, ResNet-20 at batch 128
    on CIFAR-sized images), or 1 when it does not beat one run (the "solo" row, else the pack of
    one) by `MIN_GAIN`. On a CPU, where a lone run stacks `CPU_MIN_STACK` models anyway
    (normlab.train.invariance), the best measured pack of at least that many, and at least
    `CPU_MIN_STACK`. `cache`: as for `data_facts`."""
    want = workload(spec, {} if cache is None else cache)
    packed = _rows(device_kind, want, "packed")
    if not packed:
        return CPU_MIN_STACK if device_kind == "cpu" else 1
    batch = min({r["batch_size"] for r in packed},
                key=lambda b: abs(math.log(b / want["batch_size"])))
    packed = [r for r in packed if r["batch_size"] == batch]
    if device_kind == "cpu":
        large = [r for r in packed if r["pack"] >= CPU_MIN_STACK]
        return max(large, key=lambda r: r["images_per_s"])["pack"] if large else CPU_MIN_STACK
    same = ("device_kind", "model", "width", "pixels", "depth", "batch_size")
    solo = [r["images_per_s"] for r in throughput_table() if r["kind"] == "solo"
            and all(r[k] == packed[0][k] for k in same)] or \
        [r["images_per_s"] for r in packed if r["pack"] == 1]
    if not solo:
        return 1
    best = max(packed, key=lambda r: r["images_per_s"])
    return best["pack"] if best["images_per_s"] >= MIN_GAIN * solo[0] else 1


def typical_spec(specs: Sequence[RunSpec]) -> RunSpec | None:
    """The first spec of the plan's largest group of packable runs (the runs the defaults are
    chosen for), or None when nothing in the plan can be packed."""
    keys = Counter(key for key in map(pack_key, specs) if key is not None)
    if not keys:
        return None
    common = keys.most_common(1)[0][0]
    return next(s for s in specs if pack_key(s) == common)


@dataclass(frozen=True)
class Rate:
    """Aggregate images/s of a pack, from the row measured on `device` at `measured_batch`."""

    images_per_s: float
    device: str
    measured_batch: int


def images_per_s(spec: RunSpec, device_kind: str, pack: int,
                 cache: DataFacts | None = None) -> Rate | None:
    """The aggregate images/s of a pack of `pack` runs like `spec` on `device_kind`, from the
    rows of the nearest measured workload (scaled by measured_depth / depth: the cost of a
    CIFAR ResNet step grows linearly with depth) and the nearest measured pack size; None when
    the table has no row for that device and model.

    Batch size: the rows of `spec`'s batch size when measured. Otherwise those of the next larger
    measured batch size, scaled by batch / measured batch: a step on fewer images takes no longer,
    so the rate is a lower bound and the time an upper bound (on a GPU a small batch's step is
    latency-bound and the bound is loose). Above every measured batch size, the rate of the
    largest (a larger batch does not lower the images/s).
    """
    rows = _rows(device_kind, workload(spec, {} if cache is None else cache), "packed",
                 spec.model)
    if not rows:
        return None
    measured = sorted({r["batch_size"] for r in rows})
    batch = min((b for b in measured if b >= spec.batch_size), default=measured[-1])
    row = min((r for r in rows if r["batch_size"] == batch),
              key=lambda r: (abs(r["pack"] - pack), r["pack"]))
    scale = row["depth"] / spec.depth * min(1.0, spec.batch_size / batch)
    return Rate(row["images_per_s"] * scale, row["device"], batch)


def default_workers(device_kind: str, devices: int = 1) -> int:
    """Worker processes per machine: on CPU one per usable core (a CPU pack computes on one
    thread, normlab.train.invariance); on GPUs the process count per GPU with the best
    measured aggregate throughput in the table's "processes" rows, times the number of GPUs."""
    if device_kind == "cpu":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
    rows = _rows(device_kind, REFERENCE, "processes")
    if not rows:
        return 1
    return max(rows, key=lambda r: r["images_per_s"])["pack"] * max(devices, 1)


def device_kind(device: str | None) -> str:
    """The device type ("cuda", "cpu", "mps") the runs will use for a --device value; None
    means what the runs' "auto" resolves to ($NORMLAB_DEVICE, else CUDA when available)."""
    return resolve_device(device or "auto").type


def default_parallelism(pack: int | None, workers: int | None, device: str | None,
                        specs: Sequence[RunSpec] = ()) -> tuple[int, int]:
    """(pack size, worker processes) for `normlab run` on the plan `specs`: the values given,
    else the measured defaults for the device (`default_pack` for the plan's `typical_spec`,
    `default_workers` over the visible GPUs; on a CPU no more than the plan has packs)."""
    kind = device_kind(device)
    pack = pack if pack is not None else default_pack(kind, typical_spec(specs))
    if workers is None:
        gpus = 1
        if kind == "cuda" and device is None:
            import torch

            gpus = torch.cuda.device_count()
        workers = default_workers(kind, gpus)
        if kind == "cpu" and specs:
            workers = max(1, min(workers, len(pack_specs(specs, pack))))
    return pack, workers


def train_images(spec: RunSpec, cache: DataFacts) -> int | None:
    """Training images a "train" run processes (steps x batch size); None for other tasks."""
    if spec.task != "train":
        return None
    if spec.steps is None:
        per_epoch = data_facts(spec, cache)[0] // spec.batch_size
        steps = max(1, math.ceil(spec.epochs * per_epoch))
    else:
        steps = spec.steps
    return steps * spec.batch_size


def plan_estimate(specs: Sequence[RunSpec], k: int, *, fixed: bool = True) -> str:
    """`normlab run --dry-run`: the packs of at most `k` runs, and the device-hours of the plan's
    training runs on each device kind of the throughput table (with the device each was
    measured on), packed by `k` when `fixed` (the user chose it), else by each device kind's
    own default for the plan (`default_pack`)."""
    packs = pack_specs(specs, k)
    cache: DataFacts = {}
    lines = [f"{len(packs)} packs of at most {k} runs (--pack {k}):"]
    for i, pack in enumerate(packs, 1):
        first = pack[0]
        what = (f"{first.model}-{first.depth} {first.norm} batch {first.batch_size}"
                if first.task == "train" else f"task {first.task}")
        ids = ", ".join(s.run_id for s in pack)
        lines.append(f"  pack {i:>3}: {len(pack):>2} x {what}: {ids}")
    images = [(spec, train_images(spec, cache)) for spec in specs]
    other = sum(n is None for _, n in images)
    total = sum(n for _, n in images if n is not None)
    lines.append(f"training images in the plan: {total:,}"
                 + (f" (plus {other} runs of other tasks, not estimated)" if other else ""))
    typical = typical_spec(specs)
    for kind in sorted({r["device_kind"] for r in throughput_table()}):
        size = k if fixed else default_pack(kind, typical, cache)
        seconds, measured_on, missing = 0.0, set(), 0
        below, above = set(), set()  # batch sizes not measured: bounded, or taken as the largest
        for pack in pack_specs([s for s, n in images if n is not None], size):
            n = train_images(pack[0], cache)
            rate = images_per_s(pack[0], kind, len(pack), cache)
            if rate is None or n is None:
                missing += 1
                continue
            seconds += n * len(pack) / rate.images_per_s
            measured_on.add(rate.device)
            batch = pack[0].batch_size
            if rate.measured_batch > batch:
                below.add(batch)
            elif rate.measured_batch < batch:
                above.add(batch)
        if measured_on:
            amount = (f"{seconds / 3600:.2f} device-hours" if seconds >= 360
                      else f"{seconds / 60:.1f} device-minutes")
            lines.append(f"estimate on {kind} (packs of at most {size}): "
                         f"{'at most ' if below else ''}{amount} (throughput measured on "
                         f"{'; '.join(sorted(measured_on))}"
                         + (f"; {missing} packs of models without a row left out" if missing
                            else "") + ")"
                         + _unmeasured_batches(below, above))
    return "\n".join(lines)


def _unmeasured_batches(below: set[int], above: set[int]) -> str:
    """The estimate's note on batch sizes without a measured row (see `images_per_s`)."""
    notes = []
    if below:
        notes.append(f"batch sizes {_listed(below)} not measured: each counted at the step time "
                     f"of the next larger measured batch size, an upper bound")
    if above:
        notes.append(f"batch sizes {_listed(above)} not measured: counted at the images/s of "
                     f"the largest measured batch size")
    return "".join(f"\n  {note}" for note in notes)


def _listed(batches: set[int]) -> str:
    return ", ".join(str(b) for b in sorted(batches))
