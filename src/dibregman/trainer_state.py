"""A Trainer's checkpoint: what it holds, how it is written (never with non-finite weights, the healthy flag set,
pruning that keeps the newest healthy one) and how a run resumes from its newest loadable, healthy checkpoint.

Functions of the `loop.Trainer` they are given (`tr`); the loop calls them and knows nothing of the file format.
`preflight` runs before any model is built: every refusal comes before the run folder is touched.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import dist, runguard
from .config import RESUMABLE_CHANGES, DistillConfig, config_diff


def state_dict(tr) -> dict:
    """Everything a bitwise-exact resume needs: networks, EMA, optimisers, counters, RNG, config, healthy flag."""
    s = tr.state
    return {
        "generator": tr.m.generator.state_dict(),
        "ema": tr.ema.state_dict(),
        "fake": tr.m.fake.state_dict(),
        "disc": tr.m.disc.state_dict(),
        "opt_g": tr.opt_g.state_dict(),
        "opt_c": tr.opt_c.state_dict(),
        "config": tr.cfg.to_dict(),
        "step": s.step,
        "num_images": s.num_images,
        "bad_steps": s.bad_steps,
        "bad_in_row": s.bad_in_row,
        ckpt.HEALTHY_KEY: s.bad_in_row == 0,  # weights are finite: save() writes nothing otherwise
        "rng_cpu": torch.get_rng_state(),
        **({"reward_z": tr.target.state_dict()} if tr.target else {}),
    }


def preflight(tr) -> tuple[dict, Path] | None:
    """Everything a run refuses, checked before any model is built or file written (a refusal leaves the folder as it
    found it): a world size that does not divide the micro-batch, a folder another process holds, a read-only folder,
    another kind of run's folder, a checkpoint written by another config. Returns the newest loadable, healthy
    checkpoint (state, path) for `resume`, or None."""
    o, w = tr.cfg.optim, dist.world_size()
    if (o.batch_size // o.accum_steps) % w:
        raise ValueError(
            f"the global micro-batch of {o.batch_size // o.accum_steps} images (optim.batch_size / optim.accum_steps) "
            f"does not split over world size {w}: use a multiple of {w} (torchrun --nproc_per_node)"
        )
    if dist.rank() == 0:  # another process on this folder: stop before reading it
        runguard.RunLock(tr.run_dir).probe()
    runguard.check_writable(tr.run_dir)
    _refuse_teacher_folder(tr.run_dir)
    tr._newest_ckpt = (ckpt.list_checkpoints(tr.run_dir) or [None])[-1]
    found = ckpt.load_latest(tr.run_dir, check=weights_problem)
    if found is None:
        return None
    state, path = found
    if "generator" not in state:
        by = " (train-teacher wrote it)" if "net" in state else ""
        raise ValueError(f"{path} is not a distillation checkpoint{by}; give distill a run folder of its own")
    try:  # sections/keys added since the checkpoint was written take their defaults
        old = DistillConfig.from_dict(state["config"]).to_dict()
    except ValueError:
        old = state["config"]
    diff = config_diff(old, tr.cfg.to_dict())
    if "run.total_kimg" in diff and tr.cfg.optim.lr_schedule != "constant":
        raise ValueError(
            f"{path}: run.total_kimg differs from the checkpoint's, and the {tr.cfg.optim.lr_schedule} "
            "lr schedule is a function of it; keep run.total_kimg or use lr_schedule=constant"
        )
    diff -= RESUMABLE_CHANGES
    if diff:
        raise ValueError(
            f"{path} was written by a different config (differs in {sorted(diff)}); "
            f"use another --run-dir or the same settings"
        )
    return found


def _refuse_teacher_folder(run_dir: Path) -> None:
    """ValueError if run_dir's config.json is a teacher run's (`train-teacher` writes one with a `teacher` section)."""
    try:
        config = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):  # none, or unreadable: a distillation rewrites it
        return
    if isinstance(config, dict) and "teacher" in config and "model" not in config:
        raise ValueError(
            f"{run_dir} is a train-teacher run folder (its config.json has a 'teacher' section); "
            "give distill a run folder of its own"
        )


def resume(tr, found: tuple[dict, Path] | None) -> None:
    """Load the checkpoint `preflight` found into tr (nothing for None)."""
    if found is None:
        return
    state, path = found
    try:
        for name, module in (
            ("generator", tr.m.generator),
            ("ema", tr.ema),
            ("fake", tr.m.fake),
            ("disc", tr.m.disc),
        ):
            module.load_state_dict(state[name])
        tr.opt_g.load_state_dict(state["opt_g"])
        tr.opt_c.load_state_dict(state["opt_c"])
        if tr.target is not None:
            tr.target.load_state_dict(state["reward_z"])
    except (RuntimeError, KeyError) as e:
        raise ValueError(f"{path} does not match this model: {e}") from e
    s = tr.state
    s.step, s.num_images, s.bad_steps, s.bad_in_row = (
        state["step"],
        state["num_images"],
        state["bad_steps"],
        state["bad_in_row"],
    )
    torch.set_rng_state(state["rng_cpu"])
    dist.print0(f"resumed from {path} at {s.num_images / 1000:.1f} kimg (step {s.step})")


def save(tr) -> Path | None:
    """Checkpoint (rank 0), unless the weights are non-finite: a bad state never replaces a good one."""
    path = None
    if dist.rank() == 0:
        state = tr._state_dict()
        problem = weights_problem(state)
        if problem:
            print(f"warning: no checkpoint at step {tr.state.step}: the model {problem}", flush=True)
        else:
            path = ckpt.save_atomic(state, ckpt.checkpoint_path(tr.run_dir, tr.state.num_images))
            ckpt.prune(tr.run_dir, tr.cfg.run.keep_ckpts)
            tr._newest_ckpt = ckpt.list_checkpoints(tr.run_dir)[-1]
    dist.barrier()
    return path


def weights_problem(state: dict) -> str | None:
    """Why a checkpoint's networks cannot be used (non-finite weights), or None."""
    if not ckpt.all_finite(*(state.get(k, {}) for k in ("generator", "ema", "fake", "disc"))):
        return "has non-finite weights"
    return None
