"""The critic of Algorithm 1 alone, against a fixed student: the ratio calibration's method (`calibration.py`).

psi and eta are built by `build.build_critic` and optimised by `critic_optimizer`, their loss is
`critic_round` -- the very functions Di-Bregman distillation uses -- with the generator replaced by a sampler of
fixed "student" samples q (label 0) and the real side by the teacher's exact samples (label 1). The engine steps
it like any method (accumulation, guarded step, clip, lr schedule); the lr schedule runs over `total_steps`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import optim
from ..config import DistillConfig
from ..draws import draw_batch, generator_for
from ..engine import EngineSpec, Phase
from ..models import Models
from .dibregman import critic_optimizer, critic_round

FakeSampler = Callable[[torch.Generator, int], torch.Tensor]  # (generator, n) -> [n, *shape] student samples


class CriticOnly:
    """One phase, `critic`: DSM on q's samples + Eq. 5's BCE (p's samples 1, q's 0)."""

    logs_lr = False
    bad_step_advice = "lower optim.fake_lr"

    def __init__(self, cfg: DistillConfig, models: Models, fake_sampler: FakeSampler, total_steps: int, device):
        self.cfg, self.m, self.device = cfg, models, device
        self.fake_sampler, self.total_steps = fake_sampler, total_steps
        self.optimizers: dict[str, torch.optim.Optimizer] = {}  # `make_optimizers`
        t, L = models.teacher, cfg.loss
        self.sigma_range = (L.gen_sigma_min or t.sigma_min, L.gen_sigma_max or t.sigma_max)
        self.net = {"critic": models.critic}
        self.state = None  # the engine's State

    def engine_spec(self) -> EngineSpec:
        o = self.cfg.optim
        return EngineSpec(
            batch_size=o.batch_size,
            total_images=self.total_steps * o.batch_size,
            accum_steps=o.accum_steps,
            grad_clip=o.grad_clip,
            desc="critic",
        )

    def trainable(self) -> dict:
        return {"critic": self.m.critic}

    def use_wrapped(self, wrapped: dict) -> None:
        self.net.update(wrapped)

    def blocks(self, module) -> list:
        return []  # an MLP: one unit

    def make_optimizers(self) -> None:
        self.params, opt = critic_optimizer(self.cfg, self.m.critic)
        self.optimizers = {"critic": opt}

    def ema_source(self):
        return None

    def lr_factor(self, state) -> float:
        """The distillation's lr schedule mapped onto the calibration's steps (progress = step / total)."""
        o = self.cfg.optim
        if o.lr_schedule == "constant":
            return 1.0
        return optim.cosine_factor(state.step / self.total_steps, o.lr_final)

    def phases(self, state) -> list[Phase]:
        return [Phase("critic", self.m.critic, self.critic_loss)]

    def critic_loss(self, rnd: int, n: int, norm: int, mon) -> torch.Tensor:
        cfg, step = self.cfg, self.state.step
        b, real = draw_batch(cfg, self.m, step, rnd, n, self.device, self.sigma_range)
        x_fake = self.fake_sampler(generator_for(cfg.run.seed, "calibration_q", step, rnd), n).to(self.device)
        loss, stats, _ = critic_round(self.net["critic"], b, x_fake, real, norm, cfg.loss.disc_weight)
        mon.add({"dsm": stats["loss/fake_dsm"], "bce": stats["loss/disc_bce"], "acc": stats["disc/disc_acc"]})
        return loss


__all__ = ["CriticOnly"]
