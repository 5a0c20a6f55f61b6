"""SGD noise: how far a mini-batch gradient is from the full gradient (eq. 2 of the paper, E2).

With the loss ell = (1/N) sum_i ell_i over N examples, per-example gradients g_i, the full
gradient g = (1/N) sum_i g_i and a batch B of b distinct examples drawn uniformly without
replacement, the mini-batch gradient is g_B = (1/b) sum_{i in B} g_i and

    E ||g_B - g||^2 = (N - b) / (b (N - 1)) * C_hat,   C_hat = (1/N) sum_i ||g_i - g||^2.

C_hat is normalized by 1/N (the population variance of the g_i); with the unbiased 1/(N-1)
normalization S^2 the same quantity reads (N - b) / (b N) * S^2. The noise vanishes at b = N
and is at most C_hat / b. docs/theory.md derives it with inclusion indicators.

Trap: the identity treats the g_i as fixed vectors. With BatchNorm in train mode the per-example
loss gradient depends on which other examples share the batch, so g_B is no longer the mean of
fixed g_i; use per-example gradients of a model without batch coupling (or BN in eval mode).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from normlab.utils.config import ConfigError, check_interval


def gradient_matrix(per_example_grads: torch.Tensor | Mapping[str, torch.Tensor]
                    ) -> torch.Tensor:
    """The (N, P) float64 matrix of per-example gradients: a tensor (N, ...) flattened per row,
    or a mapping of parameter name -> (N, *shape) (e.g. `per_example_loss_grads`) concatenated.
    """
    if isinstance(per_example_grads, Mapping):
        parts = list(per_example_grads.values())
        if not parts:
            raise ConfigError("The 'per_example_grads' setting must hold at least one "
                              "parameter's gradients; got an empty mapping.")
        rows = parts[0].shape[0]
        if any(p.shape[0] != rows for p in parts):
            raise ConfigError("The 'per_example_grads' setting must have the same number of "
                              f"examples for every parameter; got {[p.shape[0] for p in parts]}.")
        matrix = torch.cat([p.reshape(rows, -1).double() for p in parts], dim=1)
    else:
        matrix = per_example_grads.reshape(per_example_grads.shape[0], -1).double()
    if matrix.shape[0] < 2:
        raise ConfigError("The 'per_example_grads' setting needs at least 2 examples; got "
                          f"{matrix.shape[0]}.")
    return matrix


def gradient_variance(per_example_grads: torch.Tensor | Mapping[str, torch.Tensor]) -> float:
    """C_hat = (1/N) sum_i ||g_i - g||^2 (population normalization)."""
    g = gradient_matrix(per_example_grads)
    return float((g - g.mean(dim=0)).square().sum(dim=1).mean())


def _check_batch(b: int, n: int) -> None:
    check_interval("batch_size", b, 1, n, kind=int, low_open=False, high_open=False)


def sgd_noise_exact(per_example_grads: torch.Tensor | Mapping[str, torch.Tensor],
                    b: int) -> float:
    """E ||g_B - g||^2 over batches of b examples drawn without replacement, exactly:
    (N - b) / (b (N - 1)) * C_hat with C_hat normalized by 1/N; cost O(N P)."""
    g = gradient_matrix(per_example_grads)
    n = g.shape[0]
    _check_batch(b, n)
    return (n - b) / (b * (n - 1)) * gradient_variance(g)


def sgd_noise(per_example_grads: torch.Tensor | Mapping[str, torch.Tensor],
              batch_sizes: Sequence[int], samples: int = 200, seed: int = 0) -> list[dict]:
    """Monte-Carlo estimate of E ||g_B - g||^2 per batch size b from `samples` batches drawn
    uniformly without replacement, beside the exact formula; cost O(samples x b x P) per b.

    The per-example gradients are taken as given (N rows; see the module docstring for the
    BatchNorm trap). Records per b: `noise_estimate` (the sample mean, with `stderr` its
    standard error), `noise_exact`, `noise_bound` (C_hat / b) and the ratio estimate / exact.
    """
    check_interval("samples", samples, 2, kind=int, low_open=False)
    check_interval("seed", seed, 0, kind=int, low_open=False)
    g = gradient_matrix(per_example_grads)
    n = g.shape[0]
    for b in batch_sizes:
        _check_batch(b, n)
    full = g.mean(dim=0)
    c_hat = gradient_variance(g)
    gen = torch.Generator().manual_seed(seed)
    records = []
    for b in batch_sizes:
        draws = torch.stack([(g[torch.randperm(n, generator=gen)[:b]].mean(dim=0) - full)
                             .square().sum() for _ in range(samples)])
        estimate, exact = float(draws.mean()), (n - b) / (b * (n - 1)) * c_hat
        common = {"batch_size": b, "examples": n}
        records += [
            {**common, "quantity": "noise_estimate", "value": estimate,
             "stderr": float(draws.std()) / math.sqrt(samples)},
            {**common, "quantity": "noise_exact", "value": exact},
            {**common, "quantity": "noise_bound", "value": c_hat / b},
            {**common, "quantity": "estimate_over_exact",
             "value": estimate / exact if exact > 0 else math.nan},
        ]
    return records
