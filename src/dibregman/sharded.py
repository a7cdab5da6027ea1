"""Sharded checkpoints of multi-process runs (`run.parallel` ddp/fsdp): `torch.distributed.checkpoint` (DCP).

A checkpoint is a folder `ckpt-<images>/`: every rank writes its own shards (DCP's `.distcp` files and
`.metadata`), rank 0 adds `meta.pt` -- the counters, config, RNG, healthy flag and a SHA-256 over every other
file of the folder -- written with `checkpoint.save_atomic`. The folder is built as `.ckpt-<images>.tmp` and
renamed once complete, so a kill -9 during a save leaves only a temp folder (removed at the next start) and the
previous checkpoint intact. Loading verifies the files against `meta.pt`'s checksum first.

DCP reshards on load, so a run resumes exactly on another number of processes, and a single process (or
`dibregman export`) reads a sharded checkpoint too. The state is taken with `get_state_dict` / `set_state_dict`
(parameter-name keys for the optimiser states), which treat plain, DDP and FSDP2 modules alike.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import dist
from .checkpoint import FILES_KEY, META, files_checksum


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(state: dict, meta: dict, path: str | os.PathLike) -> Path:
    """Every rank: write `state` (nested dicts of tensors / DTensors) into the folder `path` with DCP; rank 0 adds
    `meta` (+ the files' checksum) and renames the temp folder into place. Collective."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if dist.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.initialized())
    dist.barrier()
    if dist.rank() == 0:
        ckpt.save_atomic({**meta, FILES_KEY: files_checksum(tmp)}, tmp / META)
        _fsync_dir(tmp)
        if path.exists():  # the same images seen again (a resumed run that re-saves): replace the old one
            old = path.with_name(f".{path.name}.old.tmp")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    dist.barrier()
    return path


def load(state: dict, path: str | os.PathLike) -> None:
    """Fill `state` (the current model's nested state dicts, any world size) in place from the folder."""
    import torch.distributed.checkpoint as dcp

    dcp.load(state, checkpoint_id=str(path), no_dist=not dist.initialized())


def remove(path: str | os.PathLike) -> None:
    shutil.rmtree(path, ignore_errors=True)


def model_and_optim_state(module: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """{"model", "optim"} of one trained network, parameter-name keyed (plain, DDP-inner or FSDP2 module)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = get_state_dict(module, [opt])
    return {"model": model, "optim": optim}


def set_model_and_optim_state(module: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict

    set_state_dict(module, [opt], model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_state_dict(module: torch.nn.Module) -> dict:
    """The module's whole state dict on rank 0's CPU (gathered from the shards under FSDP2; collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


__all__ = ["full_state_dict", "load", "remove", "save"]
