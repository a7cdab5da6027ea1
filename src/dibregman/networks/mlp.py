"""EDM-preconditioned MLP denoiser for low-dimensional data (the analytic GMM benchmarks).

D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) with EDM's coefficients (Karras et al. 2022, Table 1), so the
generator and fake score of a vector-valued problem are built exactly like those of an image teacher.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..noise import edm_preconditioning


@dataclass(frozen=True)
class MLPConfig:
    dim: int = 2  # data dimension
    hidden: int = 128  # hidden width
    depth: int = 3  # number of hidden layers
    emb: int = 32  # width of the noise-level embedding
    sigma_data: float = 1.0  # data standard deviation used by the preconditioning
    sigma_min: float = 0.002  # smallest supported noise level
    sigma_max: float = 80.0  # largest supported noise level

    def to_dict(self) -> dict:
        return asdict(self)


class MLPDenoiser(nn.Module):
    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.cfg = cfg
        self.sigma_data, self.sigma_min, self.sigma_max = cfg.sigma_data, cfg.sigma_min, cfg.sigma_max
        self.shape = (cfg.dim,)
        self.register_buffer("freqs", torch.randn(cfg.emb // 2) * 4.0)  # random Fourier features of c_noise
        layers, width = [], cfg.dim + cfg.emb
        for _ in range(cfg.depth):
            layers.append(nn.Linear(width, cfg.hidden))
            width = cfg.hidden
        self.layers = nn.ModuleList(layers)
        self.out = nn.Linear(cfg.hidden, cfg.dim)
        self.feature_channels = cfg.hidden

    def _hidden(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        _, _, c_in, c_noise = edm_preconditioning(sigma, self.sigma_data)
        ang = 2 * math.pi * c_noise * self.freqs[None]  # [N, emb/2]
        h = torch.cat([c_in * x, ang.sin(), ang.cos()], dim=1)
        for layer in self.layers:
            h = F.silu(layer(h))
        return h

    def _sigma(self, sigma, x: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1)
        return s.expand(x.shape[0], 1)

    def forward(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        sigma = self._sigma(sigma, x)
        c_skip, c_out, _, _ = edm_preconditioning(sigma, self.sigma_data)
        return c_skip * x + c_out * self.out(self._hidden(x, sigma))

    def features(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        """Last hidden layer, [N, hidden] (what a discriminator head reads)."""
        return self._hidden(x, self._sigma(sigma, x))
