"""Probes on a small pre-norm Transformer block with LayerNorm and Dropout, on token sequences.
Run: `python examples/transformer_block_probes.py` (`--dim 8 --tokens 4 --batch 4` is the tiny
size the tests run).

What it shows: Dropout stays off under `mode="train"` (only normalization layers are put on batch
statistics, and LayerNorm has none, so "train" and "eval" measure the same function here);
`mode="keep"` measures the model as it is, Dropout on, and the per-example probe then says why it
did not use vmap; LayerNorm is not batch-coupled, so the exact per-example gradients are cheap.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from normlab import probes


class SelfAttention(nn.Module):
    """Multi-head self-attention written out. Why not nn.MultiheadAttention: torch's fused
    attention kernels have no double backward, which the Hessian probes need."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).unbind(dim=2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, heads, T, D/heads)
        weights = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)
        mixed = self.drop(weights) @ v  # (B, heads, T, D/heads)
        return self.out(mixed.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """x + Drop(Attn(LN(x))), then x + Drop(MLP(LN(x))) on (B, T, D) tokens (pre-norm)."""

    def __init__(self, dim: int, heads: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class TinyClassifier(nn.Module):
    """Token embedding, one block, mean over tokens, a linear head."""

    def __init__(self, vocab: int, dim: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.block = Block(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) integers
        return self.head(self.block(self.embed(tokens)).mean(dim=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = TinyClassifier(vocab=50, dim=args.dim, classes=3).to(args.device).train()
    tokens = torch.randint(0, 50, (args.batch, args.tokens), device=args.device)
    labels = torch.randint(0, 3, (args.batch,), device=args.device)
    loss_fn = nn.CrossEntropyLoss()
    data = (tokens, labels)

    for mode in ("train", "keep"):
        grads = probes.per_example_loss_grads(model, loss_fn, data, mode=mode,
                                              params=["head.weight"])
        print(f"mode={mode}: method={grads.method}"
              + (f" (reason: {grads.reason})" if grads.reason else ""))

    train = probes.hessian_eigs(model, loss_fn, data, mode="train", tol=1e-3, max_iter=30)
    evaluated = probes.hessian_eigs(model, loss_fn, data, mode="eval", tol=1e-3, max_iter=30)
    print(f"lambda_max: mode=train {train.values[0]:.5g}, mode=eval {evaluated.values[0]:.5g} "
          "(the same function: Dropout is off in both, LayerNorm has no batch statistics)")

    direction = probes.random_direction(model, seed=1)
    table = probes.landscape(model, loss_fn, data, directions=[direction], span=0.5,
                             points=5).to_frame()
    print(table[["alpha", "value", "mode"]].to_string(index=False))

    rows = probes.radial_tangential(model, loss_fn, data, granularity="layer", mode="train")
    share = rows.to_frame().query("quantity == 'radial_share'")[["layer", "value"]]
    print(share.to_string(index=False))


if __name__ == "__main__":
    main()
