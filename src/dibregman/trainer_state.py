"""An engine's checkpoint: what it holds, how it is written (never with non-finite weights or optimiser state, the
healthy flag set, pruning that keeps the newest healthy one) and how a run resumes from its newest healthy
checkpoint (or, when none is healthy, its newest loadable one).

Two formats, one meaning. A single process writes `ckpt-<images>.pt` (one `torch.save` dict, the format of every
run before the engine existed, so old runs resume). A multi-process run (`run.parallel` ddp/fsdp) writes a sharded
folder `ckpt-<images>/` (`sharded.py`, DCP: each rank its part). Either resumes on any number of processes: a
sharded folder is resharded by DCP, a `.pt` file is read whole by every rank and then placed (sharded under FSDP2).

Functions of the `engine.Engine` they are given (`eng`); a method names what its checkpoint holds:
`networks()` (state-dict key -> module), `optimizer_keys()` (phase -> key), `extra_state()` /
`load_extra_state()`, `config_dict()` and `check_resume(state, path)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import dist, optim, runguard, sharded


def _small_state(eng) -> dict:
    s = eng.state
    out = {
        "config": eng.method.config_dict(),
        "step": s.step,
        "num_images": s.num_images,
        "bad_steps": s.bad_steps,
        "bad_in_row": s.bad_in_row,
        "rng_cpu": torch.get_rng_state(),
        ckpt.HEALTHY_KEY: s.bad_in_row == 0,  # weights are finite: save() writes nothing otherwise
    }
    if eng.device.type == "cuda":
        out["rng_cuda"] = torch.cuda.get_rng_state(eng.device)
    return out


def state_dict(eng) -> dict:
    """Everything a bitwise-exact resume needs (one process): networks, EMA, optimisers, counters, RNG, config."""
    m = eng.method
    out = {k: net.state_dict() for k, net in m.networks().items()}
    if eng.ema is not None:
        out["ema"] = eng.ema.state_dict()
    out.update({key: m.optimizers[phase].state_dict() for phase, key in m.optimizer_keys().items()})
    out.update(_small_state(eng))
    out.update(m.extra_state())
    return out


def sharded_state(eng) -> dict:
    """The state DCP writes and reads: per phase its network and optimiser (parameter-name keys), the EMA, the
    method's extras."""
    m = eng.method
    out = {phase: sharded.model_and_optim_state(net, m.optimizers[phase]) for phase, net in m.trainable().items()}
    if eng.ema is not None:
        out["ema"] = eng.ema.state_dict()
    out["extra"] = m.extra_state()
    return out


def _checker(keys: list[str], *, healthy_only: bool):
    def check(state: dict) -> str | None:
        if healthy_only and not state.get(ckpt.HEALTHY_KEY, True):
            return "was written after a non-finite step (not healthy)"
        return weights_problem(state, keys)

    return check


RUN_KINDS = {"model": "distill", "teacher": "train-teacher"}  # the config section only one command writes -> it


def check_folder(run_dir: Path, kind: str) -> None:
    """The refusals that need no model: a folder another process holds or that cannot be written, and another
    command's folder (`kind`: the config section this command writes), told by its config.json or its newest
    readable checkpoint."""
    run_dir, own = Path(run_dir), RUN_KINDS[kind]
    if dist.rank() == 0:  # another process on this folder: stop before reading it
        runguard.RunLock(run_dir).probe()
    runguard.check_writable(run_dir)

    def other(config) -> str:
        return next((cmd for section, cmd in RUN_KINDS.items() if section in config), "another command")

    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):  # none, or unreadable: rewritten on start
        config = None
    if isinstance(config, dict) and kind not in config:
        raise ValueError(f"{run_dir} is a {other(config)} run folder; give {own} a run folder of its own")
    for path in reversed(ckpt.list_checkpoints(run_dir)):
        state = ckpt.peek(path)  # unverified: only its config is read here
        if isinstance(state, dict):
            saved = state.get("config")
            if not (isinstance(saved, dict) and kind in saved):
                written_by = other(saved if isinstance(saved, dict) else {})
                raise ValueError(f"{path} was written by {written_by}; give {own} a run folder of its own")
            return


