"""Training throughput (images/s) of `normlab.train` against a plain PyTorch loop, same process.

    python benchmarks/train_throughput.py              # ResNet-20 and -110 (GPU), batch 128
    python benchmarks/train_throughput.py --quick      # a few steps: a fast check
    python benchmarks/train_throughput.py --device cuda --depth 20 --channels-last --bf16

Every loop trains the same model (normlab's ResNet with BatchNorm, built by
`normlab.nn.build_model`) with the same optimizer (SGD, momentum 0.9, weight decay 5e-4) on the
same CIFAR-shaped synthetic images (3x32x32, standardized; no download), with the standard
augmentation (4-pixel zero pad, random 32x32 crop, horizontal flip):
- plain (DataLoader): a `torch.utils.data.Dataset` that pads, crops and flips one image per
  `__getitem__`, a `DataLoader` (shuffle, drop_last, `--workers` processes, pinned memory on
  CUDA), `.to(device)` per batch, forward, backward, step; no per-step host sync; timed after a
  warm-up (GPU: total time; CPU: median per-step time, data loading included).
- normlab, eager: `normlab.train.train(spec)` with `options.cuda_graph="off"`: data resident on
  the device, augmentation on whole batches there (`BatchIterator`), torch.optim.SGD, losses
  read back every 32 steps, an eval of a 256-image test set at each epoch end (20 steps).
- normlab, CUDA graph: the same with `options.cuda_graph="on"` (GPU only): the whole step and
  the evaluation replayed from CUDA graphs (normlab.train.graphed).
On a GPU, normlab's steps/s come from differencing two runs (warm-up + S steps minus warm-up
steps), which cancels the set-up and the graph capture; on a CPU, from the median per-step time
between callback calls after the warm-up (robust to other jobs on a shared machine; the
epoch-end eval falls in one interval and the median ignores it).
Reported: the median over `--repeats` of images/s, and the median of the per-repeat ratios
loop / plain (the loops alternate, so a change of machine load hits all of them).
Targets: >= 1.0x on CPU; on an H100/H200, >= 2x with the CUDA graph for ResNet-20 and ResNet-110
at batch 128 (issue 9).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

# benchmarks/ is on sys.path when run as a script
from _timing import add_json_option, benchmark_device, write_json
from torch.utils.data import DataLoader, Dataset

from normlab.data import load
from normlab.nn import build_model
from normlab.runs.spec import RunSpec
from normlab.train import train
from normlab.train.build import resolve_device
from normlab.train.graphed import WARMUP_STEPS

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


def spec_for(args: argparse.Namespace, depth: int, steps: int, graph: str) -> RunSpec:
    return RunSpec(data="synthetic", data_options={"n_train": N_TRAIN_BATCHES * args.batch,
                                                  "n_test": N_TEST, "shape": [3, 32, 32]},
                   depth=depth, width=16, norm="batch", batch_size=args.batch,
                   steps=steps, lr=0.05, schedule="constant", momentum=0.9, weight_decay=5e-4,
                   device=args.device, log_every=10_000, channels_last=args.channels_last,
                   compile=args.compile, autocast="bf16" if args.bf16 else "none",
                   options={"cuda_graph": graph})


def normlab_seconds(args: argparse.Namespace, depth: int, steps: int, graph: str) -> float:
    """Wall time of `train` for `steps` steps (set-up, evaluations and all)."""
    start = time.perf_counter()
    result = train(spec_for(args, depth, steps, graph))
    if resolve_device(args.device).type == "cuda":
        torch.cuda.synchronize()
    wanted = "cuda_graph" if graph == "on" else "optimizer"
    assert result.provenance["train_step"] == wanted, result.provenance["train_step"]
    return time.perf_counter() - start


def normlab_images_per_s(args: argparse.Namespace, depth: int, graph: str) -> float:
    """Images/s of `train`, from two runs that differ by `args.steps` steps."""
    short = normlab_seconds(args, depth, args.warmup, graph)
    long = normlab_seconds(args, depth, args.warmup + args.steps, graph)
    return args.steps * args.batch / max(long - short, 1e-9)


def normlab_step_seconds(args: argparse.Namespace, depth: int) -> list[float]:
    """CPU only: the duration of each step after the warm-up, from callback timestamps (on a
    CPU the per-step loss read-back that a callback implies costs nothing)."""
    stamps: list[float] = []
    train(spec_for(args, depth, args.warmup + args.steps, "off"),
          callbacks=[lambda state: stamps.append(time.perf_counter())])
    return [b - a for a, b in zip(stamps[args.warmup:], stamps[args.warmup + 1:], strict=False)]


class PlainLoop:
    """A textbook DataLoader loop on the same model, optimizer and data, set up once."""

    def __init__(self, args: argparse.Namespace, depth: int) -> None:
        self.device = resolve_device(args.device)
        spec = spec_for(args, depth, 1, "off")
        train_set, _ = load("synthetic", **spec.mapping("data_options"))
        torch.manual_seed(0)
        model = build_model("resnet", depth=depth, width=16, norm="batch",
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


LOOPS = ("plain (DataLoader)", "normlab, eager", "normlab, CUDA graph")


def measure(args: argparse.Namespace, depth: int, gpu: bool) -> dict[str, list[float]]:
    """Images/s of each loop per repeat (the CUDA-graph loop only on a GPU)."""
    plain_loop = PlainLoop(args, depth)
    plain_loop.seconds(args.warmup)
    graphs = ("off", "on") if gpu else ("off",)
    for graph in graphs:  # first-use costs (imports, kernels, capture)
        normlab_seconds(args, depth, args.warmup, graph)
    rates: dict[str, list[float]] = {loop: [] for loop in LOOPS[:1 + len(graphs)]}
    for _ in range(args.repeats):  # interleaved: a change of machine load hits every loop
        if gpu:  # totals: the host must not wait for the device each step
            rates[LOOPS[0]].append(args.steps * args.batch / plain_loop.seconds(args.steps))
            for loop, graph in zip(LOOPS[1:], graphs, strict=True):
                rates[loop].append(normlab_images_per_s(args, depth, graph))
        else:  # medians of per-step times: robust to other jobs on a shared CPU
            rates[LOOPS[0]].append(
                args.batch / statistics.median(plain_loop.step_seconds(args.steps)))
            rates[LOOPS[1]].append(
                args.batch / statistics.median(normlab_step_seconds(args, depth)))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--depth", type=int, nargs="+", default=None,
                        help="ResNet depths (default 20 110 on a GPU, 20 on a CPU)")
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
    add_json_option(parser)
    args = parser.parse_args()
    device = benchmark_device(args.device)
    gpu = device.type == "cuda"
    if args.quick:  # on a GPU, enough warm-up steps that both timed runs capture their graph
        args.steps = args.steps or (30 if gpu else 5)
        args.warmup = args.warmup or (2 * WARMUP_STEPS + 2 if gpu else 2)
        args.repeats = 1
    args.steps = args.steps or (200 if gpu else 30)
    args.warmup = args.warmup or (30 if gpu else 5)
    args.workers = (4 if gpu else 0) if args.workers is None else args.workers
    depths = args.depth or ([20, 110] if gpu else [20])

    name = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"BatchNorm ResNets, batch {args.batch}, {name}, torch {torch.__version__}; "
          f"{args.steps} timed steps, median of {args.repeats}; channels_last="
          f"{args.channels_last}, compile={args.compile}, bf16={args.bf16}, "
          f"plain workers={args.workers}")
    print(f"{'model':<12}{'loop':<24}{'images/s':>12}{'ratio':>8}")
    rows = []
    for depth in depths:
        rates = measure(args, depth, gpu)
        plains = rates[LOOPS[0]]
        for loop in LOOPS:
            if loop not in rates:
                print(f"{f'ResNet-{depth}':<12}{loop:<24}{'n/a (CPU)':>12}")
                continue
            ratio = statistics.median(o / p for o, p in zip(rates[loop], plains, strict=True))
            rate = statistics.median(rates[loop])
            print(f"{f'ResNet-{depth}':<12}{loop:<24}{rate:>12.0f}{ratio:>8.2f}", flush=True)
            rows.append({"depth": depth, "loop": loop, "images_per_s": rate, "ratio": ratio})
    print("ratio: median over repeats of loop / plain, each repeat timing every loop")
    write_json(args, "train_throughput", device, rows)
    if gpu and args.compile:
        print("note: with --compile the CUDA-graph setting falls back to the eager loop")


if __name__ == "__main__":
    main()
