"""Speed and memory, all in one process on one machine: one-step student (1 evaluation) versus the
teacher's Heun sampler (35 evaluations) in images/s, and the Di-Bregman training step (SBA lambda=5, default
stabiliser) versus the reverse-KL step, interleaved (A B B A ...) so that both see the same machine load.

    python bench/speed.py [--n-student 2048] [--n-teacher 256] [--repeats 3] [--steps 20] [--batch 64]
    python bench/speed.py --preset cifar10 --device cuda [--set optim.bf16=false --tag fp32]
    python bench/speed.py --parallel fsdp [...]   (SD1.5/SDXL-sized UNets under FSDP2: bench/speed_parallel.py)

`--preset cifar10` measures the CIFAR-10-sized DDPM++ teacher (55.7 M parameters, 32x32x3) of that preset; where
its file is missing, a randomly initialised network of the same architecture stands in (speed and memory do not
depend on the weights; the JSON says which it was), and the real side is a small pool of that teacher's samples
when the CIFAR-10 folder is missing. Results go to `speed.json` (mnist) or `speed_<preset>[_<tag>].json`.

Goals (issue 5): student >= 30x the teacher's images/s; Di-Bregman step <= 1.05x the reverse-KL step.
Memory: CUDA `max_memory_allocated` per phase on a GPU. On a CPU, the peak resident set size of the whole
process (`resource.getrusage(RUSAGE_SELF).ru_maxrss`): it includes everything already loaded (torch, MNIST,
all networks); Linux lets us reset its high-water mark through /proc/self/clear_refs, so each phase
reports its own peak ("phase"); where that fails the number is the process's lifetime peak ("process
lifetime").
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import common
from dibregman import checkpoint as ckpt
from dibregman.config import DistillConfig, override, parse_set
from dibregman.generators import generate
from dibregman.loop import Trainer
from dibregman.monitor import Monitor
from dibregman.networks.generator import OneStepGenerator
from dibregman.networks.unet import build_unet
from dibregman.presets import get_preset
from dibregman.sample import count_evaluations, sample_teacher

NAME = "speed"
TITLE = "Speed and memory"
GOAL_SPEEDUP = 30.0  # student images/s over teacher (Heun 35) images/s, at least
GOAL_STEP_RATIO = 1.05  # Di-Bregman step time over reverse-KL step time, at most
TEACHER_STEPS = 18  # Heun intervals: 2 * 18 - 1 = 35 evaluations (EDM's setting)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-student", type=int, default=None, help="student images per repeat (2048 x scale)")
    p.add_argument("--n-teacher", type=int, default=None, help="teacher images per repeat (256 x scale)")
    p.add_argument("--sample-batch", type=int, default=256, help="images per network call when sampling")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats of each sampler (median; 3)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per objective (20 x scale)")
    p.add_argument("--warmup", type=int, default=None, help="untimed training steps per objective first (2)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default: the preset's)")
    p.add_argument("--preset", default="mnist", choices=("mnist", "cifar10"), help="whose teacher and settings")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (both runs)")
    p.add_argument("--tag", default="", help="suffix of the result's name: speed_<preset>_<tag>.json")
    p.add_argument("--parallel", choices=("none", "fsdp"), help="SD-sized UNets under FSDP2: bench/speed_parallel.py")
    return common.add_common_args(p)


# ---- memory ------------------------------------------------------------------------------------------------
def reset_peak(device: torch.device) -> bool:
    """Start a new per-phase peak; False where the OS does not allow it (then only ru_maxrss is reported)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: reset VmHWM to the current RSS
        return True
    except OSError:
        return False


def peak(device: torch.device, phase_reset: bool) -> dict:
    """Peak memory of the phase: CUDA max allocated, or the peak RSS of the whole process (ru_maxrss; Linux
    reads it from the high-water mark that clear_refs resets: it covers this phase when the reset worked)."""
    if device.type == "cuda":
        return {"kind": "cuda_max_memory_allocated", "mib": torch.cuda.max_memory_allocated(device) / 2**20}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return {"kind": "cpu_peak_rss", "mib": rss, "scope": "phase" if phase_reset else "process lifetime"}


# ---- sampling speed ----------------------------------------------------------------------------------------
def timed(fn, device, repeats: int) -> list[float]:
    fn()  # warm-up (allocations, kernels, lazy init)
    times = []
    for _ in range(repeats):
        common.sync(device)
        t = time.perf_counter()
        fn()
        common.sync(device)
        times.append(time.perf_counter() - t)
    return times


