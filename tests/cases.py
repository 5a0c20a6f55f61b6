"""Small test cases declared as data: a tiny model per norm kind, an input, labels, a loss.

Probe tests are parametrized over `NORM_KINDS` so that every norm is checked; the models are
small enough that a brute-force twin (one backward per example, a dense Hessian) stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

NORM_KINDS = ("none", "batch", "group", "layer", "instance", "batch_renorm")


class TinyConvNet(nn.Module):
    """conv(3->4) - norm - relu - conv(4->4) - norm - relu - global pool - linear(4->3)."""

    def __init__(self, norm: str, channels: int = 4, num_classes: int = 3) -> None:
        super().__init__()
        from normlab.nn import make_norm

        options = {"groups": 2} if norm == "group" else {}
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=norm == "none")
        self.norm1 = make_norm(norm, channels, **options)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=norm == "none")
        self.norm2 = make_norm(norm, channels, **options)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm1(self.conv1(x)))  # (N, C, H, W)
        x = torch.relu(self.norm2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))  # (N, classes)


@dataclass
class Case:
    """A model in train mode with a fixed batch and a mean-reduced cross-entropy loss."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    loss_fn: nn.Module


def tiny_case(norm: str, batch: int = 6, size: int = 5, seed: int = 0,
              dtype: torch.dtype = torch.float64) -> Case:
    """A TinyConvNet with `norm`, a (batch, 3, size, size) input and labels, in float64."""
    torch.manual_seed(seed)
    model = TinyConvNet(norm).to(dtype).train()
    x = torch.randn(batch, 3, size, size, dtype=dtype)
    y = torch.randint(0, 3, (batch,))
    return Case(model, x, y, nn.CrossEntropyLoss())


def model_snapshot(model: nn.Module) -> dict:
    """Everything probe hygiene must preserve: parameters, buffers, grads, flags, modes, RNG."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": {n: None if p.grad is None else p.grad.clone()
                  for n, p in model.named_parameters()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "rng": torch.get_rng_state(),
    }


def assert_unchanged(before: dict, model: nn.Module) -> None:
    """Fail unless `model` (and the CPU RNG) is bit-for-bit as in the `before` snapshot."""
    after = model_snapshot(model)
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), f"{key} changed"
    for name, grad in before["grads"].items():
        other = after["grads"][name]
        assert (grad is None) == (other is None), f"{name}.grad changed"
        assert grad is None or torch.equal(grad, other), f"{name}.grad changed"
    assert before["flags"] == after["flags"], "requires_grad flags changed"
    assert before["modes"] == after["modes"], "train/eval modes changed"
    assert torch.equal(before["rng"], after["rng"]), "the RNG state changed"
