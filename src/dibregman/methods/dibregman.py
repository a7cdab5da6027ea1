"""Di-Bregman distillation (Algorithm 1) as a method over the engine: which networks, which optimisers, which
losses and which draws. The maths lives in `distill.py` (losses) and `divergences.py` (Eq. 4's weight); the
draws in `draws.py`; the step, EMA, parallelism and checkpoints in `engine.py`.

Networks: the frozen teacher phi, the generator G_theta, the critic (psi and the discriminator eta as one
`networks.discriminator.Critic`). Phases of a step (`optim.order`): the critic (lines 16-22: psi's DSM and Eq. 5's
BCE) and, every `optim.gen_every` steps after `loss.gen_warmup_kimg`, the generator (lines 5-15: Eq. 4, + Eq. 14
with a reward, + DMD's regression term, + the GAN term). Both phases of a step share their draws (z included).
Batch statistics of the weights (normalisation) are taken over the global micro-batch via an all-gather.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.func import functional_call

from .. import dist, divergences, optim, parallel, trainer_state
from .. import distill as losses
from ..build import build_models, objective
from ..config import DistillConfig, validate
from ..config_help import RESUMABLE_CHANGES, config_diff
from ..distill import NonFiniteError, bcast, per_sample_mean
from ..draws import Batch, draw_batch, generator_for, local_slice, seed_for
from ..engine import EngineSpec, Phase
from ..regression import build_regression
from ..rewards import build_target
from ..teachers import family
from .fewstep import build_fewstep


def critic_optimizer(cfg: DistillConfig, critic: torch.nn.Module) -> tuple[list, torch.optim.AdamW]:
    """(trainable parameters, AdamW) of the critic: psi and a separate backbone at optim.fake_lr, the linear
    head at fake_lr x head_lr_mult."""
    o = cfg.optim
    params = list({id(p): p for p in critic.parameters() if p.requires_grad}.values())
    head = {id(p) for p in critic.head_parameters()}
    groups = [
        {"params": [p for p in params if id(p) not in head], "lr": o.fake_lr},
        {"params": [p for p in params if id(p) in head], "lr": o.fake_lr * o.head_lr_mult},
    ]
    adam = dict(betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    return params, torch.optim.AdamW([g for g in groups if g["params"]], **adam)


def critic_round(
    critic, b: Batch, x_fake: torch.Tensor, real: torch.Tensor, norm: int, disc_weight: float
) -> tuple[torch.Tensor, dict, dict]:
    """Lines 16-22 on one micro-batch: psi's DSM on the generator samples x_fake and Eq. 5's BCE (real: label 1,
    x_fake: label 0) at the draws of `b`; (loss, scalar stats, per-sample stats by sigma)."""
    x_psi = x_fake + bcast(b.fake_sigma, x_fake) * b.fake_noise
    d_psi = critic(x_psi, b.fake_sigma, b.cond).float()
    dsm = losses.fake_score_loss(d_psi, x_fake, b.fake_weight, norm)
    s = bcast(b.disc_sigma, x_fake)
    real_cond = b.cond if b.real_cond is None else b.real_cond
    l_real = critic(real + s * b.disc_noise_real, b.disc_sigma, real_cond, logit=True).float()
    l_fake = critic(x_fake + s * b.disc_noise_fake, b.disc_sigma, b.cond, logit=True).float()
    bce, st = losses.discriminator_loss(l_real, l_fake, norm)
    n = len(x_fake)
    stats = {"loss/fake_dsm": float(dsm.detach()) * norm / n, "loss/disc_bce": float(bce.detach()) * norm / n}
    with torch.no_grad():  # per sigma bin: where the critic lags (logged by the monitor)
        by_sigma = {
            "fake_dsm_by_sigma": (b.fake_weight * per_sample_mean((d_psi - x_fake).square()), b.fake_sigma),
            "disc_acc_by_sigma": (0.5 * ((l_real > 0).float() + (l_fake < 0).float()), b.disc_sigma),
        }
    stats = {**stats, **{f"disc/{k}": float(v) for k, v in st.items()}}
    return dsm + disc_weight * bce, stats, by_sigma


class DiBregman:
    """The method of `dibregman distill`: `Engine(DiBregman(cfg, run_dir), run_dir).train()`."""

    run_kind = "model"  # the config section only a distillation writes
    checkpoint_keys = ("generator", "ema", "fake", "disc", "opt_g", "opt_c")

    logs_lr: bool
    bad_step_advice = "lower the learning rates or check the teacher"

    def __init__(self, cfg: DistillConfig, run_dir: str | Path, *, pretrain=None):
        self.cfg = cfg = validate(cfg)
        self.device = dist.init(cfg.run.device)
        o, w = cfg.optim, dist.world_size()
        if (o.batch_size // o.accum_steps) % w:
            raise ValueError(
                f"the global micro-batch of {o.batch_size // o.accum_steps} images (optim.batch_size / "
                f"optim.accum_steps) does not split over world size {w}: use a multiple of {w}"
            )
        self.preflight = trainer_state.preflight(run_dir, self)  # every refusal before a network is built
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        torch.manual_seed(cfg.run.seed)
        self.m = build_models(cfg, self.device, pretrain=pretrain)
        self.family = family(cfg.model.teacher)
        self.div, self.stab = objective(cfg)  # Eq. 4's weight: divergence and stabiliser
        self.target = build_target(cfg, self.m, self.device)  # Appendix G reward tilt (rewards.py), or None
        self.regression = build_regression(cfg, self.m, Path(run_dir), self.device)  # DMD's term, or None
        self.fewstep = build_fewstep(cfg, self.m)  # a K-step student's training inputs (fewstep.py), None for K = 1
        self.optimizers: dict[str, torch.optim.Optimizer] = {}  # `make_optimizers`, once the engine placed the nets
        t = self.m.teacher
        lo, hi = cfg.loss.gen_sigma_min, cfg.loss.gen_sigma_max  # None: the teacher's
        self.sigma_range = (t.sigma_min if lo is None else lo, t.sigma_max if hi is None else hi)
        self.logs_lr = cfg.optim.lr_schedule != "constant"
        self.net = {"generator": self.m.generator, "critic": self.m.critic}  # what the losses call (maybe wrapped)
        self.state = None  # the engine's State (set by the engine)

    # ---- what the engine asks of a method --------------------------------------------------------------------
    def engine_spec(self) -> EngineSpec:
        c, r = self.cfg, self.cfg.run
        return EngineSpec(
            batch_size=c.optim.batch_size,
            total_images=int(r.total_kimg * 1000),
            accum_steps=c.optim.accum_steps,
            grad_clip=c.optim.grad_clip,
            max_bad_steps=r.max_bad_steps,
            log_every=int(r.log_every_kimg * 1000),
            ckpt_every=int(r.ckpt_every_kimg * 1000),
            sample_every=int((r.sample_every_kimg or 0) * 1000),
            keep_ckpts=r.keep_ckpts,
            parallel=r.parallel,
            # text-to-image families checkpoint with diffusers' own switch (teachers/t2i.py)
            activation_checkpointing=c.model.grad_checkpointing and self.family.build is None,
            cpu_offload=r.cpu_offload,
            compile=r.compile,
            tensorboard=r.tensorboard,
            desc="distill",
        )

    def blocks(self, module: torch.nn.Module) -> list:
        """The teacher family's repeated blocks in `module` (FSDP2 units, activation checkpointing)."""
        return self.family.parallelize(module)

    def trainable(self) -> dict[str, torch.nn.Module]:
        """The networks each phase trains, by phase name (the engine wraps them for DDP/FSDP2)."""
        return {"generator": self.m.generator, "critic": self.m.critic}

    def use_wrapped(self, wrapped: dict) -> None:
        self.net.update(wrapped)

    def make_optimizers(self) -> None:
        """AdamW of the generator (optim.gen_lr) and of the critic (`critic_optimizer`)."""
        o = self.cfg.optim
        self.gen_params = [p for p in self.m.generator.parameters() if p.requires_grad]
        self.critic_params, opt_c = critic_optimizer(self.cfg, self.m.critic)
        adam = dict(betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
        self.optimizers = {"generator": torch.optim.AdamW(self.gen_params, lr=o.gen_lr, **adam), "critic": opt_c}

    def ema_source(self) -> torch.nn.Module:
        return self.m.generator

    def ema_beta(self, state) -> float:
        return optim.ema_beta(self.cfg.optim.batch_size, self.cfg.optim.ema_halflife_kimg * 1000)

    def lr_factor(self, state) -> float:
        """Learning-rate multiplier at the images seen (a pure function of the state: resume is exact)."""
        o = self.cfg.optim
        if o.lr_schedule == "constant":
            return 1.0
        return optim.cosine_factor(state.num_images / (self.cfg.run.total_kimg * 1000), o.lr_final)

    def phases(self, state) -> list[Phase]:
        cfg = self.cfg
        critic = Phase("critic", self.m.critic, self.critic_loss)
        if state.step % cfg.optim.gen_every or state.num_images / 1000 < cfg.loss.gen_warmup_kimg:
            return [critic]
        gen = Phase("generator", self.m.generator, self.generator_loss, ema=True)
        return [gen, critic] if cfg.optim.order == "generator_first" else [critic, gen]

    def networks(self) -> dict[str, torch.nn.Module]:
        """The checkpointed networks by state-dict key (today's checkpoint format)."""
        return {"generator": self.m.generator, "fake": self.m.fake, "disc": self.m.disc}

    def optimizer_keys(self) -> dict[str, str]:
        return {"generator": "opt_g", "critic": "opt_c"}

    def extra_state(self) -> dict:
        return {"reward_z": self.target.state_dict()} if self.target is not None else {}

    def load_extra_state(self, state: dict) -> None:
        if self.target is not None:
            self.target.load_state_dict(state["reward_z"])

    def config_json(self) -> str:
        return self.cfg.to_json()

    def config_dict(self) -> dict:
        return self.cfg.to_dict()

    def check_resume(self, state: dict, path: Path) -> None:
        """Refuse a checkpoint written by another config, or a change of run.total_kimg under a length-dependent
        lr schedule (sections/keys added since the checkpoint was written take their defaults)."""
        try:
            old = DistillConfig.from_dict(state["config"]).to_dict()
        except ValueError:
            old = state["config"]
        diff = config_diff(old, self.cfg.to_dict())
        if "run.total_kimg" in diff and self.cfg.optim.lr_schedule != "constant":
            raise ValueError(
                f"{path}: run.total_kimg differs from the checkpoint's, and the {self.cfg.optim.lr_schedule} "
                "lr schedule is a function of it; keep run.total_kimg or use lr_schedule=constant"
            )
        diff -= RESUMABLE_CHANGES
        if diff:
            raise ValueError(
                f"{path} was written by a different config (differs in {sorted(diff)}); "
                f"use another --run-dir or the same settings"
            )

    def preview(self, ema, run_dir: Path, num_images: int) -> None:
        """The teacher family's preview of the EMA generator (`Models.preview`) under samples/."""
        path = Path(run_dir) / "samples" / f"samples-{num_images // 1000:06d}k.png"
        with torch.no_grad():
            seed, title = seed_for(self.cfg.run.seed, "preview"), f"{num_images / 1000:.0f} kimg"
            self.m.preview(ema, path, seed, self.device, title=title)

    def after_checkpoint(self, engine, ema) -> None:
        """run.keep_ema_every_kimg: ema-<images>.safetensors for FID curves."""
        from ..generators import export_ema_snapshot

        conditional = self.m.conditions is not None
        export_ema_snapshot(ema, self.cfg, engine.run_dir, engine.state.num_images, conditional)

    def export(self, ema, run_dir: Path, num_images: int):
        """Write the EMA generator: a LoRA student's adapters (`export.py`), else its full weights the teacher
        family's way (`Models.export`); then its model card beside it."""
        from ..export import export_student
        from ..modelcard import write_card

        path = export_student(ema, self.cfg, run_dir, num_images, full=self.m.export)
        write_card(Path(path), run_dir)
        return path

    # ---- the losses --------------------------------------------------------------------------------------
    def autocast(self):
        if self.cfg.optim.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def draw(self, rnd: int, n: int, *, real: bool = True) -> tuple[Batch, torch.Tensor | None]:
        """Micro-batch `rnd` of the current step (global n samples; this rank's slice)."""
        return draw_batch(self.cfg, self.m, self.state.step, rnd, n, self.device, self.sigma_range, real=real)

    def critic_loss(self, rnd: int, n: int, norm: int, mon) -> torch.Tensor:
        """Lines 16-22 for micro-batch `rnd`: fake-score DSM on G(z) and Eq. 5's BCE, at the draws of the step."""
        b, real = self.draw(rnd, n)
        if self.target is not None:  # Z = E_p[R] on the real side
            mon.add(self.target.observe(real, dist.all_gather_cat if dist.world_size() > 1 else None))
        with self.autocast():
            loss, stats, by_sigma = self.critic_round(b, real, norm, rnd=rnd, n=n)
        mon.add(stats)
        for prefix, (values, sigma) in by_sigma.items():
            mon.add_by_sigma(prefix, values, sigma)
        return loss

    def critic_round(
        self, b: Batch, real: torch.Tensor, norm: int, rnd: int = 0, n: int | None = None
    ) -> tuple[torch.Tensor, dict, dict]:
        with torch.no_grad():
            x_fake = self.student_output(b, rnd, n or len(b.z)).float()
        return critic_round(self.net["critic"], b, x_fake, real, norm, self.cfg.loss.disc_weight)

    def generator_loss(self, rnd: int, n: int, norm: int, mon) -> torch.Tensor:
        kimg = self.state.num_images / 1000
        gan_w = self.cfg.loss.gan_weight if kimg >= self.cfg.loss.gan_warmup_kimg else 0.0
        b, _ = self.draw(rnd, n, real=False)
        with self.autocast():
            loss, st = self.generator_round(b, gan_w, norm=norm, rnd=rnd, n=n)
        mon.add_weights(st)
        mon.add(st.get("reward", {}))
        return loss

    def log_weights(self, logits: torch.Tensor, sigma: torch.Tensor, rnd: int = 0) -> tuple[torch.Tensor, ...]:
        """Line 9 on the global micro-batch: the stabilised log weight and the normalisation's log factor."""
        log_w, log_n = divergences.stabilized_log_weight(self.div, logits, sigma=sigma, stab=self.stab)
        d = self.cfg.divergence
        if d.shuffle_weights:  # placebo: the same weights per sigma bin, at random samples (own seeded stream)
            bins = divergences.sigma_bin_index(sigma, d.num_sigma_bins, self.stab.sigma_range)
            g = generator_for(self.cfg.run.seed, "shuffle_weights", self.state.step, rnd)
            log_w = divergences.shuffle_within_bins(log_w, bins, g)
        return log_w, log_n

    def _global(self, fn, *local: torch.Tensor):
        """fn of the global micro-batch (every rank's tensors gathered); this rank's slice of its result(s)."""
        if dist.world_size() == 1:
            return fn(*local)
        out = fn(*(dist.all_gather_cat(t) for t in local))
        sl = local_slice(len(local[0]) * dist.world_size())
        return tuple(o[sl] for o in out) if isinstance(out, tuple) else out[sl]

    def student_output(self, b: Batch, rnd: int, n: int) -> torch.Tensor:
        """G(z) for K = 1; a K-step student's trained step for micro-batch `rnd` (n samples over all ranks)."""
        if self.fewstep is None:
            return self.net["generator"](b.z, b.cond)
        d = self.fewstep.draw(self.state.step, rnd, n, self.device)
        return self.fewstep.output(self.net["generator"], b, d)

    def generator_round(self, b: Batch, gan_w: float, norm: int, rnd: int, n: int) -> tuple[torch.Tensor, dict]:
        """Lines 5-15 for micro-batch `rnd` (n samples over all ranks): the networks at x_t, then Eq. 4 (+ Eq. 14,
        + regression, + GAN) from `distill`."""
        m, L, critic = self.m, self.cfg.loss, self.m.critic  # the critic is read, not trained: unwrapped
        x = self.student_output(b, rnd, n).float()  # line 5 (a K-step student: its trained step's output)
        s = bcast(b.gen_sigma, x)
        x_t = x.detach() + s * b.gen_noise  # line 6: forward process q_{t|0}(x_t | x_theta)
        with torch.no_grad():
            d_phi = m.teacher(x_t, b.gen_sigma, b.cond).float()  # line 7
            d_psi = critic(x_t, b.gen_sigma, b.cond).float()
            logits = critic(x_t, b.gen_sigma, b.cond, logit=True).float()  # line 8: r_t = e^{-l}
            divisor = losses.time_weight_divisor(L.weighting, b.gen_sigma, x.detach(), d_phi)
            gap = (d_phi - d_psi) / bcast(divisor, x)  # w(t) (s_phi - s_psi)
            if not (torch.isfinite(logits).all() and torch.isfinite(gap).all()):
                raise NonFiniteError("non-finite discriminator logits or score difference in the generator step")
            log_w, log_n = self._global(lambda *t: self.log_weights(*t, rnd=rnd), logits, b.gen_sigma)  # line 9
            w = divergences.weight_from_log(log_w, self.stab)
            if not torch.isfinite(w).all():  # e.g. normalize=none with a large lambda: float32 overflow
                raise NonFiniteError("the Bregman weight overflows; set divergence.logit_clamp or a normalisation")
        loss = losses.dibregman_loss(x, d_phi, d_psi, w, divisor, norm)
        stats = {"weight": w, "logits": logits, "sigma": b.gen_sigma, "gap": per_sample_mean(gap.square())}
        if self.target is not None:  # Eq. 14: + w(t) h''(r*_t) grad r*_t, with Eq. 4's w(t) and normalisation
            g, log_w_star = self.target.term(x_t, b.gen_sigma, b.cond, div=self.div, stab=self.stab)
            tw = losses.time_weight(L.weighting, b.gen_sigma, x.detach(), d_phi)
            extra, coef = losses.target_ratio_loss(x, g, log_w_star, log_n, tw, norm)
            if not torch.isfinite(coef).all():
                raise NonFiniteError("non-finite target-ratio weight w(r*); set divergence.logit_clamp")
            loss = loss + extra
            stats["reward"] = self.target.stats(x, b.cond, coef, g)
        if self.regression is not None:  # DMD's regression towards the teacher's ODE map (regression.py)
            reg, stats["regression"] = self.regression.loss(m, self.state.step, rnd, n, norm, self.device)
            loss = loss + reg
        if gan_w > 0:  # the GAN term's gradient flows through x into G only: eta's weights enter as constants
            frozen = {k: v.detach() for k, v in critic.named_parameters()}
            args = (x + s * b.gan_noise, b.gen_sigma, b.cond)
            with parallel.keep_activations(critic):
                gan_logits = functional_call(critic, frozen, args, {"logit": True}, strict=False).float()
            gan = losses.gan_generator_loss(gan_logits, L.gan_logit_clamp)
            loss = loss + gan_w * gan.sum() / norm
            stats["gan"] = gan.detach()
        return loss, stats


__all__ = ["DiBregman", "critic_optimizer", "critic_round"]