@torch.no_grad()
def sampling(args, sizes, trainer, device) -> dict:
    teacher = trainer.m.teacher
    student = copy.deepcopy(trainer.ema).to(device)  # speed does not depend on the weights, only on the network
    assert isinstance(student, OneStepGenerator)
    out = {}
    for name, n, fn in (
        (
            "student",
            sizes["n_student"],
            lambda: generate(student, sizes["n_student"], seed=1, batch_size=args.sample_batch, device=device),
        ),
        (
            "teacher",
            sizes["n_teacher"],
            lambda: sample_teacher(
                teacher,
                sizes["n_teacher"],
                num_steps=TEACHER_STEPS,
                batch_size=args.sample_batch,
                generator=torch.Generator(device).manual_seed(1),
            ),
        ),
    ):
        reset = reset_peak(device)
        times = timed(fn, device, sizes["repeats"])
        out[name] = {
            "n": n,
            "times_sec": times,
            "img_per_sec": n / statistics.median(times),
            "memory": peak(device, reset),
        }
    out["student"]["evaluations"] = 1
    out["teacher"]["evaluations"] = count_evaluations(TEACHER_STEPS, "heun")
    out["speedup"] = out["student"]["img_per_sec"] / out["teacher"]["img_per_sec"]
    out["goal_speedup"] = GOAL_SPEEDUP
    out["meets_goal"] = out["speedup"] >= GOAL_SPEEDUP
    return out


# ---- training-step speed -----------------------------------------------------------------------------------
def base_config(args, work: Path) -> tuple[DistillConfig, str]:
    """The preset with the overrides this machine needs; returns (config, what the teacher's weights are)."""
    cfg = get_preset(args.preset)
    pairs, weights = {}, "trained (the preset's file)"
    if args.preset == "mnist" and not common.mnist_available():
        if not args.quick:
            raise FileNotFoundError("data/mnist is missing: run `make data`")
        pairs = {"model.real": "teacher", "model.teacher_pool": 64, "model.teacher_pool_steps": 2}
    if args.preset == "cifar10":
        teacher = Path(cfg.model.teacher.partition(":")[2])
        if not teacher.is_file():  # same architecture, random weights: speed and memory do not depend on them
            torch.manual_seed(args.seed)
            net = build_unet("tiny" if args.quick else "cifar10")
            path = work / "random_cifar10_teacher.safetensors"
            ckpt.export_safetensors(net.state_dict(), {"kind": "edm-unet", "unet": net.cfg.to_dict()}, path)
            pairs["model.teacher"] = f"edm:{path}"
            size = sum(p.numel() for p in net.parameters())
            weights = f"random initialisation ({teacher} is not present), {size} parameters"
        if not Path(cfg.model.real.partition(":")[2]).is_dir():
            pairs.update({"model.real": "teacher", "model.teacher_pool": 256, "model.teacher_pool_steps": 2})
    return override(cfg, {**pairs, **parse_set(args.set)}), weights


def trainers(args, sizes, device, work: Path) -> tuple[dict, str]:
    base, weights = base_config(args, work)
    out = {}
    for label, name in (("di-bregman sba(lam=5)", "sba"), ("reverse kl", "rkl")):
        cfg = override(
            base,
            {
                "divergence.name": name,
                "divergence.lam": 5.0,
                "run.seed": args.seed,
                "optim.batch_size": args.batch or base.optim.batch_size,
                "run.tensorboard": False,
                "run.device": device.type,
                "run.threads": args.threads,
            },
        )
        out[label] = Trainer(cfg, work / name)
    return out, weights


def step_times(args, sizes, device, work: Path) -> tuple[dict, Trainer]:
    ts, weights = trainers(args, sizes, device, work)
    mons = {k: Monitor(t.run_dir, t.cfg, enabled=False, initial=0, total=1) for k, t in ts.items()}
    a, b = list(ts)
    for _ in range(sizes["warmup"]):
        for k in (a, b):
            ts[k].step(mons[k])
    times = {a: [], b: []}
    for i in range(sizes["steps"]):
        for k in (a, b) if i % 2 == 0 else (b, a):  # A B, B A, ...: neither always runs first
            common.sync(device)
            t = time.perf_counter()
            ts[k].step(mons[k])
            common.sync(device)
            times[k].append(time.perf_counter() - t)
    res = {
        k: {
            "median_sec": statistics.median(v),
            "mean_sec": statistics.fmean(v),
            "times_sec": v,
            "batch": ts[k].cfg.optim.batch_size,
            "divergence": ts[k].cfg.divergence.name,
            "stabiliser": {kk: vv for kk, vv in ts[k].cfg.divergence.__dict__.items() if kk != "name"},
        }
        for k, v in times.items()
    }
    res["objectives"] = [a, b]
    res["teacher_weights"] = weights
    res["bf16"] = ts[a].cfg.optim.bf16 and device.type == "cuda"
    res["ratio_median"] = res[a]["median_sec"] / res[b]["median_sec"]
    res["ratio_mean"] = res[a]["mean_sec"] / res[b]["mean_sec"]
    res["goal_ratio"] = GOAL_STEP_RATIO
    res["meets_goal"] = res["ratio_median"] <= GOAL_STEP_RATIO
    res["memory"] = {}
    for k in (a, b):  # separately, one objective at a time, so that each phase's peak is its own
        reset = reset_peak(device)
        for _ in range(max(2, sizes["warmup"])):
            ts[k].step(mons[k])
        res["memory"][k] = peak(device, reset)
    return res, ts[a]


