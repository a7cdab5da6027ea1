"""The distillation loop: orchestration only (phases, optimisers, EMA, accumulation, data parallelism, NaN guard,
checkpoints, logging). The maths lives in `distill.py` and `divergences.py`.

Reproducibility: every random draw of step k comes from a generator seeded by (seed, k, phase, round) and is
drawn for the *global* micro-batch; each rank takes its slice. Hence N steps + resume + N steps equals 2N
steps bitwise, and `torchrun --nproc_per_node W` equals one process with the same global batch (up to the
floating-point order of the gradient all-reduce). Batch statistics of the weights (normalisation) are taken
over the global micro-batch via an all-gather of the logits.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import dist, divergences, runguard
from .build import Models, build_models
from .config import DistillConfig, divergence_params, validate
from .distill import (
    Batch,
    NonFiniteError,
    discriminator_loss,
    fake_score_loss,
    generator_loss,
    karras_uniform_sigma,
)
from .monitor import Monitor
from .noise import edm_training_sigma
from .reward import build_target

# Keys that may change between a checkpoint and its resumption (length and reporting only).
RESUMABLE_CHANGES = {
    "run.total_kimg",
    "run.log_every_kimg",
    "run.ckpt_every_kimg",
    "run.sample_every_kimg",
    "run.keep_ckpts",
    "run.threads",
    "run.device",
    "run.tensorboard",
    "run.max_bad_steps",
}


@dataclass
class State:
    step: int = 0  # completed optimisation steps
    num_images: int = 0  # generator images seen (global)
    bad_steps: int = 0  # NaN/Inf steps skipped in total
    bad_in_row: int = 0  # consecutive NaN/Inf steps
    history: list = field(default_factory=list)


def stabilizer(cfg: DistillConfig) -> divergences.Stabilizer:
    d = cfg.divergence
    clip = (d.ratio_clip_min, d.ratio_clip_max) if d.ratio_clip_max > 0 else None
    return divergences.Stabilizer(
        logit_clamp=d.logit_clamp or None,
        ratio_clip=clip,
        normalize=d.normalize,
        num_sigma_bins=d.num_sigma_bins,
        weight_clip=d.weight_clip or None,
    )


def draw_batch(cfg: DistillConfig, m: Models, step: int, rnd: int, n: int, device, sigma_range) -> tuple:
    """All random draws of micro-batch `rnd` of step `step` for the global micro-batch of size n."""
    g = torch.Generator().manual_seed(((cfg.run.seed * 1_000_003 + step) * 64 + rnd) % (2**63))
    shape = (n, *m.shape)
    lo, hi = sigma_range
    L = cfg.loss

    def noise():
        return torch.randn(shape, generator=g)

    b = Batch(
        z=noise(),
        gen_sigma=karras_uniform_sigma(n, L.gen_t_max, lo, hi, generator=g),
        gen_noise=noise(),
        gan_noise=noise(),
        fake_sigma=edm_training_sigma(n, L.fake_p_mean, L.fake_p_std, m.sigma_data, generator=g)[0],
        fake_noise=noise(),
        disc_sigma=karras_uniform_sigma(n, L.disc_t_max, lo, hi, generator=g),
        disc_noise_real=noise(),
        disc_noise_fake=noise(),
    )
    real = m.real(g, n)
    if m.conditions is not None:  # c ~ D_c (line 4); the real side brings its own captions, (x_gt, c) line 21
        real, real_index = real
        cond_index = m.conditions.draw(g, n)
    sl = local_slice(n)
    for k, v in vars(b).items():
        if isinstance(v, torch.Tensor):
            setattr(b, k, v[sl].to(device))
    if m.conditions is not None:  # only this rank's slice is embedded
        b.cond = m.conditions.embed(cond_index[sl], device)
        b.real_cond = m.real_conditions.embed(real_index[sl], device)
    return b, real[sl].to(device)


def local_slice(n: int) -> slice:
    w, r = dist.world_size(), dist.rank()
    if n % w:
        raise ValueError(f"global micro-batch {n} is not divisible by the world size {w}")
    per = n // w
    return slice(r * per, (r + 1) * per)


def _all_finite(tensors) -> bool:
    """True if every tensor is finite on every rank."""
    flags = [torch.isfinite(t).all() for t in tensors if t is not None]
    ok = torch.stack(flags).all().float() if flags else torch.ones(())
    if dist.world_size() > 1:
        dist.all_reduce_sum_([ok])
        return bool(ok.item() == dist.world_size())
    return bool(ok.item())


def _apply(opt, params, clip: float, name: str, mon: Monitor) -> bool:
    """All-reduce gradients, guard against NaN/Inf, clip, step. Returns False (and skips) on a non-finite gradient."""
    grads = [p.grad for p in params if p.grad is not None]
    dist.all_reduce_sum_(grads)
    if not _all_finite([p.grad for p in params]):
        opt.zero_grad(set_to_none=True)
        mon.add({f"skipped/{name}": 1.0})
        return False
    if clip > 0:
        mon.add({f"{name}/grad_norm": float(torch.nn.utils.clip_grad_norm_(params, clip))})
    opt.step()
    opt.zero_grad(set_to_none=True)
    if not _all_finite(params):  # e.g. a corrupt optimiser state: a bad step, never saved (Trainer.save)
        mon.add({f"skipped/{name}_weights": 1.0})
        return False
    return True


class Trainer:
    def __init__(self, cfg: DistillConfig, run_dir: str | Path, hooks: list[Callable] | None = None):
        self.cfg = validate(cfg)
        self.run_dir = Path(run_dir)
        self.hooks = hooks or []
        self.device = self._device()
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        torch.manual_seed(cfg.run.seed)
        self.m = build_models(cfg, self.device)
        self.div = divergences.get(cfg.divergence.name, **divergence_params(cfg.divergence))
        self.stab = stabilizer(cfg)
        self.target = build_target(cfg, self.m, self.device)  # Appendix G reward tilt (reward.py), or None
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
        lo = cfg.loss.gen_sigma_min or t.sigma_min
        self.sigma_range = (lo, cfg.loss.gen_sigma_max or t.sigma_max)
        self.state = State()
        self._resume()

    def _device(self) -> torch.device:
        return dist.init(self.cfg.run.device)

    def _autocast(self):
        if self.cfg.optim.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- checkpoints -------------------------------------------------------------------------------------
    def _state_dict(self) -> dict:
        s = self.state
        return {
            "generator": self.m.generator.state_dict(),
            "ema": self.ema.state_dict(),
            "fake": self.m.fake.state_dict(),
            "disc": self.m.disc.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_c": self.opt_c.state_dict(),
            "config": self.cfg.to_dict(),
            "step": s.step,
            "num_images": s.num_images,
            "bad_steps": s.bad_steps,
            "bad_in_row": s.bad_in_row,
            ckpt.HEALTHY_KEY: s.bad_in_row == 0,  # weights are finite: save() writes nothing otherwise
            "rng_cpu": torch.get_rng_state(),
            **({"reward_z": self.target.state_dict()} if self.target else {}),
        }

    def _resume(self) -> None:
        if dist.rank() == 0:  # another process on this folder: stop before reading it
            runguard.RunLock(self.run_dir).probe()
        self._newest_ckpt = (ckpt.list_checkpoints(self.run_dir) or [None])[-1]
        found = ckpt.load_latest(self.run_dir, check=_weights_problem)
        if found is None:
            return
        state, path = found
        try:  # sections/keys added since the checkpoint was written take their defaults
            old = DistillConfig.from_dict(state["config"]).to_dict()
        except ValueError:
            old = state["config"]
        diff = config_diff(old, self.cfg.to_dict()) - RESUMABLE_CHANGES
        if diff:
            raise ValueError(
                f"{path} was written by a different config (differs in {sorted(diff)}); "
                f"use another --run-dir or the same settings"
            )
        try:
            for name, module in (
                ("generator", self.m.generator),
                ("ema", self.ema),
                ("fake", self.m.fake),
                ("disc", self.m.disc),
            ):
                module.load_state_dict(state[name])
            self.opt_g.load_state_dict(state["opt_g"])
            self.opt_c.load_state_dict(state["opt_c"])
            if self.target is not None:
                self.target.load_state_dict(state["reward_z"])
        except (RuntimeError, KeyError) as e:
            raise ValueError(f"{path} does not match this model: {e}") from e
        s = self.state
        s.step, s.num_images, s.bad_steps, s.bad_in_row = (
            state["step"],
            state["num_images"],
            state["bad_steps"],
            state["bad_in_row"],
        )
        torch.set_rng_state(state["rng_cpu"])
        dist.print0(f"resumed from {path} at {s.num_images / 1000:.1f} kimg (step {s.step})")

    def save(self) -> Path | None:
        """Checkpoint (rank 0), unless the weights are non-finite: a bad state never replaces a good one."""
        path = None
        if dist.rank() == 0:
            state = self._state_dict()
            problem = _weights_problem(state)
            if problem:
                print(f"warning: no checkpoint at step {self.state.step}: the model {problem}", flush=True)
            else:
                path = ckpt.save_atomic(state, ckpt.checkpoint_path(self.run_dir, self.state.num_images))
                ckpt.prune(self.run_dir, self.cfg.run.keep_ckpts)
                self._newest_ckpt = ckpt.list_checkpoints(self.run_dir)[-1]
        dist.barrier()
        return path

    # ---- one optimisation step ---------------------------------------------------------------------------
    def _critic_step(self, mon: Monitor) -> bool:
        cfg, m, B = self.cfg, self.m, self.cfg.optim.batch_size
        n = B // cfg.optim.accum_steps
        for rnd in range(cfg.optim.accum_steps):
            b, real = draw_batch(cfg, m, self.state.step, rnd, n, self.device, self.sigma_range)
            if self.target is not None:  # Z = E_p[R] on the real side
                mon.add(self.target.observe(real, dist.all_gather_cat if dist.world_size() > 1 else None))
            with self._autocast():
                with torch.no_grad():
                    x_fake = m.generator(b.z, b.cond).float()
                dsm = fake_score_loss(m.fake, x_fake, b, m.sigma_data, norm=B)
                bce, st = discriminator_loss(m.disc, real, x_fake, b, norm=B, real_cond=b.real_cond)
                loss = dsm + cfg.loss.disc_weight * bce
            loss.backward()
            mon.add(
                {
                    "loss/fake_dsm": float(dsm.detach()) * B / len(x_fake),
                    "loss/disc_bce": float(bce.detach()) * B / len(x_fake),
                    **{f"disc/{k}": float(v) for k, v in st.items()},
                }
            )
        return _apply(self.opt_c, self.critic_params, cfg.optim.grad_clip, "critic", mon)

    def _generator_step(self, mon: Monitor) -> bool:
        cfg, m, B = self.cfg, self.m, self.cfg.optim.batch_size
        n = B // cfg.optim.accum_steps
        kimg = self.state.num_images / 1000
        gan_w = cfg.loss.gan_weight if kimg >= cfg.loss.gan_warmup_kimg else 0.0
        gather = dist.all_gather_cat if dist.world_size() > 1 else None
        for rnd in range(cfg.optim.accum_steps):
            b, _ = draw_batch(cfg, m, self.state.step, rnd, n, self.device, self.sigma_range)
            with self._autocast():
                x = m.generator(b.z, b.cond).float()
                try:
                    loss, st = generator_loss(
                        x,
                        b,
                        teacher=m.teacher,
                        fake=m.fake,
                        disc=m.disc,
                        div=self.div,
                        stab=self.stab,
                        weighting=cfg.loss.weighting,
                        gan_weight=gan_w,
                        gan_logit_clamp=cfg.loss.gan_logit_clamp,
                        norm=B,
                        gather=gather,
                        local_slice=local_slice(n),
                        reward=self.target,
                    )
                except NonFiniteError:
                    self.opt_g.zero_grad(set_to_none=True)
                    mon.add({"skipped/generator": 1.0})
                    return False
            loss.backward()
            mon.add_weights(st)
            mon.add(st.get("reward", {}))
        for p in self.critic_params:  # the GAN term back-propagates into eta; that gradient is not eta's
            p.grad = None
        ok = _apply(self.opt_g, self.gen_params, cfg.optim.grad_clip, "generator", mon)
        if ok:
            self._update_ema()
        return ok

    def _update_ema(self) -> None:
        hl = self.cfg.optim.ema_halflife_kimg * 1000
        beta = 0.5 ** (self.cfg.optim.batch_size / hl) if hl > 0 else 0.0
        with torch.no_grad():
            for pe, pg in zip(self.ema.parameters(), self.m.generator.parameters(), strict=False):
                pe.lerp_(pg, 1 - beta)

    def lr_factor(self) -> float:
        """Learning-rate multiplier at the current images seen (a pure function of the state: resume is exact)."""
        o = self.cfg.optim
        if o.lr_schedule == "constant":
            return 1.0
        progress = min(self.state.num_images / (self.cfg.run.total_kimg * 1000), 1.0)
        return o.lr_final + (1 - o.lr_final) * 0.5 * (1 + math.cos(math.pi * progress))

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
        every = {k: int(getattr(cfg.run, f"{k}_every_kimg") * 1000) for k in ("log", "ckpt", "sample")}
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
        """Write the EMA generator as `generator.safetensors` + `generator.json` (rank 0)."""
        from .generators import generator_meta

        if dist.rank() != 0:
            return None
        if self.m.conditions is not None:  # text-to-image: a diffusers folder (t2i.export_diffusers)
            from .t2i import export_diffusers

            folder = self.run_dir / "diffusers"
            return str(export_diffusers(self.ema, self.cfg, folder, self.state.num_images))
        meta = generator_meta(self.ema, self.cfg, self.state.num_images)
        return str(ckpt.export_safetensors(self.ema.state_dict(), meta, self.run_dir / "generator"))


def _weights_problem(state: dict) -> str | None:
    """Why a checkpoint's networks cannot be used (non-finite weights), or None."""
    if not ckpt.all_finite(*(state.get(k, {}) for k in ("generator", "ema", "fake", "disc"))):
        return "has non-finite weights"
    return None


def config_diff(a: dict, b: dict, prefix: str = "") -> set:
    """Dotted keys whose values differ between two nested config dicts."""
    keys = set(a) | set(b)
    out = set()
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out |= config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb and not (isinstance(va, float | int) and isinstance(vb, float | int) and math.isclose(va, vb)):
            out.add(f"{prefix}{k}")
    return out


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


__all__ = ["Trainer", "distill", "config_diff"]
