"""The loop toolkit shared by the distillation and the teacher loop: the generator/teacher EMA, the cosine
learning-rate schedule (pure functions of the images seen, so resume is exact) and the guarded optimiser step
(gradient all-reduce, NaN/Inf guard, clip), each written once."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import dist


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


def all_finite(tensors) -> bool:
    """True if every tensor is finite on every rank (an all-reduce under torchrun)."""
    flags = [torch.isfinite(t).all() for t in tensors if t is not None]
    ok = torch.stack(flags).all().float() if flags else torch.ones(())
    if dist.world_size() > 1:
        dist.all_reduce_sum_([ok])
        return bool(ok.item() == dist.world_size())
    return bool(ok.item())


def _finite_grads(params) -> bool:
    return all_finite(p.grad for p in params)


def guarded_step(opt: torch.optim.Optimizer, params: list, clip: float | None) -> tuple[bool, float | None]:
    """All-reduce the gradients, skip on NaN/Inf (on any rank), clip the global norm (unless clip is None), step.

    Returns (stepped, gradient norm before clipping or None without a clip)."""
    dist.all_reduce_sum_([p.grad for p in params if p.grad is not None])
    if not _finite_grads(params):
        opt.zero_grad(set_to_none=True)
        return False, None
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip)) if clip is not None else None
    opt.step()
    opt.zero_grad(set_to_none=True)
    return True, grad_norm