def preflight(run_dir: Path, method) -> tuple[tuple[dict, Path] | None, Path | None]:
    """Everything a run refuses, before the method builds a model or anything is written (a refusal leaves the
    folder as it found it): `check_folder` (`method.run_kind`), then a checkpoint written by another config
    (`method.check_resume`). Returns ((state, path) of the newest healthy checkpoint, else of the newest loadable
    one, or None; the newest checkpoint's path)."""
    check_folder(run_dir, method.run_kind)
    keys = method.checkpoint_keys
    found = ckpt.load_latest(run_dir, check=_checker(keys, healthy_only=True))
    if found is None:
        found = ckpt.load_latest(run_dir, check=_checker(keys, healthy_only=False))
    if found is not None:
        method.check_resume(*found)
    return found, (ckpt.list_checkpoints(run_dir) or [None])[-1]


def resume(eng, found: tuple[dict, Path] | None) -> None:
    """Load the checkpoint `preflight` found into eng (nothing for None)."""
    if found is None:
        return
    state, path = found
    try:
        if ckpt.SHARDED_KEY in state:
            target = sharded_state(eng)
            sharded.load(target, path)
            _place_sharded(eng, target)
        else:
            _place_whole(eng, state)
    except (RuntimeError, KeyError) as e:
        raise ValueError(f"{path} does not match this model: {str(e).splitlines()[0]}") from e
    s = eng.state
    s.step, s.num_images = state["step"], state["num_images"]
    s.bad_steps, s.bad_in_row = state.get("bad_steps", 0), state.get("bad_in_row", 0)
    torch.set_rng_state(state["rng_cpu"])
    if "rng_cuda" in state and eng.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng_cuda"], eng.device)
    dist.print0(f"resumed from {path} at {s.num_images / 1000:.1f} kimg (step {s.step})")


def _place_sharded(eng, target: dict) -> None:
    m = eng.method
    for phase, net in m.trainable().items():
        sharded.set_model_and_optim_state(net, m.optimizers[phase], target[phase])
    if eng.ema is not None:
        eng.ema.load_state_dict(target["ema"])
    m.load_extra_state(target["extra"])


def _place_whole(eng, state: dict) -> None:
    """A one-process checkpoint into this run (any world size): as written, or placed into FSDP2's shards."""
    m = eng.method
    if eng.sharded_params:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        whole = StateDictOptions(full_state_dict=True)
        for key, net in m.networks().items():
            set_model_state_dict(net, state[key], options=whole)
        if eng.ema is not None:
            set_model_state_dict(eng.ema, state["ema"], options=whole)
        for phase, key in m.optimizer_keys().items():
            _place_optimizer(m.trainable()[phase], m.optimizers[phase], state[key])
    else:
        for key, net in m.networks().items():
            net.load_state_dict(state[key])
        if eng.ema is not None:
            eng.ema.load_state_dict(state["ema"])
        for phase, key in m.optimizer_keys().items():
            m.optimizers[phase].load_state_dict(state[key])
    m.load_extra_state(state)


def _place_optimizer(module, opt, saved: dict) -> None:
    """A `torch.optim` state dict (index keys, whole tensors) into an optimiser over FSDP2-sharded parameters:
    the indices name parameters in the optimiser's own order, which is the same in every process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): n for n, p in module.named_parameters()}
    order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]
    state = {order[i]: st for i, st in saved["state"].items()}
    whole = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(module, [opt], {"state": state, "param_groups": groups}, options=whole)


def save(eng) -> Path | None:
    """Checkpoint, unless the weights or optimiser states are non-finite (on any rank): a bad state never replaces
    a good one. One process: rank 0 writes a `.pt` file; several: every rank writes its shards. Collective."""
    m = eng.method
    tensors = [p for net in (*m.networks().values(), eng.ema) if net is not None for p in net.parameters()]
    tensors += [v for o in m.optimizers.values() for st in o.state.values() for v in st.values()]
    if not optim.all_finite(t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()):
        dist.print0(f"warning: no checkpoint at step {eng.state.step}: the model has non-finite weights or state")
        return None
    path = ckpt.checkpoint_path(eng.run_dir, eng.state.num_images)
    if dist.world_size() > 1:
        path = sharded.save(sharded_state(eng), _small_state(eng), path.with_suffix(""))
    elif dist.rank() == 0:
        ckpt.save_atomic(state_dict(eng), path)
    if dist.rank() == 0:
        ckpt.prune(eng.run_dir, eng.spec.keep_ckpts)
        eng._newest_ckpt = ckpt.list_checkpoints(eng.run_dir)[-1]
    dist.barrier()
    return path


def weights_problem(state: dict, keys=("generator", "ema", "fake", "disc", "opt_g", "opt_c")) -> str | None:
    """Why a checkpoint's networks or optimiser states cannot be trained on (non-finite values), or None."""
    if not ckpt.all_finite(*(state.get(k, {}) for k in keys)):
        return "has non-finite weights or optimiser state"
    return None
