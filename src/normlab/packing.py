"""Which runs can be trained together as one computation (a "pack"), and how many at a time.

A pack is K "train" runs that share everything that fixes the shape of the computation (the
architecture with its norm and norm options, the data set, the batch size, the step budget, the
device and the numeric settings) and differ in anything a sweep varies: lr, schedule (with its
milestones, decay, warm-up and options), momentum, Nesterov, weight decay, init and its gain,
seed, update projection, probes, divergence threshold, logging interval and group label.
`normlab.train.packed.train_packed` trains such a pack; each member is the same function as
when trained alone.

`pack_key(spec)` is that compatibility key (None for a spec that is never packed: another task,
`compile` or `channels_last`). `pack_specs(specs, k)` groups a plan into packs of at most k in
plan order. `default_pack(device_kind)` reads the measured throughput table
(`packing_throughput.json`, written by `benchmarks/packed.py --record`) and returns the K with
the best aggregate images/s there, or 1 (off) when no K > 1 beats one run by 5 %.
Cost: pure Python over the specs; nothing is imported from torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from normlab.config import check_interval
from normlab.result import RunResult
from normlab.spec import RunSpec
from normlab.tasks import ProgressFn, execute_run

SHARED_SETTINGS = ("task", "data", "data_options", "augment", "model", "depth", "width", "norm",
                   "norm_options", "norm_placement", "batch_size", "epochs", "steps", "device",
                   "channels_last", "compile", "autocast")
MEMBER_SETTINGS = ("lr", "schedule", "milestones", "lr_decay", "warmup", "momentum", "nesterov",
                   "weight_decay", "init", "init_gain", "seed", "update_projection", "probes",
                   "diverge_loss", "log_every", "group", "options")
THROUGHPUT_TABLE = Path(__file__).with_name("packing_throughput.json")
MIN_GAIN = 1.05  # packing is on by default only where it beats one run by at least 5 %
CIFAR10_TRAIN = 50_000  # images in CIFAR-10's training split
REFERENCE_BATCH = 128  # the batch size whose measured rows set the --pack default


def pack_key(spec: RunSpec) -> tuple[Any, ...] | None:
    """The settings a pack's members must share, or None when the spec is trained alone.

    Not packed: tasks other than "train", `compile` (a compiled module is not vmapped) and
    `channels_last` (vmap cannot query channels-last strides on CUDA).
    """
    if spec.task != "train" or spec.compile or spec.channels_last:
        return None
    return tuple(getattr(spec, name) for name in SHARED_SETTINGS)


def pack_specs(specs: Sequence[RunSpec], k: int) -> list[list[RunSpec]]:
    """`specs` grouped into packs of at most `k` compatible runs, in plan order.

    A pack is listed where its first member stands in the plan; a spec that cannot be packed is a
    pack of one. With k = 1 every spec is its own pack.
    """
    check_interval("pack", k, 1, kind=int, low_open=False)
    packs: list[list[RunSpec]] = []
    open_pack: dict[tuple[Any, ...], list[RunSpec]] = {}
    for spec in specs:
        key = pack_key(spec) if k > 1 else None
        pack = open_pack.get(key) if key is not None else None
        if pack is None or len(pack) >= k:
            pack = [spec]
            packs.append(pack)
            if key is not None:
                open_pack[key] = pack
        else:
            pack.append(spec)
    return packs


def execute_group(specs: Sequence[RunSpec], out_dir: str | Path,
                  on_progress: ProgressFn | None = None) -> list[RunResult | None]:
    """A group from `pack_specs` into the store at `out_dir`: one spec runs alone
    (`execute_run`), several as a pack (`normlab.train.packed.execute_pack`)."""
    if len(specs) == 1:
        return [execute_run(specs[0], out_dir, on_progress)]
    from normlab.train.packed import execute_pack

    return execute_pack(specs, out_dir, on_progress)


@cache
def throughput_table() -> list[dict[str, Any]]:
    """The measured rows of `packing_throughput.json` (see benchmarks/packed.py)."""
    return json.loads(THROUGHPUT_TABLE.read_text(encoding="utf-8"))["rows"]


ROW_CONFIG = ("device_kind", "model", "depth", "norm", "batch_size", "kind", "pack")


def with_measured_rows(rows: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]
                       ) -> list[dict[str, Any]]:
    """The throughput table's `rows` with `new` in place of the rows of the same configuration
    (`ROW_CONFIG`: the device kind, not the device's name): one measurement per device kind and
    configuration, the latest, which is what `--pack` and `--dry-run` read."""
    def key(row: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(row[name] for name in ROW_CONFIG)

    replaced = {key(row) for row in new}
    return [row for row in rows if key(row) not in replaced] + list(new)


def _rows(device_kind: str, model: str = "resnet", depth: int | None = None
          ) -> list[dict[str, Any]]:
    rows = [r for r in throughput_table() if r["device_kind"] == device_kind
            and r["model"] == model]
    if depth is not None and rows:
        nearest = min({r["depth"] for r in rows}, key=lambda d: abs(d - depth))
        rows = [r for r in rows if r["depth"] == nearest]
    return rows


def default_pack(device_kind: str) -> int:
    """The pack size with the best measured aggregate throughput on `device_kind` ("cpu" or
    "cuda") for ResNet-20-sized runs at batch `REFERENCE_BATCH`, or 1 when it does not beat one
    run (the "solo" row, else the pack of one) by `MIN_GAIN`.
    """
    rows = [r for r in _rows(device_kind, depth=20) if r["batch_size"] == REFERENCE_BATCH]
    packed = [r for r in rows if r["kind"] == "packed"]
    solo = [r["images_per_s"] for r in rows if r["kind"] == "solo"] or \
        [r["images_per_s"] for r in packed if r["pack"] == 1]
    if not solo or not packed:
        return 1
    best = max(packed, key=lambda r: r["images_per_s"])
    return best["pack"] if best["images_per_s"] >= MIN_GAIN * solo[0] else 1


@dataclass(frozen=True)
class Rate:
    """Aggregate images/s of a pack, from the row measured on `device` at `measured_batch`."""

    images_per_s: float
    device: str
    measured_batch: int


def images_per_s(spec: RunSpec, device_kind: str, pack: int) -> Rate | None:
    """The aggregate images/s of a pack of `pack` runs like `spec` on `device_kind`, from the
    table's rows of the nearest measured depth (scaled by measured_depth / depth: the cost of a
    CIFAR ResNet step grows linearly with depth) and the nearest measured pack size; None when
    the table has no row for that device and model.

    Batch size: the rows of `spec`'s batch size when measured. Otherwise those of the next larger
    measured batch size, scaled by batch / measured batch: a step on fewer images takes no longer,
    so the rate is a lower bound and the time an upper bound (on a GPU a small batch's step is
    latency-bound and the bound is loose). Above every measured batch size, the rate of the
    largest (a larger batch does not lower the images/s).
    """
    rows = [r for r in _rows(device_kind, spec.model, spec.depth) if r["kind"] == "packed"]
    if not rows:
        return None
    measured = sorted({r["batch_size"] for r in rows})
    batch = min((b for b in measured if b >= spec.batch_size), default=measured[-1])
    row = min((r for r in rows if r["batch_size"] == batch),
              key=lambda r: (abs(r["pack"] - pack), r["pack"]))
    scale = row["depth"] / spec.depth * min(1.0, spec.batch_size / batch)
    return Rate(row["images_per_s"] * scale, row["device"], batch)


def default_workers(device_kind: str, devices: int = 1) -> int:
    """Worker processes per machine: on CPU 1 (torch already uses every core in one process);
    on GPUs the process count per GPU with the best measured aggregate throughput in the
    table's "processes" rows, times the number of GPUs."""
    rows = [r for r in _rows(device_kind, depth=20) if r["kind"] == "processes"]
    if device_kind == "cpu" or not rows:
        return 1
    return max(rows, key=lambda r: r["images_per_s"])["pack"] * max(devices, 1)


