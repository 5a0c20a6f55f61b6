"""How a CPU pack is computed so that a member's numbers do not depend on its pack.

A pack's step is one vmapped computation over a stack of models. On a CPU, torch's kernels
choose their code path and work split by the stack's shape, so a member's last bits could
depend on how many models share its stack and on its place in it. Measured on the 2-core CPU
(torch 2.13, oneDNN, AVX-512), for the weight gradients of grouped convolutions and the
batch reductions of bias and norm gradients:
- the thread count splits the reductions differently (at two threads, stacks of odd and even
  size round 8-channel convolutions differently);
- a stack of one is not a grouped convolution at all, and two CIFAR stems (3 channels each) are
  too narrow for the blocked kernel that three or more use;
- in a stack of odd size the last member's bias and BatchNorm gradients (an MLP's) round
  otherwise.
At one thread, stacks of an even size of at least four give every member the same bits in every
case measured, whatever the other members and the member's place (tests/test_pack_invariance.py;
the smoke lr-sweep with `--pack 1`, `--pack 8` and `--pack 16` gives every run byte-identical
metric rows, statuses and final metrics, benchmarks/frontier.py).

So on a CPU a pack computes on one thread (`pack_threads`; a study's parallelism on a CPU is
its worker processes, `normlab.execute.throughput.default_workers`), its stack is filled up to
`stack_rows` with ghost rows (copies of a member, masked and never read:
`normlab.train.packed.PackedSGD`), and the "train" task trains a lone packable run as a pack of
one (`normlab.train.task`, the one code path of every executor). A run's numbers are then the
same with any `--pack`, any worker count, on SLURM or Ray (tests/test_ray.py), on one CPU model
and torch version. This is measured, not proved:
another CPU, torch version or architecture may round otherwise, and the divergence frontier's
replicates (docs/training.md) are what keep such bits out of the findings. Cost: a lone run
computes four models' steps (the smoke lr-sweep takes 2.5x as long with `--pack 1` as in its
default packs of 16, benchmarks/RESULTS.md). On
a GPU nothing changes: cuDNN's choices were not measured, and lone runs take the plain loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

CPU_MIN_STACK = 4  # models per stack on a CPU, ghost rows included
CPU_THREADS = 1  # threads a CPU pack computes on


def stack_rows(device: torch.device, members: int) -> int:
    """The models a pack of `members` stacks on `device`, ghost rows included: on a CPU an
    even number, at least `CPU_MIN_STACK`; elsewhere the members alone."""
    if device.type != "cpu":
        return members
    return max(CPU_MIN_STACK, members + members % 2)


def alone_as_pack(device: torch.device) -> bool:
    """Whether a lone packable run on `device` is trained as a pack of one (see module)."""
    return device.type == "cpu"


@contextlib.contextmanager
def pack_threads(device: torch.device) -> Iterator[None]:
    """On a CPU, torch's intra-op threads set to `CPU_THREADS` inside the block (restored
    after); elsewhere nothing changes."""
    if device.type != "cpu":
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
