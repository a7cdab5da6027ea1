"""Teacher training as a method over the engine: EDM denoising (Karras et al. 2022, Sec. 5: preconditioning,
log-normal sigma, lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2) or rectified flow (velocity
loss, logit-normal t, `teachers.flow.flow_loss`) of one U-Net, with EDM's EMA (half-life in images, ramped up).

Draws: step k's images come from one data generator (seeded by the run seed, its state kept in the checkpoint),
the noise from torch's global generator (also checkpointed), so resume is exact. Under torchrun each rank trains
on its slice of the global batch of indices; the noise is then each rank's own, so W processes train on the same
images as one process but not on the same noise.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from .. import optim
from ..draws import local_slice
from ..engine import EngineSpec, Phase
from ..noise import edm_training_sigma

OBJECTIVES = {"edm": "edm-unet", "flow": "flow-unet"}  # training objective -> the export's kind
LOG_EVERY_STEPS = 50  # log records every this many steps


def edm_loss(net, x0: torch.Tensor, cond, cfg, generator=None) -> torch.Tensor:
    """EDM denoising loss: lambda(sigma) * ||D(x0 + sigma n, sigma) - x0||^2, mean over pixels and batch."""
    sigma, weight = edm_training_sigma(x0.shape[0], cfg.p_mean, cfg.p_std, net.sigma_data, device=x0.device)
    s = sigma.view(-1, 1, 1, 1)
    denoised = net(x0 + s * torch.randn_like(x0), sigma, cond)
    return (weight.view(-1, 1, 1, 1) * (denoised - x0).square()).mean()


class Denoising:
    """The method of `dibregman train-teacher`: one network, one phase (`net`), its EMA."""

    logs_lr = False
    bad_step_advice = "lower lr or check the data"
    run_kind = "teacher"  # the config section only a teacher run writes
    checkpoint_keys = ("net", "ema", "opt")

    def __init__(self, cfg, net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None, device):
        self.cfg, self.net, self.device = cfg, net, device
        self.images, self.labels = images, labels if cfg.conditional else None
        self.optimizers: dict[str, torch.optim.Optimizer] = {}  # `make_optimizers`
        self.resolved = {"teacher": asdict(cfg), "unet": net.cfg.to_dict()}
        self.data = torch.Generator().manual_seed(cfg.seed)  # the index stream (seed + step at a resume of old runs)
        self.wrapped = net
        self.state = None  # the engine's State

    # ---- what the engine asks of a method --------------------------------------------------------------------
    def engine_spec(self) -> EngineSpec:
        c = self.cfg
        return EngineSpec(
            batch_size=c.batch_size,
            total_images=int(c.total_kimg * 1000),
            grad_clip=c.grad_clip if c.grad_clip > 0 else None,
            max_bad_steps=c.max_bad_steps,
            log_every=LOG_EVERY_STEPS * c.batch_size,
            ckpt_every=int(c.ckpt_every_kimg * 1000),
            keep_ckpts=c.keep_ckpts,
            parallel=c.parallel,
            desc="teacher",
        )

    def blocks(self, module: torch.nn.Module) -> list:
        from ..teachers import FAMILIES

        return FAMILIES["edm"].parallelize(module)  # the native U-Net's blocks

    def trainable(self) -> dict:
        return {"net": self.net}

    def use_wrapped(self, wrapped: dict) -> None:
        self.wrapped = wrapped.get("net", self.net)

    def make_optimizers(self) -> None:
        c = self.cfg
        self.optimizers = {"net": torch.optim.Adam(self.net.parameters(), lr=c.lr, betas=(0.9, 0.999), eps=1e-8)}

    def ema_source(self) -> torch.nn.Module:
        return self.net

    def ema_beta(self, state) -> float:
        """EDM's EMA: half-life min(ema_halflife_kimg, ema_rampup_ratio x images seen after this step)."""
        c = self.cfg
        halflife = min(c.ema_halflife_kimg * 1000, (state.num_images + c.batch_size) * c.ema_rampup_ratio)
        return optim.ema_beta(c.batch_size, halflife)

    def lr_factor(self, state) -> float:
        """Linear warm-up, then a cosine decay to lr_final_ratio at total_kimg (times cfg.lr)."""
        c, kimg = self.cfg, state.num_images / 1000
        warm = min(1.0, kimg / c.lr_warmup_kimg) if c.lr_warmup_kimg > 0 else 1.0
        return warm * optim.cosine_factor(kimg / c.total_kimg, c.lr_final_ratio)

    def phases(self, state) -> list[Phase]:
        return [Phase("net", self.net, self.loss, ema=True)]

    def networks(self) -> dict:
        return {"net": self.net}

    def optimizer_keys(self) -> dict:
        return {"net": "opt"}

    def extra_state(self) -> dict:
        return {"rng_data": self.data.get_state()}

    def load_extra_state(self, state: dict) -> None:
        if "rng_data" in state:
            self.data.set_state(state["rng_data"])
        else:  # checkpoints written before exact resume
            self.data.manual_seed(self.cfg.seed + state["step"])

    def config_dict(self) -> dict:
        return self.resolved

    def config_json(self) -> str:
        return json.dumps(self.resolved, indent=2)

    def check_resume(self, state: dict, path: Path) -> None:
        saved = state["config"]
        if not isinstance(saved, dict) or "unet" not in saved or "teacher" not in saved:
            raise ValueError(f"{path} is not a teacher checkpoint (a distillation run's?); use another run folder")
        if saved["unet"] != self.resolved["unet"]:
            raise ValueError(f"{path} was written for another U-Net config: {saved['unet']}")
        objective = saved["teacher"].get("objective", "edm")  # absent in checkpoints before flow teachers
        if objective != self.cfg.objective:
            raise ValueError(f"{path} was trained with objective={objective!r}; resume it with that objective")

    def preview(self, ema, run_dir: Path, num_images: int) -> None:
        return None

    def after_checkpoint(self, engine, ema) -> None:
        self.export(ema, engine.run_dir, engine.state.num_images)

    def export(self, ema, run_dir: Path, num_images: int) -> Path:
        """The EMA weights as `<run_dir>/teacher-ema.safetensors` (+ `cfg.export`), a kind `load_teacher` reads."""
        meta = {"kind": OBJECTIVES[self.cfg.objective], "unet": ema.cfg.to_dict(), "num_images": num_images}
        meta["teacher_config"] = self.resolved
        out = ckpt.export_safetensors(ema.state_dict(), meta, Path(run_dir) / "teacher-ema")
        if self.cfg.export:
            ckpt.export_safetensors(ema.state_dict(), meta, self.cfg.export)
        return out

    # ---- the loss ----------------------------------------------------------------------------------------
    def loss(self, rnd: int, n: int, norm: int, mon) -> torch.Tensor:
        """The denoising loss of this rank's slice of n drawn images (a mean over them)."""
        from ..teachers.flow import flow_loss

        idx = torch.randint(len(self.images), (n,), generator=self.data)[local_slice(n)]
        x0 = self.images[idx].to(self.device)
        cond = self.labels[idx].to(self.device) if self.labels is not None else None
        c = self.cfg
        if c.objective == "flow":
            loss = flow_loss(self.wrapped, x0, cond, c.flow_t_mean, c.flow_t_std)
        else:
            loss = edm_loss(self.wrapped, x0, cond, c)
        mon.add({"loss": float(loss.detach()), "lr": c.lr * self.lr_factor(self.state)})
        return loss * (len(idx) / norm)  # normalised by the global batch, as the engine expects


__all__ = ["Denoising", "OBJECTIVES", "edm_loss"]
