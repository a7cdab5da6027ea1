"""The one interface every teacher implements (EDM sigma parametrisation, Karras et al. 2022):

    D(x, sigma, cond=None) -> x0_hat         x_t = x0 + sigma * eps,  score(x, sigma) = (D(x, sigma) - x) / sigma^2

`x` is [N, *shape] float32, `sigma` a float or a [N] tensor, `cond` an optional condition (class labels [N] int64,
text embeddings, ...). Attributes: `sigma_min`, `sigma_max`, `sigma_data`, and `shape` (the per-sample shape).
Native U-Nets, analytic Gaussian mixtures, diffusers UNet2DModel, SD-style pipelines, SD3/FLUX flow transformers
and DiT all look like this.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Denoiser(Protocol):
    sigma_min: float
    sigma_max: float
    sigma_data: float

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, cond=None) -> torch.Tensor: ...


def as_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a float or [N] sigma to [N] float32 on x's device."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
    return s.expand(x.shape[0]) if s.numel() == 1 else s


def score(denoiser, x: torch.Tensor, sigma: torch.Tensor | float, cond=None) -> torch.Tensor:
    """Score grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma^2 (Tweedie)."""
    s = as_sigma(sigma, x).view(-1, *([1] * (x.ndim - 1)))
    return (denoiser(x, sigma, cond) - x) / s.square()
