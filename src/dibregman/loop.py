"""The distillation loop: orchestration only (phases, optimisers, EMA, accumulation, data parallelism, NaN guard,
checkpoints, logging). The maths lives in `distill.py` and `divergences.py`; the draws in `draws.py`.

Reproducibility: every random draw of step k comes from a generator seeded by `draws.seed_for(seed, "batch", k,
round)` -- not by phase: the critic and the generator phase of a step share their draws (z included), as in
Algorithm 1 -- and is drawn for the *global* micro-batch; each rank takes its slice. Hence N steps + resume + N
steps equals 2N steps bitwise, and `torchrun --nproc_per_node W` equals one process with the same global batch
(up to the floating-point order of the gradient all-reduce). Batch statistics of the weights (normalisation) are
taken over the global micro-batch via an all-gather of the logits.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import dist, divergences, optim, runguard, trainer_state
from . import distill as losses
from .build import build_models, objective
from .config import DistillConfig, validate
from .distill import NonFiniteError, bcast, per_sample_mean
from .draws import Batch, draw_batch, generator_for, local_slice
from .generators import export_ema_snapshot
from .monitor import Monitor
from .regression import build_regression
from .rewards import build_target


@dataclass
class State:
    step: int = 0  # completed optimisation steps
    num_images: int = 0  # generator images seen (global)
    bad_steps: int = 0  # NaN/Inf steps skipped in total
    bad_in_row: int = 0  # consecutive NaN/Inf steps


def _apply(opt, params, clip: float | None, name: str, mon: Monitor) -> bool:
    """`optim.guarded_step`, logged: False (and a skip) on a non-finite gradient, or on non-finite weights after the
    step (e.g. a corrupt optimiser state: a bad step, never saved, see Trainer.save)."""
    ok, grad_norm = optim.guarded_step(opt, params, clip)
    if not ok:
        mon.add({f"skipped/{name}": 1.0})
    elif grad_norm is not None:
        mon.add({f"{name}/grad_norm": grad_norm})
    if ok and not optim.all_finite(params):
        mon.add({f"skipped/{name}_weights": 1.0})
        return False
    return ok


class Trainer:
    def __init__(
        self,
        cfg: DistillConfig,
        run_dir: str | Path,
        hooks: list[Callable] | None = None,
        *,
        pretrain: Callable | None = None,  # see build.build_models
    ):
        self.cfg = validate(cfg)
        self.run_dir = Path(run_dir)
        self.hooks = hooks or []
        self.device = self._device()
        found = trainer_state.preflight(self)  # every refusal before a model is built or a file written
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        torch.manual_seed(cfg.run.seed)
        self.m = build_models(cfg, self.device, pretrain=pretrain)
        self.div, self.stab = objective(cfg)  # Eq. 4's weight: divergence and stabiliser
        self.target = build_target(cfg, self.m, self.device)  # Appendix G reward tilt (rewards.py), or None
        self.regression = build_regression(cfg, self.m, self.run_dir, self.device)  # DMD's term, or None
        self.ema = copy.deepcopy(self.m.generator).requires_grad_(False)
        o = cfg.optim
        self.gen_params = list(self.m.generator.parameters())
        critic = list(self.m.fake.parameters()) + list(self.m.disc.parameters())
        self.critic_params = list({id(p): p for p in critic}.values())
        adam = dict(betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
        self.opt_g = torch.optim.AdamW(self.gen_params, lr=o.gen_lr, **adam)
        head = {id(p) for p in self.m.disc.linear.parameters()} if self.m.disc.linear is not None else set()
        groups = [
            {"params": [p for p in self.critic_params if id(p) not in head], "lr": o.fake_lr},
            {"params": [p for p in self.critic_params if id(p) in head], "lr": o.fake_lr * o.head_lr_mult},
        ]
        self.opt_c = torch.optim.AdamW([g for g in groups if g["params"]], **adam)
        self.critic_base_lrs = [g["lr"] for g in self.opt_c.param_groups]
        t = self.m.teacher
        lo, hi = cfg.loss.gen_sigma_min, cfg.loss.gen_sigma_max  # None: the teacher's
        self.sigma_range = (t.sigma_min if lo is None else lo, t.sigma_max if hi is None else hi)
        self.state = State()
        self._resume(found)

    def _device(self) -> torch.device:
        return dist.init(self.cfg.run.device)

    def _autocast(self):
        if self.cfg.optim.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- checkpoints -------------------------------------------------------------------------------------
    def _state_dict(self) -> dict:
        return trainer_state.state_dict(self)

    def _resume(self, found) -> None:
        trainer_state.resume(self, found)

    def save(self) -> Path | None:
        """Checkpoint (rank 0), unless the weights are non-finite: a bad state never replaces a good one."""
        return trainer_state.save(self)

    # ---- one optimisation step ---------------------------------------------------------------------------
    def _global(self, fn, *local: torch.Tensor):
        """fn of the global micro-batch (every rank's tensors gathered); this rank's slice of its result(s)."""
        if dist.world_size() == 1:
            return fn(*local)
        out = fn(*(dist.all_gather_cat(t) for t in local))
        sl = local_slice(len(local[0]) * dist.world_size())
        return tuple(o[sl] for o in out) if isinstance(out, tuple) else out[sl]

    def _log_weights(self, logits: torch.Tensor, sigma: torch.Tensor, rnd: int = 0) -> tuple[torch.Tensor, ...]:
        log_w, log_n = divergences.stabilized_log_weight(self.div, logits, sigma=sigma, stab=self.stab)
        d = self.cfg.divergence
        if d.shuffle_weights:  # placebo: the same weights per sigma bin, at random samples (own seeded stream)
            bins = divergences.sigma_bin_index(sigma, d.num_sigma_bins, self.stab.sigma_range)
            g = generator_for(self.cfg.run.seed, "shuffle_weights", self.state.step, rnd)
            log_w = divergences.shuffle_within_bins(log_w, bins, g)
        return log_w, log_n

    def _critic_round(self, b: Batch, real: torch.Tensor, norm: int) -> tuple[torch.Tensor, dict, dict]:
        """Lines 16-22 for one micro-batch: fake-score DSM on G(z) and Eq. 5's BCE, at the draws of `b`."""
        m = self.m
        with torch.no_grad():
            x_fake = m.generator(b.z, b.cond).float()
        x_psi = x_fake + bcast(b.fake_sigma, x_fake) * b.fake_noise
        d_psi = m.fake(x_psi, b.fake_sigma, b.cond).float()
        dsm = losses.fake_score_loss(d_psi, x_fake, b.fake_weight, norm)
        s = bcast(b.disc_sigma, x_fake)
        real_cond = b.cond if b.real_cond is None else b.real_cond
        l_real = m.disc(real + s * b.disc_noise_real, b.disc_sigma, real_cond).float()
        l_fake = m.disc(x_fake + s * b.disc_noise_fake, b.disc_sigma, b.cond).float()
        bce, st = losses.discriminator_loss(l_real, l_fake, norm)
        n = len(x_fake)
        stats = {"loss/fake_dsm": float(dsm.detach()) * norm / n, "loss/disc_bce": float(bce.detach()) * norm / n}
        with torch.no_grad():  # per sigma bin: where the critic lags (logged by the monitor)
            by_sigma = {
                "fake_dsm_by_sigma": (b.fake_weight * per_sample_mean((d_psi - x_fake).square()), b.fake_sigma),
                "disc_acc_by_sigma": (0.5 * ((l_real > 0).float() + (l_fake < 0).float()), b.disc_sigma),
            }
        stats = {**stats, **{f"disc/{k}": float(v) for k, v in st.items()}}
        return dsm + self.cfg.loss.disc_weight * bce, stats, by_sigma

    def _critic_step(self, mon: Monitor) -> bool:
        cfg, m, B = self.cfg, self.m, self.cfg.optim.batch_size
        n = B // cfg.optim.accum_steps
        for rnd in range(cfg.optim.accum_steps):
            b, real = draw_batch(cfg, m, self.state.step, rnd, n, self.device, self.sigma_range)
            if self.target is not None:  # Z = E_p[R] on the real side
                mon.add(self.target.observe(real, dist.all_gather_cat if dist.world_size() > 1 else None))
            with self._autocast():
                loss, stats, by_sigma = self._critic_round(b, real, norm=B)
            loss.backward()
            mon.add(stats)
            for prefix, (values, sigma) in by_sigma.items():
                mon.add_by_sigma(prefix, values, sigma)
        return _apply(self.opt_c, self.critic_params, cfg.optim.grad_clip, "critic", mon)

    def _generator_round(self, b: Batch, gan_w: float, norm: int, rnd: int, n: int) -> tuple[torch.Tensor, dict]:
        """Lines 5-15 for micro-batch `rnd` (n samples over all ranks): the networks at x_t, then Eq. 4 (+ Eq. 14,
        + GAN) from `distill`."""
        m, L = self.m, self.cfg.loss
        x = m.generator(b.z, b.cond).float()  # line 5
        s = bcast(b.gen_sigma, x)
        x_t = x.detach() + s * b.gen_noise  # line 6: forward process q_{t|0}(x_t | x_theta)
        with torch.no_grad():
            d_phi = m.teacher(x_t, b.gen_sigma, b.cond).float()  # line 7
            d_psi = m.fake(x_t, b.gen_sigma, b.cond).float()
            logits = m.disc(x_t, b.gen_sigma, b.cond).float()  # line 8: r_t = e^{-l}
            divisor = losses.time_weight_divisor(L.weighting, b.gen_sigma, x.detach(), d_phi)
            gap = (d_phi - d_psi) / bcast(divisor, x)  # w(t) (s_phi - s_psi)
            if not (torch.isfinite(logits).all() and torch.isfinite(gap).all()):
                raise NonFiniteError("non-finite discriminator logits or score difference in the generator step")
            log_w, log_n = self._global(lambda *t: self._log_weights(*t, rnd=rnd), logits, b.gen_sigma)  # line 9
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
        if gan_w > 0:  # the GAN term's gradient flows through x into G (and into eta: cleared by the caller)
            gan = losses.gan_generator_loss(m.disc(x + s * b.gan_noise, b.gen_sigma, b.cond).float(), L.gan_logit_clamp)
            loss = loss + gan_w * gan.sum() / norm
            stats["gan"] = gan.detach()
        return loss, stats

    def _generator_step(self, mon: Monitor) -> bool:
        cfg, m, B = self.cfg, self.m, self.cfg.optim.batch_size
        n = B // cfg.optim.accum_steps
        kimg = self.state.num_images / 1000
        gan_w = cfg.loss.gan_weight if kimg >= cfg.loss.gan_warmup_kimg else 0.0
        try:
            for rnd in range(cfg.optim.accum_steps):
                b, _ = draw_batch(cfg, m, self.state.step, rnd, n, self.device, self.sigma_range, real=False)
                with self._autocast():
                    loss, st = self._generator_round(b, gan_w, norm=B, rnd=rnd, n=n)
                loss.backward()
                mon.add_weights(st)
                mon.add(st.get("reward", {}))
        except NonFiniteError:
            self.opt_g.zero_grad(set_to_none=True)
            mon.add({"skipped/generator": 1.0})
            return False
        finally:  # the GAN term back-propagates into eta; that gradient is not eta's (also after a NaN round)
            for p in self.critic_params:
                p.grad = None
        ok = _apply(self.opt_g, self.gen_params, cfg.optim.grad_clip, "generator", mon)
        if ok:
            self._update_ema()
        return ok

    def _update_ema(self) -> None:
        beta = optim.ema_beta(self.cfg.optim.batch_size, self.cfg.optim.ema_halflife_kimg * 1000)
        optim.update_ema(self.ema, self.m.generator, beta)

    def lr_factor(self) -> float:
        """Learning-rate multiplier at the current images seen (a pure function of the state: resume is exact)."""
        o = self.cfg.optim
        if o.lr_schedule == "constant":
            return 1.0
        return optim.cosine_factor(self.state.num_images / (self.cfg.run.total_kimg * 1000), o.lr_final)

    def _set_lrs(self) -> float:
        f, o = self.lr_factor(), self.cfg.optim
        for group in self.opt_g.param_groups:
            group["lr"] = o.gen_lr * f
        for group, base in zip(self.opt_c.param_groups, self.critic_base_lrs, strict=True):
            group["lr"] = base * f
        return f

    def step(self, mon: Monitor) -> None:
        cfg, s = self.cfg, self.state
        lr_mult = self._set_lrs()
        if cfg.optim.lr_schedule != "constant":
            mon.add({"optim/lr_mult": lr_mult})
        gen_now = s.step % cfg.optim.gen_every == 0 and s.num_images / 1000 >= cfg.loss.gen_warmup_kimg
        ok = True
        try:
            if cfg.optim.order == "generator_first" and gen_now:
                ok &= self._generator_step(mon)
            ok &= self._critic_step(mon)
            if cfg.optim.order == "critic_first" and gen_now:
                ok &= self._generator_step(mon)
        except NonFiniteError:  # e.g. a reward returning NaN/Inf on some samples: the rest of the step is skipped
            self.opt_g.zero_grad(set_to_none=True)
            self.opt_c.zero_grad(set_to_none=True)
            mon.add({"skipped/non_finite": 1.0})
            ok = False
        if ok:
            s.bad_in_row = 0
        else:  # a NaN/Inf step is skipped, counted and logged, never absorbed
            s.bad_steps += 1
            s.bad_in_row += 1
            dist.print0(
                f"warning: non-finite loss/gradient at step {s.step}: update skipped "
                f"({s.bad_in_row} in a row, {s.bad_steps} in total)"
            )
            if s.bad_in_row >= cfg.run.max_bad_steps:
                raise runguard.TooManyBadSteps(
                    f"aborting: {s.bad_in_row} consecutive non-finite steps (run.max_bad_steps="
                    f"{cfg.run.max_bad_steps}); lower the learning rates or check the teacher; "
                    "a resume starts from the newest healthy checkpoint"
                )
        s.step += 1
        s.num_images += cfg.optim.batch_size

    # ---- the loop ----------------------------------------------------------------------------------------
    def train(self, max_steps: int | None = None) -> dict:
        """Train to `run.total_kimg` (or `max_steps` more steps) holding the run folder's lock; SIGINT/SIGTERM
        finish the step, checkpoint and raise `runguard.RunInterrupted`."""
        lock = runguard.RunLock(self.run_dir)
        if dist.rank() == 0:
            lock.acquire()
        try:
            with runguard.StopSignals() as stop:
                return self._train(max_steps, stop)
        finally:
            lock.release()

    def _prepare_run_dir(self) -> None:
        """Rank 0 holding the lock: refuse a stale state, remove stale temp files, cut the log back to the state."""
        newest = (ckpt.list_checkpoints(self.run_dir) or [None])[-1]
        if newest != self._newest_ckpt:
            raise ValueError(
                f"{newest} appeared after this Trainer read {self.run_dir}: another process trained there since; "
                "build a new Trainer to resume from it"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        runguard.clean_stale_tmp(self.run_dir)
        runguard.truncate_log(self.run_dir / "log.jsonl", self.state.num_images)
        (self.run_dir / "config.json").write_text(self.cfg.to_json())

    def _stop_requested(self, stop: runguard.StopSignals) -> int:
        """The signal number if any rank was signalled (all ranks agree, so they stop at the same step), else 0."""
        if dist.world_size() == 1:
            return stop.signum or 0
        flag = torch.tensor([float(stop.signum or 0)], device=self.device)
        dist.all_reduce_sum_([flag])
        return int(flag.item() > 0) and (stop.signum or 15)

    def _train(self, max_steps: int | None, stop: runguard.StopSignals) -> dict:
        cfg, s = self.cfg, self.state
        total = int(cfg.run.total_kimg * 1000)
        if dist.rank() == 0:
            self._prepare_run_dir()
        mon = Monitor(self.run_dir, cfg, enabled=dist.rank() == 0, initial=s.num_images, total=total)
        every = {k: int((getattr(cfg.run, f"{k}_every_kimg") or 0) * 1000) for k in ("log", "ckpt", "sample")}
        steps_done, t_start = 0, time.time()
        while s.num_images < total and (max_steps is None or steps_done < max_steps):
            before = s.num_images
            t0 = time.perf_counter()
            self.step(mon)
            mon.add({"time/step_sec": time.perf_counter() - t0})
            steps_done += 1
            mon.progress(cfg.optim.batch_size)
            crossed = {k: every[k] > 0 and (s.num_images // every[k]) > (before // every[k]) for k in every}
            done = s.num_images >= total
            if crossed["log"] or done:
                extra = {}
                for hook in self.hooks:
                    extra.update(hook(self, s.num_images) or {})
                mon.flush(s.num_images, s.step, {"bad_steps_total": s.bad_steps, **extra})
            if crossed["sample"] or (done and every["sample"] > 0):
                mon.sample_grid(self, s.num_images)
            signum = self._stop_requested(stop)
            path = self.save() if crossed["ckpt"] or done or signum else None
            if path is not None:
                export_ema_snapshot(self)  # run.keep_ema_every_kimg: ema-<images>.safetensors for FID curves
            if signum and not done:
                mon.close()
                raise runguard.interrupted(signum, f"{s.num_images / 1000:g} kimg (step {s.step})", path)
        mon.close()
        export = self.export() if s.num_images >= total else None
        return {
            "run_dir": str(self.run_dir),
            "num_images": s.num_images,
            "steps": s.step,
            "bad_steps": s.bad_steps,
            "wall_sec": time.time() - t_start,
            "export": export,
        }

    def export(self) -> str | None:
        """Write the EMA generator the teacher family's way (`Models.export`) on rank 0; returns its path."""
        if dist.rank() != 0:
            return None
        return str(self.m.export(self.ema, self.cfg, self.run_dir, self.state.num_images))


def distill(
    cfg: DistillConfig,
    run_dir: str | Path,
    *,
    hooks: list[Callable] | None = None,
    max_steps: int | None = None,
) -> dict:
    """Run (or resume) Di-Bregman distillation in `run_dir`; returns a summary dict. Mirrors `dibregman distill`."""
    trainer = Trainer(cfg, run_dir, hooks)
    return trainer.train(max_steps=max_steps)


__all__ = ["Trainer", "distill"]
