"""Fixed batches and named parameter vectors: the plumbing shared by the Probes II modules.

A loss over several batches is the plain average of the per-batch (mean-reduced) losses; under
batch-coupled normalization in train mode each batch is normalized with its own statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Vector = dict[str, torch.Tensor]  # parameter name -> tensor shaped like the parameter


def flatten(vector: Vector, names: Sequence[str]) -> torch.Tensor:
    return torch.cat([vector[n].reshape(-1) for n in names])


def unflatten(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> Vector:
    out, start = {}, 0
    for name, p in like.items():
        out[name] = flat[start:start + p.numel()].reshape(p.shape).to(p.dtype)
        start += p.numel()
    return out


def dot(a: Vector, b: Vector) -> float:
    return float(sum((a[n].double() * b[n].double()).sum() for n in a if n in b))


def norm(a: Vector) -> float:
    return dot(a, a) ** 0.5


def fixed_batches(dataset: object, batch_size: int, count: int, seed: int = 0) -> list[Batch]:
    """`count` disjoint batches of `batch_size` examples drawn without replacement (seeded) from
    a data set holding tensors `x` and `y` (e.g. normlab.data.ArrayDataset); no augmentation.
    Fewer batches come back when the data set is too small for `count`."""
    x, y = dataset.x, dataset.y  # type: ignore[attr-defined]
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=generator).to(y.device)
    count = min(count, len(y) // batch_size)
    return [(x[order[i * batch_size:(i + 1) * batch_size]],
             y[order[i * batch_size:(i + 1) * batch_size]]) for i in range(count)]
