"""Probes on a torchvision-style ResNet-18 with BatchNorm, written out here (torchvision is not a
dependency of normlab). Run: `python examples/resnet18_probes.py` (CIFAR-sized random images;
`--width 4 --image-size 8 --batch 4` is the tiny size the tests run).

What it shows: the one calling convention `probe(model, loss_fn, (x, y), ...)`, the mode each
number was taken in, the per-example path chosen (BN in train mode couples the examples, so the
exact gradients take the batched VJP), and tidy tables from `.to_frame()`.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from normlab import probes


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the (projected) identity, then ReLU (He et al. 2016)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:  # 1x1 projection where the shape changes
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """torchvision's resnet18 layout: 7x7 stem, max pool, 4 stages of 2 blocks, pool, fc."""

    def __init__(self, width: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [width, 2 * width, 4 * width, 8 * width]
        layers, cin = [], width
        for i, cout in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))  # (N, width, H/4, W/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean(dim=(2, 3)))  # global average pool, (N, classes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = ResNet18(args.width).to(args.device).train()
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    loss_fn = nn.CrossEntropyLoss()
    data = (x, y)

    grads = probes.per_example_loss_grads(model, loss_fn, data, params=["fc.weight"])
    print(f"per-example gradients of fc.weight: {tuple(grads['fc.weight'].shape)}, "
          f"method={grads.method} ({grads.reason}), bn_mode={grads.bn_mode}")
    spectrum = probes.gradient_spectrum(grads)
    share = [r["value"] for r in spectrum if r["quantity"] == "energy_share_top"]
    print(f"top direction's share of the per-example gradient energy (fc): {share[0]:.3f}")

    eigs = probes.hessian_eigs(model, loss_fn, data, k=1, tol=1e-2, max_iter=20)
    print(f"lambda_max = {eigs.values[0]:.4g} after {eigs.hvps} HVPs (mode={eigs.mode}, "
          f"converged={eigs.converged})")

    stats = probes.activation_stats(model, data, layers=["layer1.0.conv1", "fc"]).to_frame()
    print(stats.groupby(["layer", "quantity"])["value"].mean().unstack().round(4))

    curve = probes.step_loss(model, loss_fn, data, steps=[1e-3, 1e-2, 1e-1]).to_frame()
    print(curve[["step_size", "value", "diverged"]].to_string(index=False))


if __name__ == "__main__":
    main()
