"""One-step generator G_theta(z) = D_init(sigma_init * z, sigma_init) (SiD's initialisation, Algorithm 1 line 1:
theta <- copyWeights(phi)). Any Denoiser network can serve as D_init: a copy of the teacher or of a pretrained MLP.
"""

from __future__ import annotations

import torch
from torch import nn


class OneStepGenerator(nn.Module):
    def __init__(self, denoiser: nn.Module, sigma_init: float = 2.5):  # sigma_init: noise level of the input
        super().__init__()
        if sigma_init <= 0:
            raise ValueError(f"sigma_init must be > 0, got {sigma_init}")
        self.denoiser = denoiser
        self.sigma_init = float(sigma_init)

    def forward(self, z: torch.Tensor, cond=None) -> torch.Tensor:
        """z ~ N(0, I) of the data shape -> one-step sample x = G(z)."""
        return self.denoiser(self.sigma_init * z, self.sigma_init, cond)
