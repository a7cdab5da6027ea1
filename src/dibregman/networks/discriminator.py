"""Discriminator eta for the density ratio (paper Eq. 5): D_eta = sigmoid(l_t(x)), trained with label 1 on real (or
teacher) samples and 0 on generator samples, so at the optimum l = log(p_t / q_t) and r_t = q_t / p_t = e^{-l}.

The logit is a head on a backbone's features (`backbone.features(x, sigma, cond)`, [N, C, H, W] or [N, C]):
- placement `fake_score` (SiDA, default): the backbone is the auxiliary fake-score network psi itself, so the BCE
  also trains psi's encoder;
- placement `teacher`: the frozen teacher's features, only the head trains;
- placement `separate`: a small network of its own.
Heads: `linear` (pooled features -> Linear, zero-initialised so r = 1 at the start) or `mean` (SiDA: the mean of
the feature map, no parameters).

`Critic` is what the critic phase trains, as ONE module reached through `forward`: psi and the head (and a
separate backbone) are its submodules, so DDP's reducer and FSDP2's unshard hooks see every call. Only the frozen
teacher of placement `teacher` is held by reference (it is never trained, wrapped or checkpointed with the critic).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

HEADS = ("linear", "mean")
PLACEMENTS = ("fake_score", "teacher", "separate")


class DiscriminatorHead(nn.Module):
    """The logit l from a backbone's features; owns the backbone only for placement `separate`."""

    def __init__(self, feature_channels: int, head: str = "linear", *, backbone: nn.Module | None = None):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown discriminator head {head!r}; valid: {list(HEADS)}")
        self.owned = backbone  # placement `separate`: a submodule (its weights are the head's)
        self.head = head
        self.linear = nn.Linear(feature_channels, 1) if head == "linear" else None
        if self.linear is not None:
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        f = features.float()  # [N, C, H, W] or [N, C]
        pooled = f.flatten(2).mean(2) if f.ndim > 2 else f  # [N, C]
        if self.linear is None:
            return pooled.mean(1)
        return self.linear(pooled).squeeze(1)


def _check_backbone(net: nn.Module) -> nn.Module:
    if not hasattr(net, "features"):
        raise ValueError(f"{type(net).__name__} has no features(x, sigma, cond) method to put a head on")
    return net


class Critic(nn.Module):
    """psi and eta: `critic(x, sigma, cond)` is psi's denoised estimate, `critic(x, sigma, cond, logit=True)` the
    discriminator logit l_t(x) [N]."""

    def __init__(self, fake: nn.Module, head: str = "linear", placement: str = "fake_score", *, backbone=None):
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown discriminator placement {placement!r}; valid: {list(PLACEMENTS)}")
        self.fake = fake  # psi
        self.placement = placement
        self._frozen = None  # placement `teacher`: the frozen teacher, by reference
        if placement == "fake_score":
            channels = _check_backbone(fake).feature_channels
            self.disc = DiscriminatorHead(channels, head)
        elif placement == "teacher":
            self._frozen = [_check_backbone(backbone)]
            self.disc = DiscriminatorHead(backbone.feature_channels, head)
        else:
            self.disc = DiscriminatorHead(_check_backbone(backbone).feature_channels, head, backbone=backbone)

    @property
    def backbone(self) -> nn.Module:
        """The network whose features the head reads."""
        if self.placement == "fake_score":
            return self.fake
        return self._frozen[0] if self._frozen is not None else self.disc.owned

    def forward(self, x: torch.Tensor, sigma, cond=None, *, logit: bool = False) -> torch.Tensor:
        if not logit:
            return self.fake(x, sigma, cond)
        return self.disc(self.backbone.features(x, sigma, cond))

    def head_parameters(self) -> list[nn.Parameter]:
        """The linear head's own parameters (optim.head_lr_mult), empty for the `mean` head."""
        return list(self.disc.linear.parameters()) if self.disc.linear is not None else []


def separate_backbone(init: nn.Module) -> nn.Module:
    """A small network of the kind of `init` (the copied teacher network) for placement `separate`."""
    from .mlp import MLPDenoiser
    from .unet import EDMDenoiser, build_unet

    if isinstance(init, MLPDenoiser):
        return MLPDenoiser(replace(init.cfg, hidden=64, depth=2))
    if isinstance(init, EDMDenoiser):
        c = init.cfg
        attn = (c.img_resolution // 2,)
        return build_unet(c, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=attn, dropout=0.0)
    raise ValueError(f"disc_placement=separate has no small backbone for {type(init).__name__}")


def build_critic(
    fake: nn.Module,  # psi
    head: str = "linear",  # model.disc_head
    placement: str = "fake_score",  # model.disc_placement
    *,
    teacher: nn.Module | None = None,  # the frozen teacher network (placement `teacher`)
    init: nn.Module | None = None,  # the copied network a `separate` backbone is made like; None: not offered
) -> Critic:
    """psi and eta: the one placement rule. eta reads psi's features (fake_score), the frozen `teacher`'s, or a
    small network of its own made like `init` (separate; families that give no `init` do not offer it)."""
    if placement == "teacher":
        return Critic(fake, head, placement, backbone=teacher)
    if placement == "separate":
        if init is None:
            raise ValueError(
                "model.disc_placement='separate' is not available for this teacher; choose 'fake_score' or 'teacher'"
            )
        return Critic(fake, head, placement, backbone=separate_backbone(init).eval())
    return Critic(fake, head, placement)
