"""Probes inside your own training loop: log the sharpness, the radial share of the gradient and
the loss along the gradient every N steps, without disturbing the run.
Run: `python examples/training_loop_probes.py` (`--steps 6 --every 3` is the tiny size the tests
run); `--out probes.csv` writes the log.

The probes are called between the forward pass and `loss.backward()`: they never write the
model's parameters, running statistics or RNG state, so the pending graph still back-propagates
and the run is the same as without them (checked at the end against a run without probes).
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch
from torch import nn

from normlab import probes


def make_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def train(steps: int, every: int | None, device: str) -> tuple[nn.Module, list[dict]]:
    """SGD with momentum on fixed random data; probes logged every `every` steps (None: off)."""
    torch.manual_seed(0)
    model = make_model().to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(64, 1, 8, 8, generator=gen).to(device)
    labels = torch.randint(0, 4, (64,), generator=gen).to(device)
    log: list[dict] = []
    for step in range(steps):
        idx = torch.randint(0, 64, (16,), generator=gen).to(device)
        x, y = images[idx], labels[idx]
        loss = loss_fn(model(x), y)
        if every and step % every == 0:  # probes between forward and backward
            batch = (x, y)
            eigs = probes.hessian_eigs(model, loss_fn, batch, tol=1e-2, max_iter=20)
            radial = probes.radial_tangential(model, loss_fn, batch, granularity="layer")
            curve = probes.step_loss(model, loss_fn, batch, steps=[0.05, 0.5])
            for rows in (eigs.records(), radial.records(), curve.records()):
                log += [{**r, "step": step} for r in rows]
        optimizer.zero_grad()
        loss.backward()  # the graph built before the probes
        optimizer.step()
    return model, log


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    probed, log = train(args.steps, args.every, args.device)
    table = pd.DataFrame(log)
    summary = table[table["quantity"].isin(["hessian_eigenvalue", "relative_loss"])]
    print(summary.groupby(["step", "quantity"])["value"].max().unstack().round(4))
    if args.out:
        table.to_csv(args.out, index=False)
    plain, _ = train(args.steps, None, args.device)
    same = all(torch.equal(a, b) for a, b in zip(probed.state_dict().values(),
                                                 plain.state_dict().values(), strict=True))
    print(f"run with probes identical to the run without: {same}")
    if not same:
        raise SystemExit("the probes changed the training run")


if __name__ == "__main__":
    main()
