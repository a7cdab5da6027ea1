"""The training engine: one loop for every method (Di-Bregman distillation, teacher denoising, the ratio
calibration's critic). It owns the step -- gradient accumulation, the guarded optimiser step (NaN/Inf skip, clip),
bad-step counting -- the EMA, the learning-rate schedule's application, data parallelism (`parallel.py`),
checkpoints and resume (`trainer_state.py`), signals, the run lock and logging. It knows nothing of divergences,
teachers or losses: a method (`methods/`) names its networks, optimisers and phases (`Phase`), and the engine
runs them.

Reproducibility: a method draws step k's randomness from `draws.seed_for(seed, stream, k, round)` for the *global*
micro-batch and each rank keeps its slice, so N steps + resume + N steps equals 2N steps bitwise, and W processes
equal one process with the same global batch (up to the floating-point order of the gradient reduction).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from . import dist, optim, parallel, runguard, trainer_state
from .distill import NonFiniteError
from .monitor import Monitor


@dataclass
class State:
    step: int = 0  # completed optimisation steps
    num_images: int = 0  # images seen (global)
    bad_steps: int = 0  # NaN/Inf steps skipped in total
    bad_in_row: int = 0  # consecutive NaN/Inf steps


@dataclass
class Phase:
    """One optimiser's share of a step: `loss(rnd, n, norm, mon)` is the loss of micro-batch `rnd` (n samples over all
    ranks, normalised by `norm`, the global batch; statistics go to `mon`); the engine backpropagates it, then
    steps the phase's optimiser."""

    name: str  # log prefix and the key of `Method.optimizers`
    module: nn.Module  # the network it trains (the engine wraps it for DDP/FSDP2)
    loss: Callable[[int, int, int, Monitor], torch.Tensor]
    ema: bool = False  # update the EMA after a good step


@dataclass(frozen=True)
class EngineSpec:
    """What the engine needs of a method's config (each method maps its own config onto it)."""

    batch_size: int  # global images per step
    total_images: int  # training length
    accum_steps: int = 1  # micro-batches per step
    grad_clip: float | None = None  # global gradient-norm clip per phase (None = off)
    max_bad_steps: int = 20  # abort after this many consecutive non-finite steps
    log_every: int = 0  # images between log records (0 = only at the end)
    ckpt_every: int = 0  # images between checkpoints (0 = only at the end)
    sample_every: int = 0  # images between preview pictures (0 = off)
    keep_ckpts: int = 2  # checkpoints kept on disk
    parallel: str = "none"  # auto | none | ddp | fsdp (`parallel.py`)
    activation_checkpointing: bool = False  # recompute the blocks' activations in backward (`parallel.py`)
    cpu_offload: bool = False  # FSDP2: parameters, gradients, optimiser states on the CPU
    compile: bool = False  # torch.compile the trained networks' forward
    tensorboard: bool = False
    desc: str = "train"  # progress-bar label


