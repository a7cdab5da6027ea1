"""Process-group helpers for `torchrun` (one node or many): rank, world size, print0, barrier, and the few
collectives of metrics and flags (gradients are reduced by DDP/FSDP2, `parallel.py`). Gloo on CPU, NCCL on
CUDA. With a single process every helper is a no-op.
"""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist


def init(device: str = "auto") -> torch.device:
    """Initialise the process group when launched by torchrun; returns this rank's device.

    `device` is run.device (auto | cpu | cuda): NCCL and one GPU per rank (LOCAL_RANK) on CUDA, gloo on CPU,
    also on a machine that has GPUs when run.device=cpu.
    """
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("run.device=cuda but CUDA is not available")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda and local >= torch.cuda.device_count():
        raise ValueError(
            f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA device(s) are visible: start at most "
            "that many processes per node (torchrun --nproc_per_node), or train on CPU with --set run.device=cpu"
        )
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def initialized() -> bool:
    """True inside a torchrun process group."""
    return dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def print0(*args, **kwargs) -> None:
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equally-sized tensors from all ranks along dim 0 (rank order)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum_(t: torch.Tensor) -> None:
    """In-place sum over ranks of one tensor (metric counts; gradients are reduced by DDP/FSDP2)."""
    if world_size() > 1:
        dist.all_reduce(t)


def all_reduce_max_(t: torch.Tensor) -> None:
    """In-place maximum over ranks of one tensor (flags: a stop signal, a non-finite value)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)


def destroy() -> None:
    """End the process group while the interpreter is fully alive. The run's objects (FSDP2 state, DTensors, gloo
    work handles) sit in reference cycles; collected only at interpreter exit, a gloo worker thread could still
    own one, and its teardown aborts the process ("terminate called without an active exception") after a run
    that succeeded. So: collect them now, let every rank arrive, then destroy the group."""
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()
