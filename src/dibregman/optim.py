"""The loop toolkit shared by the distillation and the teacher loop: the generator/teacher EMA and the cosine
learning-rate schedule, each written once. Both are pure functions of the images seen, so resume is exact."""

from __future__ import annotations

import math

import torch
from torch import nn


def ema_beta(
    batch_size: int,  # images per optimisation step
    halflife_images: float,  # EMA half-life in images (<= 0: no averaging, the EMA copies the network)
) -> float:
    """Per-step decay beta = 0.5^(batch / half-life) (EDM's half-life in images)."""
    return 0.5 ** (batch_size / halflife_images) if halflife_images > 0 else 0.0


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, beta: float) -> None:
    """ema <- beta ema + (1 - beta) net, parameter by parameter (the two must have the same parameters)."""
    for pe, pn in zip(ema.parameters(), net.parameters(), strict=True):
        pe.lerp_(pn.detach(), 1 - beta)


def cosine_factor(
    progress: float,  # fraction of training done, clipped to [0, 1]
    final: float,  # the factor reached at progress 1
) -> float:
    """Learning-rate multiplier falling from 1 to `final` along half a cosine."""
    p = min(max(progress, 0.0), 1.0)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * p))
