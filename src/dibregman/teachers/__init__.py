"""Teachers: anything implementing `D(x, sigma, cond=None) -> x0_hat` (see `base.Denoiser`)."""

from .base import Denoiser, as_sigma, score

__all__ = ["Denoiser", "as_sigma", "score"]
