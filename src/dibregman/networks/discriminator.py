"""Discriminator eta for the density ratio (paper Eq. 5): D_eta = sigmoid(l_t(x)), trained with label 1 on real (or
teacher) samples and 0 on generator samples, so at the optimum l = log(p_t / q_t) and r_t = q_t / p_t = e^{-l}.

The logit is a head on a backbone's features, read explicitly through `backbone.features(x, sigma, cond)`:
- placement `fake_score` (SiDA, default): the backbone is the auxiliary fake-score network psi itself, so the BCE
  also trains psi's encoder;
- placement `teacher`: the frozen teacher's features, only the head trains;
- placement `separate`: a small network of its own.
Heads: `linear` (pooled features -> Linear, zero-initialised so r = 1 at the start) or `mean` (SiDA: the mean of
the feature map, no parameters).
"""

from __future__ import annotations

import torch
from torch import nn


class DiscriminatorHead(nn.Module):
    def __init__(self, backbone: nn.Module, head: str = "linear", *, own_backbone: bool = False):
        super().__init__()
        if not hasattr(backbone, "features"):
            raise ValueError(f"{type(backbone).__name__} has no features(x, sigma, cond) method to put a head on")
        if head not in ("linear", "mean"):
            raise ValueError(f"unknown discriminator head {head!r}; valid: ['linear', 'mean']")
        # A backbone trained or frozen elsewhere (fake score, teacher) is held by reference, outside this module's
        # parameters and state dict; a `separate` backbone is owned (registered as a submodule).
        self.owned = backbone if own_backbone else None
        self._ref = None if own_backbone else [backbone]
        self.head = head
        self.linear = nn.Linear(backbone.feature_channels, 1) if head == "linear" else None
        if self.linear is not None:
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)

    @property
    def backbone(self) -> nn.Module:
        return self.owned if self.owned is not None else self._ref[0]

    def forward(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        f = self.backbone.features(x, sigma, cond).float()  # [N, C, H, W] or [N, C]
        pooled = f.flatten(2).mean(2) if f.ndim > 2 else f  # [N, C]
        if self.linear is None:
            return pooled.mean(1)
        return self.linear(pooled).squeeze(1)
