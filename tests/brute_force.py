"""Slow, obviously correct twins of the per-example contributions, for the tests.

`contributions_by_copies`: every layer (a module with parameters of its own and no submodule
but its parametrizations) is replaced by B copies of itself, all run on the whole batch; copy
i's output is kept on example i's rows only. Each copy's parameters are leaves of their own,
so d loss / d (copy i's parameters) is exactly the share of the batch gradient that flows
through example i's rows of that layer's output: c_i, by plain autograd, with no hook, no
formula and no fold. A parameter used by several layers adds up their copies.

`dense_hessian_eigvals`: the eigenvalues of the dense Hessian of the batch loss, by torch's
double backward or, where that is wrong (through weight_norm), by central differences of
first derivatives.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call


class _Copies(nn.Module):
    """`layer` run once per example with that example's copy of its parameters; the output
    rows of example i (dim 0, `rows_per_example` consecutive rows each) come from copy i."""

    def __init__(self, layer: nn.Module, batch: int, rows_per_example: int) -> None:
        super().__init__()
        self.layer = layer
        self.batch = batch
        self.rows_per_example = rows_per_example
        self.copies = {n: p.detach().unsqueeze(0).repeat(batch, *([1] * p.dim()))
                       .requires_grad_(True) for n, p in layer.named_parameters()}

    def forward(self, *args, **kwargs):
        buffers = {n: b.detach().clone() for n, b in self.layer.named_buffers()}
        out = None
        for i in range(self.batch):
            state = {**{n: b.clone() for n, b in buffers.items()},
                     **{n: c[i] for n, c in self.copies.items()}}
            copy_i = functional_call(self.layer, state, args, kwargs)
            rows = torch.zeros(copy_i.shape[0], dtype=torch.bool, device=copy_i.device)
            rows[i * self.rows_per_example:(i + 1) * self.rows_per_example] = True
            mask = rows.reshape(-1, *([1] * (copy_i.dim() - 1))).to(copy_i.dtype)
            out = copy_i * mask if out is None else out + copy_i * mask
        return out


def _is_layer(module: nn.Module) -> bool:
    return all(n == "parametrizations" for n in module._modules) \
        and any(True for _ in module.parameters())


def contributions_by_copies(model: nn.Module, loss_fn: Callable, x: torch.Tensor,
                            y: torch.Tensor, rows_per_example: dict[str, int] | None = None
                            ) -> dict[str, torch.Tensor]:
    """c_i of every parameter that a layer of `model` owns (see the module docstring), on a
    deep copy in the model's own modes; `rows_per_example` gives a layer's output rows per
    example where it sees a (B*k, ...) fold (default 1)."""
    ref = copy.deepcopy(model)
    batch = x.shape[0]
    by_id = {id(p): n for n, p in ref.named_parameters()}
    owners = {}
    for name, module in list(ref.named_modules(remove_duplicate=False)):
        if not name or not _is_layer(module):
            continue
        wrapper = _Copies(module, batch, (rows_per_example or {}).get(name, 1))
        parent_name, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent_name), child, wrapper)
        owners[name] = (wrapper, {n: by_id[id(p)] for n, p in module.named_parameters()})
    loss = loss_fn(ref(x), y)
    leaves = [(canonical, c) for wrapper, names in owners.values()
              for n, c in wrapper.copies.items() for canonical in [names[n]]]
    grads = torch.autograd.grad(loss, [c for _, c in leaves], allow_unused=True)
    out: dict[str, torch.Tensor] = {}
    for (canonical, c), g in zip(leaves, grads, strict=True):
        g = torch.zeros_like(c) if g is None else g
        out[canonical] = out[canonical] + g if canonical in out else g
    return out


def dense_hessian_eigvals(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor,
                          by_differences: bool = False) -> torch.Tensor:
    """Eigenvalues of the dense Hessian of `loss_fn(model(x), y)` w.r.t. the parameters that
    require grad, in the model's own modes, each forward on fresh copies of its buffers."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    shapes = {n: p.shape for n, p in params.items()}
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def loss(theta):
        state, start = {n: b.clone() for n, b in buffers.items()}, 0
        for n, shape in shapes.items():
            state[n] = theta[start:start + shape.numel()].reshape(shape)
            start += shape.numel()
        return loss_fn(functional_call(model, state, (x,)), y)

    if by_differences:
        H = _hessian_by_differences(loss, flat)
    else:
        try:  # one vectorized double backward; some ops (GroupNorm, hooks) have no batching rule
            H = torch.autograd.functional.hessian(loss, flat, vectorize=True)
        except RuntimeError:
            H = torch.autograd.functional.hessian(loss, flat)
    return torch.linalg.eigvalsh(H.double())


def _hessian_by_differences(loss, flat: torch.Tensor, step: float = 1e-5) -> torch.Tensor:
    """Central differences of the gradient, one column per parameter (float64): needs only
    first derivatives, which torch gets right where its double backward does not."""
    def gradient(theta):
        theta = theta.detach().requires_grad_(True)
        return torch.autograd.grad(loss(theta), theta)[0]

    columns = []
    for j in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[j] = step
        columns.append((gradient(flat + e) - gradient(flat - e)) / (2 * step))
    H = torch.stack(columns, dim=1)
    return (H + H.T) / 2
