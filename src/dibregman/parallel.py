"""Data parallelism through PyTorch's own engines (`run.parallel`), for the networks a method trains:

- `ddp`: `DistributedDataParallel` -- bucketed gradient all-reduce overlapped with the backward pass; the
  gradient accumulation's earlier micro-batches run under `no_sync` (one reduction per step).
- `fsdp`: FSDP2 `fully_shard` -- parameters, gradients and optimiser states sharded over the ranks, with a
  mixed-precision policy (`MixedPrecisionPolicy`: bf16 parameters in compute on CUDA, fp32 reduction), and
  `set_requires_gradient_sync(False)` during accumulation.
- `none`: one process (or `auto` with a world size of 1).

Both engines average gradients over ranks; a method's loss is normalised by the *global* batch, so the engine
multiplies each rank's loss by the world size before backward, and W processes equal one process.
A teacher family names its blocks (`TeacherFamily.parallelize`): FSDP2 shards them one unit each, and
activation checkpointing (`run.activation_checkpointing`) recomputes them in the backward pass; a family without
blocks is one unit. `run.cpu_offload` keeps FSDP2's parameters, gradients and optimiser states on the CPU.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from . import dist

MODES = ("auto", "none", "ddp", "fsdp")


def resolve(mode: str) -> str:
    """The mode to use at this world size: `auto` is ddp under torchrun (W > 1), none otherwise."""
    if mode not in MODES:
        raise ValueError(f"run.parallel={mode!r} is not valid; choose one of {list(MODES)}")
    w = dist.world_size()
    if mode == "auto":
        return "ddp" if w > 1 else "none"
    if mode == "none" and w > 1:
        raise ValueError(
            f"run.parallel=none with {w} processes would train {w} unsynchronised replicas; use ddp, fsdp or auto"
        )
    return mode


def _ddp(module: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # every trainable parameter gets a gradient in each phase's backward: no unused-parameter search
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def _fsdp(module: nn.Module, device: torch.device, blocks=(), *, train: bool = True, offload: bool = False):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.world_size(),))
    bf16 = train and device.type == "cuda"
    kw = dict(
        mesh=mesh,
        mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32),
        offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy(),
    )
    for block in blocks:  # the family's blocks first (`TeacherFamily.parallelize`), one unit each
        fully_shard(block, **kw)
    return fully_shard(module, **kw)


def shard(module: nn.Module, device: torch.device, blocks=()) -> nn.Module:
    """FSDP2-shard a network that is not trained (the EMA) the way `wrap` shards its source, in float32."""
    return _fsdp(module, device, blocks, train=False)


_RECOMPUTE = {"on": True}  # off inside `keep_activations`


def checkpoint_blocks(blocks) -> None:
    """Activation checkpointing: each block's activations are recomputed in the backward pass instead of kept
    (`torch.utils.checkpoint`, non-reentrant); parameter names are unchanged."""
    from torch.utils.checkpoint import checkpoint

    def run(f, *a, **k):
        if _RECOMPUTE["on"] and torch.is_grad_enabled():
            return checkpoint(f, *a, use_reentrant=False, **k)
        return f(*a, **k)

    for block in blocks:
        block.forward = functools.partial(run, block.forward)


@contextlib.contextmanager
def keep_activations(module: nn.Module | None = None):
    """Blocks run without recomputation here -- ours (`checkpoint_blocks`) and diffusers' own
    (`gradient_checkpointing` flags inside `module`): for a forward whose parameters are swapped for constants
    (`torch.func.functional_call`), which a recomputation in the backward pass would not see."""
    flagged = [m for m in (module.modules() if module is not None else ()) if getattr(m, "gradient_checkpointing", 0)]
    before, _RECOMPUTE["on"] = _RECOMPUTE["on"], False
    for m in flagged:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        _RECOMPUTE["on"] = before
        for m in flagged:
            m.gradient_checkpointing = True


def wrap(
    trainable: dict[str, nn.Module], mode: str, device: torch.device, blocks: dict | None = None, offload=False
) -> dict[str, nn.Module]:
    """The trainable networks by phase name, wrapped for a `resolve`d mode ({} for none); blocks: the FSDP2 units
    per phase; offload: parameters, gradients and optimiser states on the CPU (FSDP2 only)."""
    if offload and mode != "fsdp":
        raise ValueError(f"run.cpu_offload needs run.parallel=fsdp (got {mode})")
    if mode == "none":
        return {}
    if mode == "ddp":
        return {name: _ddp(module, device) for name, module in trainable.items()}
    blocks = blocks or {}
    return {name: _fsdp(m, device, blocks.get(name, ()), offload=offload) for name, m in trainable.items()}


def no_sync(wrapped: nn.Module | None, *, last: bool):
    """Skip the gradient reduction of a micro-batch that is not the step's last (DDP's `no_sync`, FSDP2's
    `set_requires_gradient_sync`)."""
    if wrapped is None or last:
        if wrapped is not None and hasattr(wrapped, "set_requires_gradient_sync"):
            wrapped.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    wrapped.set_requires_gradient_sync(False)
    return contextlib.nullcontext()


__all__ = ["MODES", "checkpoint_blocks", "keep_activations", "no_sync", "resolve", "shard", "wrap"]
