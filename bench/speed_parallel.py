"""Step time and peak GPU memory of one Algorithm 1 step with SD1.5- and SDXL-sized UNets under FSDP2 (issue 32),
next to `dibregman plan`'s estimate for the same setting.

    python bench/speed_parallel.py --parallel fsdp [--sizes sd15,sdxl] [--batch 1] [--steps 3] [--warmup 1]
                                   [--checkpointing both|on|off] [--offload auto|on|off] [--budget-sec 270]
    python bench/speed.py --parallel fsdp [the same flags]      (speed.py hands --parallel over to this script)
    python bench/speed_parallel.py --parallel fsdp --quick      (CPU, gloo, a tiny UNet: a smoke run of seconds)
    torchrun --nproc_per_node N bench/speed_parallel.py ...     (N ranks, one GPU each; rank 0 writes)

Networks: random-weight UNet2DConditionModel at the published SD1.5 / SDXL configurations (`plan_models`; speed and
memory do not depend on the weights), zero text embeddings of the published shapes: the teacher frozen in bf16, the
generator G and the fake score psi with fp32 masters, a linear head on psi's bottleneck, an EMA of G, foreach AdamW.
One step = the critic round then the generator round of `loop.Trainer` (bench/plan_check.py `Step`: psi's DSM +
Eq. 5's BCE; G(z), the guided teacher and psi at x_t without gradient, Eq. 4's surrogate, the GAN term; clip, AdamW,
EMA). --parallel fsdp: `fully_shard` on every ResnetBlock2D / BasicTransformerBlock, then on each UNet and the head,
with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), the teacher sharded for inference; --parallel none:
bf16 autocast, as the loop runs today. AdamW and the gradient clip run tensor by tensor under fsdp (foreach kernels
elsewhere): in torch 2.13 the first foreach step over N DTensors spends time growing faster than N in sharding
propagation (measured on the CPU: 4.7 s for 200 tensors, 47.5 s for 800; a UNet has about 1,700), so the plan's
foreach step scratch is an upper bound there. One process is world size 1 through a local process group (nccl on CUDA,
gloo on the CPU): the sharding is trivial but every all-gather, reduce-scatter and mixed-precision cast runs.
--offload auto turns FSDP2's CPUOffloadPolicy on for G and psi where the plan says the setting does not fit the GPU
without it. Measured: the median step time after the warm-up steps and `torch.cuda.max_memory_allocated` over the
timed steps (on the CPU: time only). A run that would start after --budget-sec is skipped and says so; an
out-of-memory error is recorded with the plan's estimate. Writes `<out>/parallel_speed[_quick].json` and `.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import plan_check  # noqa: E402
from dibregman import plan as planner  # noqa: E402
from dibregman import plan_models as pm  # noqa: E402
from dibregman.config import override  # noqa: E402
from dibregman.presets import PRESETS  # noqa: E402

NAME = "parallel_speed"  # result files: not speed_*.json, which run_all.py renders as bench/speed.py's variants
GIB = 2**30


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parallel", default="fsdp", choices=("none", "fsdp"), help="how G, psi and the teacher are held")
    p.add_argument("--sizes", default=None, help="comma-separated: sd15,sdxl (default; --quick: tiny)")
    p.add_argument("--batch", type=int, default=None, help="samples per rank and step (default 1; --quick 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 3; --quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1)")
    p.add_argument("--checkpointing", default="both", choices=("off", "on", "both"), help="activation checkpointing")
    p.add_argument("--offload", default="auto", choices=("auto", "on", "off"), help="FSDP2 CPUOffloadPolicy for G, psi")
    p.add_argument("--budget-sec", type=float, default=240.0, help="start no run after this many seconds")
    return common.add_common_args(p)


# ---- process group and FSDP2 -------------------------------------------------------------------------------
def init_group(device: torch.device) -> bool:
    """A process group: torchrun's (env://), else a local one of world size 1; True if this call made it."""
    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ:
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
        return True
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return True


