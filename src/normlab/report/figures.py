"""Figure helpers shared by every study: one look, and every figure saved as PNG, PDF and CSV."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

# One colour per normalization kind, the same in every figure.
NORM_COLORS = {
    "none": "#d62728",
    "batch": "#1f77b4",
    "group": "#2ca02c",
    "layer": "#9467bd",
    "instance": "#8c564b",
    "batch_renorm": "#ff7f0e",
}


def new_figure(nrows: int = 1, ncols: int = 1, *, width: float = 4.0, height: float = 3.2,
               **kwargs: Any):
    """A matplotlib figure on the Agg backend, sized per panel. Returns (fig, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kwargs.setdefault("squeeze", False)
    kwargs.setdefault("constrained_layout", True)
    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), **kwargs)


def save_figure(fig: Any, out_dir: str | Path, name: str, data: pd.DataFrame) -> dict[str, Path]:
    """Save `fig` as <name>.png (report), <name>.pdf (papers) and its data as <name>.csv.

    Closes the figure. Returns the paths by extension.
    """
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{name}.{ext}" for ext in ("png", "pdf", "csv")}
    fig.savefig(paths["png"], dpi=150)
    fig.savefig(paths["pdf"])
    plt.close(fig)
    data.to_csv(paths["csv"], index=False)
    return paths
