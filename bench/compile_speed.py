"""torch.compile on the CPU (`run.compile`): the MNIST preset's training step (SBA(5), batch 64, the shipped
teacher's U-Net for G and psi) eager versus compiled, in one process at one thread, interleaved after warm-up.

    python bench/compile_speed.py [--steps 10] [--warmup 3] [--threads 1] [--out bench/results]

Writes compile_speed.json and .md: seconds per step (median over --steps, after --warmup steps that include the
compilation), the compile time (the warm-up's excess over eager), and the speed-up. Real side: a pool of teacher
samples (no data needed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dibregman.config import override  # noqa: E402
from dibregman.loop import Trainer  # noqa: E402
from dibregman.monitor import Monitor  # noqa: E402
from dibregman.presets import get_preset  # noqa: E402


def trainer(compiled: bool, folder: Path) -> Trainer:
    pairs = {
        "run.compile": compiled, "model.real": "teacher", "model.teacher_pool": 64, "model.teacher_pool_steps": 2,
        "run.tensorboard": False, "run.sample_every_kimg": 0.0, "loss.gen_warmup_kimg": 0.0,
    }  # fmt: skip
    return Trainer(override(get_preset("mnist"), pairs), folder / str(compiled))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ts = {c: trainer(c, Path(tmp)) for c in (False, True)}
        mons = {c: Monitor(Path(tmp), enabled=False, initial=0, total=1) for c in ts}
        warm = {c: 0.0 for c in ts}
        for c in ts:
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                ts[c].step(mons[c])
            warm[c] = time.perf_counter() - t0
        times = {c: [] for c in ts}
        for _ in range(args.steps):
            for c in (False, True):  # interleaved: both see the same machine load
                t0 = time.perf_counter()
                ts[c].step(mons[c])
                times[c].append(time.perf_counter() - t0)
    eager, comp = statistics.median(times[False]), statistics.median(times[True])
    out = {
        "command": "bench/compile_speed.py " + " ".join(argv or sys.argv[1:]),
        "torch": torch.__version__, "threads": args.threads, "batch": 64, "steps": args.steps,
        "eager_sec_per_step": eager, "compiled_sec_per_step": comp, "speedup": eager / comp,
        "compile_sec": warm[True] - warm[False], "times": {str(k): v for k, v in times.items()},
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_speed.json").write_text(json.dumps(out, indent=1) + "\n")
    md = [
        "# torch.compile on the CPU (run.compile)", "",
        f"MNIST preset training step (batch 64, SBA(5)), {args.threads} thread(s), torch {torch.__version__}, median "
        f"of {args.steps} interleaved steps after {args.warmup} warm-up steps.", "",
        "| | s/step |", "|---|---|", f"| eager | {eager:.3f} |", f"| compiled | {comp:.3f} |", "",
        f"Speed-up {eager / comp:.2f}x; compilation took {out['compile_sec']:.0f} s (once per process). "
        f"Command: `python {out['command']}`.",
    ]  # fmt: skip
    (args.out / "compile_speed.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return out


if __name__ == "__main__":
    main()
