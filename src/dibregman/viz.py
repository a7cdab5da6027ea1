"""Pictures: image grids and 2-D scatter plots written as PNG (matplotlib, Agg backend; no torchvision)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from . import divergences


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


def plot_log_weights(
    path,  # output PNG path
    logits_range: tuple[float, float] = (-10.0, 10.0),  # x-axis range of the logit l
    lams: tuple[float, ...] = (-1.0, 0.5, 1.0, 3.0, 5.0, 10.0),  # SBA lambdas to draw
    alphas: tuple[float, ...] = (-1.0, 0.5, 2.0),  # alpha-divergence alphas to draw
):
    """PNG of log-weight versus logit for every registry entry (Agg, no pyplot state); returns path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    l = torch.linspace(logits_range[0], logits_range[1], 401, dtype=torch.float64)
    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, kind in zip(axes, ("bregman", "f"), strict=True):
        for n in divergences.names():
            sweep = {"sba": [{"lam": v} for v in lams], "alpha": [{"alpha": v} for v in alphas]}.get(n, [{}])
            for params in sweep:
                d = divergences.get(n, **params)
                if d.kind == kind:
                    label = n + "".join(f"({k}={v:g})" for k, v in params.items())
                    ax.plot(l.numpy(), d.log_weight(l).numpy(), label=label, lw=1.3)
        ax.set_title("Bregman: log h''(r) r" if kind == "bregman" else "f-distill: log f''(u) u^2")
        ax.set_xlabel("logit l = log(p/q)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("log weight")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