def run(args) -> dict:
    device = common.setup(args)
    sizes = {
        "n_student": common.size(args, "n_student", 2048, 16),
        "n_teacher": common.size(args, "n_teacher", 256, 4),
        "sample_batch": args.sample_batch,
        "repeats": args.repeats or (1 if args.quick else 3),
        "steps": common.size(args, "steps", 20, 2),
        "warmup": args.warmup if args.warmup is not None else (1 if args.quick else 2),
    }
    name = NAME if args.preset == "mnist" and not args.tag else "_".join(filter(None, (NAME, args.preset, args.tag)))
    data = common.record(name, args, device, sizes)
    with tempfile.TemporaryDirectory(dir=args.work if args.work.exists() else None) as tmp:
        print(f"[{NAME}] training steps: {sizes['steps']} interleaved per objective", flush=True)
        data["train_step"], trainer = step_times(args, sizes, device, Path(tmp))
        print(
            f"[{NAME}] sampling: student {sizes['n_student']} / teacher {sizes['n_teacher']} images",
            flush=True,
        )
        data["sampling"] = sampling(args, sizes, trainer, device)
        data["teacher"] = common.teacher_info(trainer.cfg.model.teacher)
        data["teacher"]["weights"] = data["train_step"]["teacher_weights"]
        data["preset"] = args.preset
        data["sizes"]["train_batch"] = trainer.cfg.optim.batch_size
    s, t = data["sampling"], data["train_step"]
    print(
        f"[{NAME}] speed-up {s['speedup']:.1f}x (goal >= {GOAL_SPEEDUP}x); "
        f"step ratio {t['ratio_median']:.3f} "
        f"(goal <= {GOAL_STEP_RATIO})",
        flush=True,
    )
    common.finish(data, args.out)
    return data


def _mem(m: dict) -> str:
    if m["kind"] == "cuda_max_memory_allocated":
        return f"{common.fmt(m['mib'], 4)} MiB (CUDA max allocated)"
    return f"{common.fmt(m['mib'], 4)} MiB (CPU: peak RSS of the whole process, {m['scope']})"


def title(d: dict) -> str:
    preset = d.get("preset", "mnist")
    if preset == "mnist" and d["benchmark"] == NAME:
        return TITLE
    extra = ", bf16 autocast" if d["train_step"].get("bf16") else ""
    return f"{TITLE}: {preset} ({d['machine'].get('gpu', d['machine']['device'])}{extra})"


def render(d: dict, all_data: dict) -> str:
    f, s, t = common.fmt, d["sampling"], d["train_step"]
    a, b = t["objectives"]
    ok = {True: "yes", False: "**no**"}
    rows = [
        [
            f"one-step student ({s['student']['evaluations']} evaluation)",
            s["student"]["n"],
            f(s["student"]["img_per_sec"], 4),
            _mem(s["student"]["memory"]),
        ],
        [
            f"teacher, Heun ({s['teacher']['evaluations']} evaluations)",
            s["teacher"]["n"],
            f(s["teacher"]["img_per_sec"], 4),
            _mem(s["teacher"]["memory"]),
        ],
    ]
    steps = [
        [
            k,
            t[k]["batch"],
            f(t[k]["median_sec"], 4),
            f(t[k]["mean_sec"], 4),
            f(t[k]["batch"] / t[k]["median_sec"], 4),
            len(t[k]["times_sec"]),
            _mem(t["memory"][k]),
        ]
        for k in (a, b)
    ]
    lines = [
        f"## {title(d)}",
        "",
        common.header_line(d),
        "",
        f"Teacher `{d['teacher']['path']}` (sha256 {d['teacher'].get('sha256')}; weights: "
        f"{d['teacher'].get('weights', 'trained')}). Sampling batch "
        f"{d['sizes']['sample_batch']}; each rate is the median of {d['sizes']['repeats']} timed repeats "
        "after "
        f"one warm-up. Training steps: {d['sizes']['warmup']} untimed warm-up steps per objective, then "
        f"{d['sizes']['steps']} timed steps each, interleaved A B, B A, ...; memory measured afterwards, one "
        "objective at a time.",
        "",
        *common.table(["sampler", "images per repeat", "images/s", "peak memory"], rows),
        "",
        f"Student speed-up: **{f(s['speedup'], 4)}x** (goal ≥ {f(s['goal_speedup'])}x: {ok[s['meets_goal']]}).",
        "",
        *common.table(
            [
                "training step (same process, interleaved)",
                "batch",
                "median s",
                "mean s",
                "images/s (median)",
                "steps",
                "peak memory",
            ],
            steps,
        ),
        "",
        f"Di-Bregman / reverse-KL step time: **{f(t['ratio_median'], 4)}** "
        f"(median; mean {f(t['ratio_mean'], 4)}; "
        f"goal ≤ {f(t['goal_ratio'])}: {ok[t['meets_goal']]}).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--parallel" or a.startswith("--parallel=") for a in argv):  # its own flags: speed_parallel --help
        import speed_parallel

        return speed_parallel.main(argv)
    return run(common.parse(build_parser(), argv, NAME))


if __name__ == "__main__":
    main(sys.argv[1:])
