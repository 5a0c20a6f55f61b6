"""Training throughput (images/s) of `normlab.train` against a plain PyTorch loop, same process.

    python benchmarks/train_throughput.py              # ResNet-20, batch 128, CIFAR-shaped data
    python benchmarks/train_throughput.py --quick      # a few steps: a fast check
    python benchmarks/train_throughput.py --device cuda --channels-last --bf16

Both sides train the same model (normlab's ResNet-20 with BatchNorm, built by
`normlab.nn.build_model`) with the same optimizer (SGD, momentum 0.9, weight decay 5e-4) on the
same CIFAR-shaped synthetic images (3x32x32, standardized; no download), with the standard
augmentation (4-pixel zero pad, random 32x32 crop, horizontal flip):
- normlab: `normlab.train.train(spec)`: data resident on the device, augmentation on whole
  batches there (`BatchIterator`), losses read back every 32 steps, an eval of a 256-image test
  set at each epoch end (20 steps) included. On a GPU, steps/s comes from differencing two
  runs (warm-up + S steps minus warm-up steps), which cancels the set-up; on a CPU, from the
  median per-step time between callback calls after the warm-up (robust to other jobs on a
  shared machine; the epoch-end eval falls in one interval and the median ignores it).
- plain: a `torch.utils.data.Dataset` that pads, crops and flips one image per `__getitem__`,
  a `DataLoader` (shuffle, drop_last, `--workers` processes, pinned memory on CUDA), `.to(device)`
  per batch, forward, backward, step; no per-step host sync; timed after a warm-up (GPU: total
  time; CPU: median per-step time, data loading included).
Reported: the median over `--repeats` of images/s, and the median of the per-repeat ratios
normlab / plain (the two loops alternate, so a change of machine load hits both).
Targets: >= 1.0x on CPU; >= 2x on a GPU for ResNet-20 at batch 128.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from normlab.data import load
from normlab.nn import build_model
from normlab.spec import RunSpec
from normlab.train import train
from normlab.train.build import resolve_device

N_TRAIN_BATCHES = 20  # an epoch of the synthetic data set, in steps
N_TEST = 256


class AugmentedImages(Dataset):
    """One image at a time: zero-pad by `pad`, random crop back to HxW, random horizontal flip."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, pad: int = 4) -> None:
        self.x, self.y, self.pad = x, y, pad

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = F.pad(self.x[i], (self.pad,) * 4)  # (C, H+2p, W+2p)
        height, width = self.x.shape[2:]
        top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
        image = image[:, top:top + height, left:left + width]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, self.y[i]


def spec_for(args: argparse.Namespace, steps: int) -> RunSpec:
    return RunSpec(data="synthetic", data_options={"n_train": N_TRAIN_BATCHES * args.batch,
                                                  "n_test": N_TEST, "shape": [3, 32, 32]},
                   depth=args.depth, width=16, norm="batch", batch_size=args.batch,
                   steps=steps, lr=0.05, schedule="constant", momentum=0.9, weight_decay=5e-4,
                   device=args.device, log_every=10_000, channels_last=args.channels_last,
                   compile=args.compile, autocast="bf16" if args.bf16 else "none")


