"""Packed training throughput: aggregate images/s of K runs trained as one computation.

    python benchmarks/packed.py                      # ResNet-20, BN, batch 128, K = 1 2 4 8 16
    python benchmarks/packed.py --quick              # K = 1 2 4, a few steps: a fast check
    python benchmarks/packed.py --device cuda --record   # and write the rows to the table
    python benchmarks/packed.py --kernels            # grouped conv vs vmap vs a loop, one layer
    python benchmarks/packed.py --batch 2 8 32 128   # one table (and recorded rows) per batch

Measured in one process on synthetic data (CIFAR-shaped 3x32x32 by default, `--shape C H W`
for others, e.g. `--shape 1 8 8 --width 8` for the digits' smoke runs; no download), steps only (no
evaluation), with `--warmup` steps first and the device synchronized around each timing:
- solo: one `normlab.train` run's step (`loop._Run.sgd_step`), the baseline;
- packed K: one step of `normlab.train.packed` with K members that differ in lr and seed
  (`_Pack.sgd_step`: stacking the K batches, vmapped forward and backward, SGD on the stack).
Reported: the median over `--repeats` of aggregate images/s (K x batch / step time) and its ratio
to solo and to packed K = 1, all from this run. `--record` writes the rows into
src/normlab/execute/packing_throughput.json, which `normlab run --pack` defaults and `--dry-run`
estimates read; the row names the device it was measured on.
Targets (issue 10, H100/H200): ResNet-20 batch 128 at K = 8 >= 4x solo (>= 49,000 images/s on
an H200); ResNet-110 >= 14,000 images/s aggregate.

`--kernels` times forward+backward of one 3x3 convolution (16 -> 16 channels, 32x32, batch B)
for K members three ways: `vmap` over stacked weights, one grouped convolution (groups = K) on
the members' batches laid side by side in the channels, and a Python loop of K convolutions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

# benchmarks/ is on sys.path when run as a script
from _timing import add_json_option, benchmark_device, device_name, sync, write_json
from torch.func import vmap

from normlab.execute.throughput import with_measured_rows
from normlab.runs.spec import RunSpec
from normlab.runs.tasks import RunContext
from normlab.train.loop import _Run
from normlab.train.packed import _Pack

TABLE = (Path(__file__).resolve().parents[1] / "src" / "normlab" / "execute"
         / "packing_throughput.json")


def spec_for(args: argparse.Namespace, seed: int = 0) -> RunSpec:
    n_train = args.batch * 8
    return RunSpec(data="synthetic", data_options={"n_train": n_train, "n_test": 64,
                                                  "shape": list(args.shape)},
                   depth=args.depth, width=args.width, norm=args.norm, batch_size=args.batch,
                   steps=100_000, lr=0.01 * (1 + seed % 4), seed=seed, schedule="constant",
                   momentum=0.9, weight_decay=5e-4, device=args.device, log_every=10_000)


def time_steps(step: Callable[[int], None], args: argparse.Namespace,
               device: torch.device) -> float:
    """Median seconds per step over `--repeats` timings of `--steps` steps each."""
    for s in range(args.warmup):
        step(s)
    times = []
    for r in range(args.repeats):
        sync(device)
        start = time.perf_counter()
        for s in range(args.steps):
            step(args.warmup + r * args.steps + s)
        sync(device)
        times.append((time.perf_counter() - start) / args.steps)
    return statistics.median(times)


def solo_seconds(args: argparse.Namespace, device: torch.device) -> float:
    run = _Run(spec_for(args), [], RunContext(), device)
    batches = iter(run.batches)
    x, y = next(batches)
    return time_steps(lambda s: run.sgd_step(s, x, y), args, device)


def packed_seconds(args: argparse.Namespace, k: int, device: torch.device) -> float:
    pack = _Pack([spec_for(args, seed) for seed in range(k)], None, None, device, None, 0.0)
    for member in pack.members:
        member.x, member.y = next(iter(member.batches))

    def step(s: int) -> None:
        pack.sgd_step(s)
        pack.pending.clear()  # the losses stay on the device, as between read-backs

    return time_steps(step, args, device)


def throughput(args: argparse.Namespace, device: torch.device) -> tuple[list[dict], float]:
    """Aggregate images/s per pack size (rows) and of the solo run; prints the table."""
    solo = args.batch / solo_seconds(args, device)
    rows = []
    for k in args.packs:
        rate = k * args.batch / packed_seconds(args, k, device)
        rows.append({"pack": k, "images_per_s": rate})
    base = rows[0]["images_per_s"] if rows[0]["pack"] == 1 else solo
    shape = "x".join(map(str, args.shape))
    print(f"ResNet-{args.depth} (width {args.width}), norm {args.norm}, batch {args.batch}, "
          f"{shape} images on {device_name(device)}, torch {torch.__version__}")
    print(f"{'run':<10} {'images/s':>10} {'x solo':>8} {'x K=1':>7}")
    print(f"{'solo':<10} {solo:>10.0f} {1.0:>8.2f} {solo / base:>7.2f}")
    for row in rows:
        rate = row["images_per_s"]
        print(f"{'K = ' + str(row['pack']):<10} {rate:>10.0f} {rate / solo:>8.2f} "
              f"{rate / base:>7.2f}")
    return rows, solo


def record(args: argparse.Namespace, device: torch.device, rows: list[dict]) -> None:
    """Put the rows in the table in place of this device kind's rows of the same configuration
    (`normlab.execute.throughput.with_measured_rows`); keep all others."""
    table = json.loads(TABLE.read_text(encoding="utf-8"))
    name = device_name(device) + (f" ({args.note})" if args.note else "")
    new = [{"device_kind": device.type, "device": name, "model": "resnet", "depth": args.depth,
            "width": args.width, "pixels": math.prod(args.shape), "norm": args.norm,
            "batch_size": args.batch, "kind": r["kind"], "pack": r["pack"],
            "images_per_s": round(r["images_per_s"], 1), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(),
            "command": "python benchmarks/packed.py --record"} for r in rows]
    table["rows"] = with_measured_rows(table["rows"], new)
    TABLE.write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    print(f"recorded {len(new)} rows in {TABLE}")


def conv_by_vmap(x: torch.Tensor, w: torch.Tensor) -> None:
    """x (K, B, C, H, W), w (K, C, C, 3, 3): vmap over the members."""
    vmap(lambda xi, wi: F.conv2d(xi, wi, padding=1))(x, w).square().sum().backward()


def conv_by_groups(x: torch.Tensor, w: torch.Tensor) -> None:
    """The members side by side in the channels, one convolution with groups = K."""
    k, b, c, h, width = x.shape
    side = x.transpose(0, 1).reshape(b, k * c, h, width)  # (B, K*C, H, W)
    out = F.conv2d(side, w.reshape(k * c, c, 3, 3), padding=1, groups=k)
    out.square().sum().backward()


def conv_by_loop(x: torch.Tensor, w: torch.Tensor) -> None:
    """One convolution per member."""
    total = sum(F.conv2d(x[i], w[i], padding=1).square().sum() for i in range(len(x)))
    total.backward()  # type: ignore[union-attr]


def kernels(args: argparse.Namespace, device: torch.device) -> None:
    """Forward+backward of one 3x3 conv for K members: vmap, grouped conv, Python loop."""
    c, b = 16, args.batch
    print(f"one conv3x3 {c}->{c}, 32x32, batch {b}, forward+backward, ms per step")
    print(f"{'K':>3} {'vmap':>8} {'grouped':>8} {'loop':>8} {'vmap/grouped':>13}")
    for k in args.packs:
        x = torch.randn(k, b, c, 32, 32, device=device)
        w = torch.randn(k, c, c, 3, 3, device=device, requires_grad=True)
        ms = [1e3 * time_steps(lambda s, f=f: f(x, w), args, device)  # noqa: B023
              for f in (conv_by_vmap, conv_by_groups, conv_by_loop)]
        print(f"{k:>3} {ms[0]:>8.2f} {ms[1]:>8.2f} {ms[2]:>8.2f} {ms[0] / ms[1]:>13.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--shape", type=int, nargs=3, default=[3, 32, 32], metavar=("C", "H", "W"),
                        help="image shape of the synthetic data")
    parser.add_argument("--norm", default="batch")
    parser.add_argument("--batch", type=int, nargs="+", default=[128],
                        help="batch size per member; several: one table (and rows) each")
    parser.add_argument("--packs", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=6,
                        help="untimed steps first (a CUDA graph is captured at the 4th)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="K = 1 2 4, 3 steps after 5, 1 repeat")
    parser.add_argument("--kernels", action="store_true", help="the one-layer comparison")
    parser.add_argument("--record", action="store_true", help="write rows to the table")
    parser.add_argument("--note", default="", help="added to the device name when recording")
    add_json_option(parser)
    args = parser.parse_args()
    if args.quick:
        args.packs, args.steps, args.warmup, args.repeats = [1, 2, 4], 3, 5, 1
    device = benchmark_device(args.device)
    warnings.filterwarnings("ignore", message="There is a performance drop")
    batches, measured = args.batch, []
    for batch in batches:
        args.batch = batch
        if args.kernels:
            kernels(args, device)
            continue
        rows, solo = throughput(args, device)
        rows = [{"kind": "solo", "pack": 1, "images_per_s": solo}] + \
            [{"kind": "packed", **row} for row in rows]
        measured += [{"depth": args.depth, "width": args.width, "shape": args.shape,
                      "batch": batch, **row,
                      "x_solo": row["images_per_s"] / solo} for row in rows]
        if args.record:
            record(args, device, rows)
    args.batch = batches
    write_json(args, "packed", device, measured)


if __name__ == "__main__":
    main()
