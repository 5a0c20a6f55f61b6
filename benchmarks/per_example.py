"""Cost of per-example gradients on ResNet-20, as multiples of one forward+backward.

    python benchmarks/per_example.py            # batch 128, CIFAR-shaped synthetic input
    python benchmarks/per_example.py --quick    # batch 16, fewer repeats: a fast check
    python benchmarks/per_example.py --device cuda

Measured in the same run, for a model without norm and one with BatchNorm in train mode:
- backward: one forward + backward of the mean loss (the unit);
- contributions: `per_example_contributions` (layer hooks, one backward);
- exact: `per_example_loss_grads` with its automatic method (vmap without batch coupling; with
  BN one VJP row at a time, replayed from a CUDA graph on a GPU) and, with BN, forced chunk
  sizes (batched VJPs over that many one-hot cotangents at once);
- naive loop: one forward, then B backward passes of ell_i (retain_graph).
Targets: contributions <= 3x backward; exact no slower than the naive loop on a CPU and >= 2x
faster than it on a GPU at B = 128 with BN, its peak memory bounded by `--max-memory`. Each
method is warmed up once, then timed `--repeats` times (median); on CUDA the peak memory of each
method's timed runs is printed beside it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

# benchmarks/ is on sys.path when run as a script
from _timing import add_json_option, benchmark_device, timed, write_json

from normlab.nn import resnet_cifar
from normlab.probes import per_example_contributions, per_example_loss_grads
from normlab.probes._hygiene import frozen_norm_statistics


def naive_loop(model, x, y) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    with frozen_norm_statistics(model):
        losses = F.cross_entropy(model(x), y, reduction="none")
        for i in range(x.shape[0]):
            torch.autograd.grad(losses[i], params, retain_graph=True)


def backward(model, x, y) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    with frozen_norm_statistics(model):
        torch.autograd.grad(F.cross_entropy(model(x), y), params)


def bench_methods(model, loss_fn, x, y, chunks: list[int], max_memory: float | None
                  ) -> dict[str, Callable[[], object]]:
    """The timed methods, each a closure over this model and batch."""
    data = (x, y)
    methods: dict[str, Callable[[], object]] = {
        "backward": lambda: backward(model, x, y),
        "contributions": lambda: per_example_contributions(model, loss_fn, data),
        "exact (auto)": lambda: per_example_loss_grads(model, loss_fn, data,
                                                       max_memory=max_memory),
    }
    for chunk in chunks:
        methods[f"exact (vjp, chunk {chunk})"] = (
            lambda chunk=chunk: per_example_loss_grads(model, loss_fn, data, chunk_size=chunk))
    methods["naive loop of B backwards"] = lambda: naive_loop(model, x, y)
    return methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="batch 16, 2 repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunks", default="16,64", help="forced VJP chunk sizes (BN model)")
    parser.add_argument("--max-memory", type=float, default=None,
                        help="bytes for the automatic VJP chunk (default: half the free memory)")
    add_json_option(parser)
    args = parser.parse_args()
    batch, repeats = (16, 2) if args.quick else (args.batch, args.repeats)
    device = benchmark_device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    loss_fn = torch.nn.CrossEntropyLoss()
    print(f"ResNet-20, batch {batch}, device {device} ({torch.get_num_threads()} threads), "
          f"median of {repeats} after warm-up; seconds and multiples of one forward+backward")
    cuda = device.type == "cuda"
    print(f"{'norm':<6} {'method':<28} {'seconds':>9} {'x backward':>11} {'x naive':>8}"
          + (f" {'peak MiB':>9}" if cuda else ""))
    rows = []
    for norm in ("none", "batch"):
        model = resnet_cifar(20, norm=norm, init="kaiming_normal", seed=0).to(device).train()
        methods = bench_methods(model, loss_fn, x, y, [int(c) for c in args.chunks.split(",")
                                                       if c and int(c) <= batch and norm != "none"],
                                args.max_memory)
        seconds, peaks = {}, {}
        for name, fn in methods.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            seconds[name] = timed(fn, repeats, device)
            if cuda:
                peaks[name] = torch.cuda.max_memory_allocated(device) / 2**20
        for name, s in seconds.items():
            row = {"norm": norm, "batch": batch, "method": name, "seconds": s,
                   "x_backward": s / seconds["backward"],
                   "x_naive": s / seconds["naive loop of B backwards"],
                   "peak_mib": peaks.get(name)}
            rows.append(row)
            print(f"{norm:<6} {name:<28} {s:9.3f} {row['x_backward']:11.2f} {row['x_naive']:8.2f}"
                  + (f" {peaks[name]:9.0f}" if cuda else ""))
    write_json(args, "per_example", device, rows)


if __name__ == "__main__":
    main()
