"""Pictures: image grids and 2-D scatter plots written as PNG (matplotlib, Agg backend; no torchvision)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def image_grid(x: torch.Tensor, ncol: int | None = None) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 grid [H', W', C] (C = 1 or 3)."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, c, h, w = x.shape
    ncol = ncol or max(1, int(math.ceil(math.sqrt(n))))
    nrow = int(math.ceil(n / ncol))
    grid = torch.zeros(c, nrow * (h + 2) + 2, ncol * (w + 2) + 2, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        grid[:, 2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + k * (w + 2) : 2 + k * (w + 2) + w] = x[i]
    return grid.permute(1, 2, 0).numpy()


def save_image_grid(x: torch.Tensor, path: str | Path, ncol: int | None = None, scale: int = 2) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    g = image_grid(x, ncol)
    if scale > 1:
        g = g.repeat(scale, axis=0).repeat(scale, axis=1)
    plt.imsave(
        path,
        g[..., 0] if g.shape[-1] == 1 else g,
        cmap="gray" if g.shape[-1] == 1 else None,
        vmin=0,
        vmax=255,
    )
    return path


def save_scatter(x: torch.Tensor, path: str | Path, reference: torch.Tensor | None = None, title: str = "") -> Path:
    """2-D samples (first two coordinates) over optional reference samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if reference is not None:
        r = reference.detach().cpu()
        ax.scatter(r[:, 0], r[:, 1], s=2, c="tab:gray", alpha=0.4, label="teacher")
    s = x.detach().cpu()
    ax.scatter(s[:, 0], s[:, 1], s=2, c="tab:red", alpha=0.6, label="student")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