def normlab_seconds(args: argparse.Namespace, steps: int) -> float:
    """Wall time of `train` for `steps` steps (set-up, final eval and all)."""
    start = time.perf_counter()
    train(spec_for(args, steps))
    if resolve_device(args.device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def normlab_images_per_s(args: argparse.Namespace) -> float:
    """Images/s of `train`, from two runs that differ by `args.steps` steps."""
    short = normlab_seconds(args, args.warmup)
    long = normlab_seconds(args, args.warmup + args.steps)
    return args.steps * args.batch / max(long - short, 1e-9)


def normlab_step_seconds(args: argparse.Namespace) -> list[float]:
    """CPU only: the duration of each step after the warm-up, from callback timestamps (on a
    CPU the per-step loss read-back that a callback implies costs nothing)."""
    stamps: list[float] = []
    train(spec_for(args, args.warmup + args.steps),
          callbacks=[lambda state: stamps.append(time.perf_counter())])
    return [b - a for a, b in zip(stamps[args.warmup:], stamps[args.warmup + 1:], strict=False)]


class PlainLoop:
    """A textbook DataLoader loop on the same model, optimizer and data, set up once."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.device = resolve_device(args.device)
        spec = spec_for(args, 1)
        train_set, _ = load("synthetic", **spec.mapping("data_options"))
        torch.manual_seed(0)
        model = build_model("resnet", depth=args.depth, width=16, norm="batch",
                            init=spec.init, num_classes=train_set.num_classes, in_channels=3,
                            seed=0).to(self.device)
        self.memory_format = torch.channels_last if args.channels_last \
            else torch.contiguous_format
        self.model = model.to(memory_format=self.memory_format).train()
        self.forward = torch.compile(self.model) if args.compile else self.model
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9,
                                         weight_decay=5e-4)
        self.loader = DataLoader(AugmentedImages(train_set.x, train_set.y),
                                 batch_size=args.batch, shuffle=True, drop_last=True,
                                 num_workers=args.workers,
                                 pin_memory=self.device.type == "cuda",
                                 persistent_workers=args.workers > 0)
        self.bf16 = args.bf16

    def seconds(self, count: int) -> float:
        """Wall time of `count` training steps."""
        return sum(self.step_seconds(count))

    def step_seconds(self, count: int) -> list[float]:
        """The duration of each of `count` training steps (data loading included)."""
        done, times, start = 0, [], time.perf_counter()
        while done < count:
            for x, y in self.loader:
                x = x.to(self.device, non_blocking=True).contiguous(
                    memory_format=self.memory_format)
                y = y.to(self.device, non_blocking=True)
                with (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16
                      else contextlib.nullcontext()):
                    loss = F.cross_entropy(self.forward(x).float(), y)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                done += 1
                if self.device.type == "cuda" and done == count:
                    torch.cuda.synchronize()
                now = time.perf_counter()
                times.append(now - start)
                start = now
                if done == count:
                    break
        return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers of the plain loop (default 0 on CPU, 4 on GPU)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--quick", action="store_true", help="few steps, 1 repeat")
    args = parser.parse_args()
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    if args.quick:
        args.steps, args.warmup, args.repeats = args.steps or 5, args.warmup or 2, 1
    args.steps = args.steps or (200 if gpu else 30)
    args.warmup = args.warmup or (30 if gpu else 5)
    args.workers = (4 if gpu else 0) if args.workers is None else args.workers

    # Interleaved, so that a change of machine load between repeats hits both loops alike.
    plain_loop = PlainLoop(args)
    plain_loop.seconds(args.warmup)
    normlab_seconds(args, args.warmup)  # first-use costs (imports, kernels, compilation)
    plains, ours_all = [], []
    for _ in range(args.repeats):
        if gpu:  # totals: the host must not wait for the device each step
            plains.append(args.steps * args.batch / plain_loop.seconds(args.steps))
            ours_all.append(normlab_images_per_s(args))
        else:  # medians of per-step times: robust to other jobs on a shared CPU
            plains.append(args.batch / statistics.median(plain_loop.step_seconds(args.steps)))
            ours_all.append(args.batch / statistics.median(normlab_step_seconds(args)))
    plain, ours = statistics.median(plains), statistics.median(ours_all)
    ratio = statistics.median(o / p for o, p in zip(ours_all, plains, strict=True))
    name = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"ResNet-{args.depth} (BatchNorm), batch {args.batch}, {name}, torch {torch.__version__}"
          f"; {args.steps} timed steps, median of {args.repeats}; channels_last="
          f"{args.channels_last}, compile={args.compile}, bf16={args.bf16}, "
          f"plain workers={args.workers}")
    print(f"{'loop':<28}{'images/s':>12}{'ratio':>8}")
    print(f"{'plain (DataLoader)':<28}{plain:>12.0f}{1.0:>8.2f}")
    print(f"{'normlab.train':<28}{ours:>12.0f}{ratio:>8.2f}")
    print("ratio: median over repeats of normlab / plain, each repeat timing both loops")


if __name__ == "__main__":
    main()