class Engine:
    """Trains `method` in `run_dir`: `Engine(method, run_dir).train()`; see the module docstring."""

    def __init__(self, method, run_dir: str | Path | None, hooks: list[Callable] | None = None):
        self.method = method
        self.spec: EngineSpec = method.engine_spec()
        self.run_dir = Path(run_dir) if run_dir is not None else None  # None: no folder, no resume (step only)
        self.hooks = hooks or []
        self.device = method.device
        self.mode = parallel.resolve(self.spec.parallel)
        self.sharded_params = self.mode == "fsdp"  # parameters are DTensor shards (FSDP2)
        src, trainable = method.ema_source(), method.trainable()
        self.ema = copy.deepcopy(src).requires_grad_(False) if src is not None else None
        self._ema_whole = copy.deepcopy(self.ema) if self.sharded_params and self.ema is not None else None
        blocks = {name: method.blocks(net) for name, net in trainable.items()}  # the family's repeated blocks
        if self.spec.activation_checkpointing:
            for units in blocks.values():
                parallel.checkpoint_blocks(units)
        if self.spec.compile:  # in place (`nn.Module.compile`): parameter names and checkpoints unchanged
            for net in trainable.values():
                net.compile()
        self.wrapped = parallel.wrap(trainable, self.mode, self.device, blocks, self.spec.cpu_offload)
        if self.sharded_params and self.ema is not None:  # sharded like its source: the update is shard-local
            parallel.shard(self.ema, self.device, method.blocks(self.ema))
        method.use_wrapped(self.wrapped)
        method.make_optimizers()  # after wrapping: FSDP2 replaces the parameters by their shards
        if self.sharded_params:  # torch 2.13: the first foreach step over many DTensor shards takes minutes
            for opt in method.optimizers.values():
                for group in opt.param_groups:
                    group["foreach"] = False
        self.phase_params = {name: _trainable(mod) for name, mod in method.trainable().items()}
        self.base_lrs = {k: [g["lr"] for g in o.param_groups] for k, o in method.optimizers.items()}
        self.state = State()
        method.state = self.state  # the method reads the step's counters (its draws are seeded by them)
        self._newest_ckpt = None
        if self.run_dir is not None:  # the method's own preflight (before it built its networks), or one now
            pre = method.preflight if getattr(method, "preflight", None) else trainer_state.preflight(run_dir, method)
            found, self._newest_ckpt = pre
            trainer_state.resume(self, found)

    # ---- one step --------------------------------------------------------------------------------------------
    def set_lrs(self) -> float:
        """Every optimiser group at its base lr times the method's factor (a pure function of the state)."""
        f = self.method.lr_factor(self.state)
        for key, opt in self.method.optimizers.items():
            for group, base in zip(opt.param_groups, self.base_lrs[key], strict=True):
                group["lr"] = base * f
        return f

    def run_phase(self, phase: Phase, mon: Monitor) -> bool:
        """Accumulate the phase's micro-batches (gradient sync only on the last), then the guarded step; False for
        a skipped update. A non-finite loss raises `_EndStep` (the step's remaining phases are skipped too)."""
        spec, opt = self.spec, self.method.optimizers[phase.name]
        n = spec.batch_size // spec.accum_steps
        scale = float(dist.world_size()) if self.mode != "none" else 1.0  # DDP/FSDP2 average over ranks
        try:
            for rnd in range(spec.accum_steps):
                with parallel.no_sync(self.wrapped.get(phase.name), last=rnd == spec.accum_steps - 1):
                    loss = phase.loss(rnd, n, spec.batch_size, mon)
                    (loss * scale if scale != 1.0 else loss).backward()
        except NonFiniteError as e:
            opt.zero_grad(set_to_none=True)
            mon.add({f"skipped/{phase.name}": 1.0})
            raise _EndStep from e
        ok = self._apply(opt, self.phase_params[phase.name], phase.name, mon)
        if ok and phase.ema and self.ema is not None:
            optim.update_ema(self.ema, self.method.ema_source(), self.method.ema_beta(self.state))
        return ok

    def _apply(self, opt, params, name: str, mon: Monitor) -> bool:
        """`optim.guarded_step`, logged: False (and a skip) on a non-finite gradient or optimiser state."""
        ok, grad_norm = optim.guarded_step(opt, params, self.spec.grad_clip)
        if not ok:
            mon.add({f"skipped/{name}": 1.0})
            return False
        if grad_norm is not None:
            mon.add({f"{name}/grad_norm": grad_norm})
        if not optim.all_finite(params):  # finite inputs gave non-finite weights: never train on from them
            raise runguard.TooManyBadSteps(
                f"aborting: the {name} update made the weights non-finite at step {self.state.step}; "
                "a resume starts from the newest healthy checkpoint"
            )
        return True

    def step(self, mon: Monitor) -> None:
        s, spec = self.state, self.spec
        factor = self.set_lrs()
        if self.method.logs_lr:
            mon.add({"optim/lr_mult": factor})
        ok = True
        for phase in self.method.phases(s):
            try:
                ok &= self.run_phase(phase, mon)
            except _EndStep:  # a non-finite loss (or a non-finite input of one) ends the step's remaining phases
                ok = False
                break
        if ok:
            s.bad_in_row = 0
        else:  # a NaN/Inf step is skipped, counted and logged, never absorbed
            s.bad_steps += 1
            s.bad_in_row += 1
            dist.print0(
                f"warning: non-finite loss/gradient at step {s.step}: update skipped "
                f"({s.bad_in_row} in a row, {s.bad_steps} in total)"
            )
            if s.bad_in_row >= spec.max_bad_steps:
                raise runguard.TooManyBadSteps(
                    f"aborting: {s.bad_in_row} consecutive non-finite steps (max_bad_steps={spec.max_bad_steps}); "
                    f"{self.method.bad_step_advice}; a resume starts from the newest healthy checkpoint"
                )
        s.step += 1
        s.num_images += spec.batch_size

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Checkpoint (rank 0), unless the weights are non-finite: a bad state never replaces a good one."""
        return trainer_state.save(self)

    # ---- the loop --------------------------------------------------------------------------------------------
    def train(self, max_steps: int | None = None) -> dict:
        """Train to the spec's length (or `max_steps` more steps) holding the run folder's lock; SIGINT/SIGTERM
        finish the step, checkpoint and raise `runguard.RunInterrupted`; a hook that raises `runguard.StopRun` ends
        the run the same way (its metrics logged, a checkpoint written, the exception raised again)."""
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
                f"{newest} appeared after this trainer read {self.run_dir}: another process trained there since; "
                "build a new trainer to resume from it"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        runguard.clean_stale_tmp(self.run_dir)
        runguard.truncate_log(self.run_dir / "log.jsonl", self.state.num_images)
        (self.run_dir / "config.json").write_text(self.method.config_json())

    def _stop_requested(self, stop: runguard.StopSignals, early: bool) -> tuple[int, bool]:
        """(the signal number if any rank was signalled else 0, whether a hook on any rank raised StopRun): all
        ranks agree, so they stop at the same step."""
        if dist.world_size() == 1:
            return stop.signum or 0, early
        flags = torch.tensor([float(stop.signum or 0), float(early)], device=self.device)
        dist.all_reduce_max_(flags)
        return int(flags[0].item()), bool(flags[1].item())

    def _train(self, max_steps: int | None, stop: runguard.StopSignals) -> dict:
        s, spec = self.state, self.spec
        total = spec.total_images
        if dist.rank() == 0:
            self._prepare_run_dir()
        mon = Monitor(
            self.run_dir, enabled=dist.rank() == 0, initial=s.num_images, total=total,
            tensorboard=spec.tensorboard, desc=spec.desc,
        )  # fmt: skip
        every = {"log": spec.log_every, "ckpt": spec.ckpt_every, "sample": spec.sample_every}
        steps_done, t_start = 0, time.time()
        while s.num_images < total and (max_steps is None or steps_done < max_steps):
            before = s.num_images
            t0 = time.perf_counter()
            self.step(mon)
            mon.add({"time/step_sec": time.perf_counter() - t0})
            steps_done += 1
            mon.progress(spec.batch_size)
            crossed = {k: every[k] > 0 and (s.num_images // every[k]) > (before // every[k]) for k in every}
            done = s.num_images >= total
            early = None  # a hook's runguard.StopRun
            if crossed["log"] or done:
                extra = {}
                for hook in self.hooks:
                    try:
                        extra.update(hook(self, s.num_images) or {})
                    except runguard.StopRun as e:
                        early = early or e
                        extra.update(e.metrics)
                mon.flush(s.num_images, s.step, {"bad_steps_total": s.bad_steps, **extra})
            if crossed["sample"] or (done and every["sample"] > 0):
                ema = self.whole_ema()
                if dist.rank() == 0:
                    self.method.preview(ema, self.run_dir, s.num_images)
            signum, halt = self._stop_requested(stop, early is not None)
            halt = halt and not done
            path = self.save() if crossed["ckpt"] or done or signum or halt else None
            if path is not None:
                ema = self.whole_ema()
                if dist.rank() == 0:
                    self.method.after_checkpoint(self, ema)
            if signum and not done:
                mon.close()
                raise runguard.interrupted(signum, f"{s.num_images / 1000:g} kimg (step {s.step})", path)
            if halt:
                mon.close()
                early = early or runguard.StopRun("a training hook on another rank stopped the run")
                early.checkpoint = path
                raise early
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

    def whole_ema(self) -> nn.Module | None:
        """The EMA network whole: itself, or under FSDP2 a plain copy filled from its gathered shards on rank 0
        (collective; None on the other ranks)."""
        if not self.sharded_params or self.ema is None:
            return self.ema
        from .sharded import full_state_dict

        state = full_state_dict(self.ema)
        if dist.rank() != 0:
            return None
        self._ema_whole.load_state_dict(state)
        return self._ema_whole

    def export(self) -> str | None:
        """The method's export of the EMA network on rank 0; returns its path (collective under FSDP2)."""
        ema = self.whole_ema()
        if dist.rank() != 0:
            return None
        out = self.method.export(ema, self.run_dir, self.state.num_images)
        return None if out is None else str(out)


class _EndStep(Exception):
    """A phase's loss was non-finite: its update is skipped, and so are the step's remaining phases."""


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of `module` that require a gradient, each once."""
    return list({id(p): p for p in module.parameters() if p.requires_grad}.values())


__all__ = ["Engine", "EngineSpec", "Phase", "State"]
