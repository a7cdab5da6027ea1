"""The loop toolkit shared by the distillation and the teacher loop: the generator/teacher EMA, the cosine
learning-rate schedule (pure functions of the images seen, so resume is exact) and the guarded optimiser step
(NaN/Inf guard, clip), each written once."""

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


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2), the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def all_finite(tensors) -> bool:
    """True if every tensor is finite on every rank (a MAX all-reduce of the local flag under torchrun)."""
    flags = [torch.isfinite(_local(t)).all() for t in tensors if t is not None]
    bad = (~torch.stack(flags).all()).float() if flags else torch.zeros(())
    if dist.world_size() > 1:
        dist.all_reduce_max_(bad)
    return not bool(bad.item())


def state_finite(opt: torch.optim.Optimizer) -> bool:
    """True if every floating-point tensor of the optimiser's state (Adam's moments) is finite: a corrupt state
    would turn finite gradients into non-finite weights."""
    return all_finite(
        v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.is_floating_point()
    )


def guarded_step(opt: torch.optim.Optimizer, params: list, clip: float | None) -> tuple[bool, float | None]:
    """Skip on a NaN/Inf gradient or optimiser state (on any rank), clip the global norm (unless clip is None),
    step. Gradients arrive reduced over ranks (DDP/FSDP2, `parallel.py`).

    Returns (stepped, gradient norm before clipping or None without a clip)."""
    if not (all_finite(p.grad for p in params) and state_finite(opt)):
        opt.zero_grad(set_to_none=True)
        return False, None
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip)) if clip is not None else None
    opt.step()
    opt.zero_grad(set_to_none=True)
    return True, grad_norm