def fsdp_prepare(offload: bool):
    """Step's `prepare`: FSDP2 on every unit and each UNet (G and psi optionally offloaded), the teacher sharded."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)

    def shard(net: torch.nn.Module, off: bool) -> None:
        policy = CPUOffloadPolicy() if off else OffloadPolicy()
        for unit in pm.units(net):
            fully_shard(unit, mp_policy=mp, offload_policy=policy)
        fully_shard(net, mp_policy=mp, offload_policy=policy)

    def prepare(step: plan_check.Step) -> None:
        shard(step.gen.denoiser.net, offload)
        shard(step.fake.net, offload)
        shard(step.teacher.net, False)
        fully_shard(
            step.psi_eta.disc.linear, mp_policy=mp, offload_policy=CPUOffloadPolicy() if offload else OffloadPolicy()
        )

    return prepare


# ---- one measured setting ----------------------------------------------------------------------------------
def arch_of(size: str, device: torch.device) -> pm.Arch:
    with torch.device(device):
        return plan_check.tiny("unet") if size == "tiny" else pm.published(size, encoders=False)


def estimate(size: str, mode: str, ckpt: bool, batch: int, world: int, gpu_gib: float) -> planner.Plan:
    with torch.device("meta"):
        meta = arch_of(size, torch.device("meta"))
    cfg = override(PRESETS["sd15"], {"optim.batch_size": batch * world, "optim.accum_steps": 1, "optim.bf16": True,
                                     "model.teacher_bf16": True, "model.grad_checkpointing": ckpt})  # fmt: skip
    return planner.plan_arch(size, meta, cfg, gpus=world, gpu_mem_gib=gpu_gib, parallel=mode)


def run_one(args, size: str, ckpt: bool, device: torch.device, sizes: dict) -> dict:
    world, mode, cuda = dist.get_world_size(), args.parallel, device.type == "cuda"
    row = {"size": size, "checkpointing": ckpt, "mode": mode, "world": world, "batch_per_rank": sizes["batch"]}
    offload = args.offload == "on" and mode == "fsdp" and cuda
    if cuda:  # the plan's estimate of this setting (and whether it fits without offloading)
        gpu_gib = torch.cuda.get_device_properties(device).total_memory / GIB
        plan = estimate(size, mode, ckpt, sizes["batch"], world, gpu_gib)
        offload = offload or (args.offload == "auto" and mode == "fsdp" and not plan.fits(mode, ckpt, False))
        row.update(params=plan.counts.generator, estimate_gib=plan.total(mode, ckpt, offload) / GIB,
                   estimate_phase=plan.rows[(mode, ckpt, offload)]["phase"])  # fmt: skip
        if mode == "none" and not plan.fits(mode, ckpt, False):
            return {**row, "status": f"skipped: the plan's {row['estimate_gib']:.1f} GiB exceeds {gpu_gib:.0f} GiB"}
    row["offload"] = offload
    cfg = override(PRESETS["sd15"], {"optim.batch_size": sizes["batch"], "model.fake_lora_rank": 0})
    bf16 = device.type == "cuda" or mode == "none"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if mode == "none" else contextlib.nullcontext
    torch.manual_seed(args.seed)
    try:
        step = plan_check.Step(arch_of(size, device), cfg, ckpt, prepare=fsdp_prepare(offload) if mode == "fsdp"
                               else None, autocast=autocast, device=device,
                               teacher_dtype=torch.bfloat16 if bf16 else torch.float32,
                               foreach=mode != "fsdp")  # fmt: skip
        for _ in range(sizes["warmup"]):
            step.critic()
            step.generator()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(sizes["steps"]):
            common.sync(device)
            t = time.perf_counter()
            step.critic()
            step.generator()
            common.sync(device)
            times.append(time.perf_counter() - t)
        row["sharded"] = isinstance(next(step.gen.parameters()), DTensor)  # fully_shard made G's weights DTensors
    except torch.OutOfMemoryError as e:
        return {**row, "status": f"out of memory: {str(e).splitlines()[0][:160]}"}
    finally:
        step = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row.update(status="ok", times_sec=times, median_sec=statistics.median(times))
    row["img_per_sec"] = sizes["batch"] * world / row["median_sec"]
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        row["reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
        row["measured_over_estimate"] = row["peak_gib"] / row["estimate_gib"]
    return row


def run(args) -> dict:
    device = common.setup(args)
    made = init_group(device)
    rank, t0 = dist.get_rank(), time.time()
    sizes = {
        "sizes": (args.sizes or ("tiny" if args.quick else "sd15,sdxl")).split(","),
        "batch": args.batch or (2 if args.quick else 1),
        "steps": args.steps or (2 if args.quick else 3),
        "warmup": args.warmup if args.warmup is not None else 1,
    }
    unknown = set(sizes["sizes"]) - {"tiny", "sd15", "sdxl", "sd3", "flux"}
    if unknown:
        raise ValueError(f"unknown --sizes {sorted(unknown)}; valid: tiny, sd15, sdxl, sd3, flux")
    name = NAME + ("_quick" if args.quick else "")
    data = common.record(name, args, device, sizes)
    data["rows"] = []
    try:
        for size in sizes["sizes"]:
            for ckpt in {"off": (False,), "on": (True,), "both": (False, True)}[args.checkpointing]:
                late = torch.tensor([float(time.time() - t0 > args.budget_sec)], device=device)
                dist.all_reduce(late, op=dist.ReduceOp.MAX)  # every rank skips, or none
                if late.item():
                    data["rows"].append({"size": size, "checkpointing": ckpt, "status": "skipped: time budget"})
                    continue
                data["rows"].append(run_one(args, size, ckpt, device, sizes))
                r = data["rows"][-1]
                if rank == 0:
                    speed = f", {r['median_sec']:.3f} s/step" if "median_sec" in r else ""
                    print(f"[{NAME}] {size} AC {'on' if ckpt else 'off'}: {r['status']}{speed}", flush=True)
    finally:
        if made:
            dist.destroy_process_group()
    if rank != 0:
        return data
    common.finish(data, args.out)
    (args.out / f"{name}.md").write_text(render(data))
    return data


def render(d: dict) -> str:
    f = common.fmt
    head = ["network", "params", "AC", "parallel", "ranks", "batch/rank", "offload", "s/step (median)", "images/s",
            "peak GiB (max allocated)", "plan GiB", "peak / plan", "status"]  # fmt: skip
    rows = [[r["size"], planner.fmt_count(r["params"]) if "params" in r else "", "on" if r["checkpointing"] else "off",
             r.get("mode", ""), r.get("world", ""), r.get("batch_per_rank", ""), r.get("offload", ""),
             f(r.get("median_sec"), 4), f(r.get("img_per_sec"), 3), f(r.get("peak_gib"), 4),
             f(r.get("estimate_gib"), 4), f(r.get("measured_over_estimate"), 3), r["status"]]
            for r in d["rows"]]  # fmt: skip
    return "\n".join([f"## One Algorithm 1 step under {d['rows'][0].get('mode', '?') if d['rows'] else '?'}: time "
                      "and peak memory", "", common.header_line(d), "", *common.table(head, rows), ""])  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    return run(common.parse(build_parser(), argv, "speed_parallel"))  # the command line names this script


if __name__ == "__main__":
    main(sys.argv[1:])