def device_kind(device: str | None) -> str:
    """The device type ("cuda", "cpu", "mps") the runs will use for a --device value; None
    means what the runs' "auto" resolves to ($NORMLAB_DEVICE, else CUDA when available)."""
    from normlab.train.build import resolve_device

    return resolve_device(device or "auto").type


def train_images(spec: RunSpec, sizes: dict[tuple[Any, ...], int]) -> int | None:
    """Training images a "train" run processes (steps x batch size); None for other tasks.

    `sizes` caches training-set sizes per (data, data_options); CIFAR-10's 50,000 is known
    without reading it, the other data sets are loaded once (they are small or synthetic).
    """
    if spec.task != "train":
        return None
    if spec.steps is None:
        key = (spec.data, spec.data_options)
        if key not in sizes:
            from normlab.data import load

            sizes[key] = CIFAR10_TRAIN if spec.data == "cifar10" else len(
                load(spec.data, **spec.mapping("data_options"))[0])
        per_epoch = sizes[key] // spec.batch_size
        steps = max(1, math.ceil(spec.epochs * per_epoch))
    else:
        steps = spec.steps
    return steps * spec.batch_size


def plan_estimate(specs: Sequence[RunSpec], k: int, *, fixed: bool = True) -> str:
    """`normlab run --dry-run`: the packs of at most `k` runs, and the device-hours of the plan's
    training runs on each device kind of the throughput table (with the device each was
    measured on), packed by `k` when `fixed` (the user chose it), else by each device kind's
    own default (`default_pack`)."""
    packs = pack_specs(specs, k)
    sizes: dict[tuple[Any, ...], int] = {}
    lines = [f"{len(packs)} packs of at most {k} runs (--pack {k}):"]
    for i, pack in enumerate(packs, 1):
        first = pack[0]
        what = (f"{first.model}-{first.depth} {first.norm} batch {first.batch_size}"
                if first.task == "train" else f"task {first.task}")
        ids = ", ".join(s.run_id for s in pack)
        lines.append(f"  pack {i:>3}: {len(pack):>2} x {what}: {ids}")
    images = [(spec, train_images(spec, sizes)) for spec in specs]
    other = sum(n is None for _, n in images)
    total = sum(n for _, n in images if n is not None)
    lines.append(f"training images in the plan: {total:,}"
                 + (f" (plus {other} runs of other tasks, not estimated)" if other else ""))
    for kind in sorted({r["device_kind"] for r in throughput_table()}):
        size = k if fixed else default_pack(kind)
        seconds, measured_on, missing = 0.0, set(), 0
        below, above = set(), set()  # batch sizes not measured: bounded, or taken as the largest
        for pack in pack_specs([s for s, n in images if n is not None], size):
            n = train_images(pack[0], sizes)
            rate = images_per_s(pack[0], kind, len(pack))
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
                         f"{'at most ' if below else ''}{amount} for 32x32 images (throughput "
                         f"measured on {'; '.join(sorted(measured_on))}"
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


def default_parallelism(pack: int | None, workers: int | None, device: str | None
                        ) -> tuple[int, int]:
    """(pack size, worker processes) for `normlab run`: the values given, else the measured
    defaults for the device (`default_pack`, `default_workers` over the visible GPUs)."""
    kind = device_kind(device)
    if workers is None:
        gpus = 1
        if kind == "cuda" and device is None:
            import torch

            gpus = torch.cuda.device_count()
        workers = default_workers(kind, gpus)
    return (pack if pack is not None else default_pack(kind)), workers
