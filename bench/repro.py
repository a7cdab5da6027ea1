"""One prepared command for the quality pipeline on a GPU: the MNIST teacher, the converged distillation with the
recipe, the Figure-4 sweep and the GMM sweep, at S x the CPU sizes, then every report from their JSON.

    python bench/repro.py --scale 20 --device cuda --out runs/repro-s20   # about 10 min on one H100/H200 (below)
    python bench/repro.py --quick --out /tmp/repro                        # the whole pipeline, tiny, on the CPU

Stages, in this order; every one resumes, so after an interruption run the same command again:
  teacher  `train_teacher` (the Python API of `dibregman train-teacher`) on MNIST with the 24-channel U-Net and
           lr 1.5e-3 of bench/tuning/teacher_v2.md, TEACHER_KIMG x S kimg -> OUT/teacher/teacher-ema.safetensors
           (`--teacher SPEC` skips it and distils that teacher instead)
  distill  reverse KL with the MNIST recipe (mnist_sweep.RECIPE), one seed, DISTILL_KIMG x S kimg:
           `mnist_sweep.py --objectives rkl` -> OUT/distill/ (JSON, PNG, BENCHMARKS.md)
  figure4  `mnist_sweep.py`: all eight objectives, 2 seeds, FIGURE4_KIMG x S kimg per run -> OUT/results/; with
           --procs P > 1 (default 4 on CUDA) as P processes with disjoint --only lists, then `--collect`
  gmm      `gmm_sweep.py`: gmm:ring8 and gmm:ring8-uneven, 3 seeds, GMM_KIMG x S kimg per run -> OUT/results/. On
           CUDA it runs on the CPU cores (MLPs of 2-D points gain nothing from the GPU) in a background process
           with --gmm-workers workers, started first, beside the three GPU stages
  report   OUT/results/BENCHMARKS.md and OUT/results/verdict.md from the JSON, `dibregman compare` of the
           Figure-4 runs (OUT/results/compare_figure4.png / .md), OUT/repro.json (per stage: wall time, images)
Evaluation sizes do not scale: final FID and classifier score at n = 2000, in-loop at n = 500, teacher Heun 35.

Why these sizes fit 10 minutes at --scale 20 (an estimate; repro.json measures it on the first GPU run). CPU,
measured (one core): a distillation step of batch 64 takes 1.25 s with the shipped 16-channel teacher (speed.json:
51 img/s) and 1.6 s with the 24-channel one (on a core shared with other jobs); that teacher trains at 147 img/s
(teacher_v2.md); a GMM step of batch 512 takes 78 ms and the GMM MLP pretraining 71 s. So --scale 1 takes about 40
min on one CPU core, the GMM sweep (15 min) included. GPU: speed_cifar10.json measures the 55.7 M-parameter
CIFAR-10 distillation step on an H100 at 0.478 s per 256 images; with torch's FlopCounterMode (42.4 GFLOP per
forward, 10.2 forward-equivalents per distilled image) that is 231 TFLOP/s. At that rate an MNIST step (2.7 GFLOP
per image with 24 channels) would take 0.74 ms per 64 images, but it launches 13.1 k aten operations (counted with
a TorchDispatchMode; 3.0 k per teacher step of 128, 1.7 k per GMM step): eager PyTorch spends 5-10 us of host time
per operation, so these small nets are host-bound on any GPU. With the conservative 10 us:
  teacher  600 kimg = 4.7 k steps x 30 ms                                              ~ 140 s
  distill  70 kimg = 1.1 k steps x 131 ms                                              ~ 145 s
  figure4  7 distinct objectives x 2 seeds x 30 kimg (fkl = sba(lam=-1) trains once) = 6.6 k steps x 131 ms
           = 860 s in one process; in 4 (host-bound: each keeps the GPU < 15 % busy) at most 4 runs each ~ 250 s
  evaluations, teacher rows, process starts                                             ~ 60 s
  = about 595 s on the GPU (about 310 s at 5 us per operation); beside it, on 11 of the 16 CPU cores
  gmm      42 runs x 800 kimg: 6 pretrainings (71 s, in parallel), then 4 rounds of 1.56 k steps x 78 ms ~ 580 s
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import sweeprun  # noqa: E402

TEACHER_KIMG, DISTILL_KIMG, FIGURE4_KIMG, GMM_KIMG = 30.0, 3.5, 1.5, 40.0  # x --scale
N_FID, N_FID_LOOP = 2000, 500  # not scaled
STAGES = ("teacher", "distill", "figure4", "gmm", "report")
QUICK_FIGURE4 = "rkl,sba(lam=5),sba(lam=-1),fkl"  # --quick: an alias pair and a weighted objective
QUICK_GMM = "rkl,sba(lam=5)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/repro", help="everything goes here (results/, teacher/, work/, ...)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every training length (1 = the CPU sizes)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to train")
    p.add_argument("--quick", action="store_true", help="every stage at tiny sizes (CPU, seconds; numbers meaningless)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0, help="first seed of every sweep")
    p.add_argument("--teacher", default="", help="distil this teacher spec instead of training one")
    p.add_argument("--procs", type=int, default=None, help="Figure-4 processes (default: 4 on CUDA, 1 on CPU)")
    p.add_argument("--gmm-workers", type=int, default=None, help="GMM CPU workers (default: cores - procs - 1 on CUDA)")
    p.add_argument("--skip", default="", help=f"comma-separated stages to leave out, of {list(STAGES)}")
    return p


def plan(args) -> dict:
    """Sizes of every stage and where each runs."""
    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    procs = 4 if cuda else 1
    cores = os.cpu_count() or 1
    s = args.scale
    return {
        "device": "cuda" if cuda else "cpu",
        "teacher_kimg": 0.256 if args.quick else TEACHER_KIMG * s,  # quick: 2 steps of 128
        "distill_kimg": None if args.quick else DISTILL_KIMG * s,  # None: the sweeps' own --quick sizes
        "figure4_kimg": None if args.quick else FIGURE4_KIMG * s,
        "gmm_kimg": None if args.quick else GMM_KIMG * s,
        "procs": args.procs or (1 if args.quick else procs),
        "gmm_background": cuda and not args.quick,
        "gmm_workers": args.gmm_workers or (max(1, cores - (args.procs or procs) - 1) if cuda else 1),
    }


def common_argv(args, p: dict, out: Path, work: Path) -> list[str]:
    argv = ["--out", str(out), "--work", str(work), "--seed", str(args.seed), "--device", p["device"]]
    argv += ["--threads", str(args.threads)]
    return argv + (["--quick"] if args.quick else [])


def mnist_argv(args, teacher: str, kimg: float) -> list[str]:
    argv = ["--teacher", teacher, "--n-inception", "0"]
    if args.quick:
        return argv
    sizes = ["--kimg", kimg, "--fid-every-kimg", kimg / 10, "--n-fid", N_FID, "--n-fid-loop", N_FID_LOOP]
    return argv + [str(x) for x in sizes]


def train_teacher_stage(args, p: dict, out: Path) -> dict:
    """The MNIST teacher (teacher_v2.md's U-Net and lr) in OUT/teacher-<kimg>kimg (a length of its own folder: the
    cosine schedule depends on it)."""
    from dibregman.train_teacher import teacher_config, train_teacher

    data = "mnist:data/mnist" if common.mnist_available() else "digits:"  # digits: a fresh checkout's smoke run
    kimg = p["teacher_kimg"]
    if args.quick:
        opts = dict(unet="tiny", ckpt_every_kimg=0.128)
    else:
        opts = dict(unet_overrides={"model_channels": 24}, ckpt_every_kimg=max(kimg / 20, 1.0))
    cfg = teacher_config(
        "mnist", data=data, lr=1.5e-3, total_kimg=kimg, threads=args.threads, device=p["device"], keep_ckpts=2,
        **opts,
    )  # fmt: skip
    export = train_teacher(cfg, out / f"teacher-{kimg:g}kimg")
    return {"spec": f"edm:{export}", "images": int(kimg * 1000), "data": data}


def distill_stage(args, p: dict, out: Path, teacher: str) -> dict:
    import mnist_sweep

    argv = common_argv(args, p, out / "distill", out / "work") + mnist_argv(args, teacher, p["distill_kimg"])
    d = mnist_sweep.main(argv + ["--objectives", "rkl", "--seeds", "1"])
    _report_folder(out / "distill")
    row = d["summary"][0] if d["summary"] else {}
    return {"images": row.get("images_seen"), "final_fid": row.get("final_fid"), "teacher": d["teacher_scores"]}


def figure4_stage(args, p: dict, out: Path, teacher: str) -> dict:
    import mnist_sweep

    argv = common_argv(args, p, out / "results", out / "work") + mnist_argv(args, teacher, p["figure4_kimg"])
    objectives = QUICK_FIGURE4 if args.quick else ""
    argv += ["--objectives", objectives] if objectives else []
    if p["procs"] > 1:  # disjoint --only lists in parallel processes, then one process collects
        specs = sweeprun.select(list(sweeprun.FIGURE4), objectives)
        alias = sweeprun.identical_weights(specs)
        labels = [s[0] for s in specs if s[0] not in alias]  # each distinct objective once
        parts = [",".join(labels[i :: p["procs"]]) for i in range(min(p["procs"], len(labels)))]
        script = str(common.ROOT / "bench" / "mnist_sweep.py")
        logs = [out / "logs" / f"figure4-{i}.log" for i in range(len(parts))]
        _wait([_spawn([script, *argv, "--only", part], log) for part, log in zip(parts, logs, strict=True)], "figure4")
        argv = argv + ["--collect"]
    d = mnist_sweep.main(argv)
    return {"runs": len(d["runs"]), "missing": len(d["missing"]), "images": sum(r["images_seen"] for r in d["runs"])}


def gmm_argv(args, p: dict, out: Path) -> list[str]:
    argv = common_argv(args, p, out / "results", out / "work")
    argv[argv.index("--device") + 1] = "cpu"  # MLPs of 2-D points: the CPU cores (see the module docstring)
    argv[argv.index("--threads") + 1] = "1"
    if args.quick:
        return argv + ["--seeds", "2", "--only", QUICK_GMM]
    return argv + ["--kimg", str(p["gmm_kimg"]), "--workers", str(p["gmm_workers"])]


def gmm_stage(args, p: dict, out: Path, background=None) -> dict:
    import gmm_sweep

    argv = gmm_argv(args, p, out)
    if background is not None:
        _wait([background], "gmm")
        argv = argv + ["--collect"]
    d = gmm_sweep.main(argv)
    return {"runs": len(d["runs"]), "missing": len(d["missing"]), "images": sum(r["images_seen"] for r in d["runs"])}


def report_stage(out: Path) -> dict:
    import verdict
    from dibregman.compare import compare

    results = out / "results"
    bench_md = _report_folder(results)
    verdict.main(["--results", str(results), "--out", str(results / "verdict.md")])
    d = json.loads((results / "mnist_sweep.json").read_text())
    runs = [r["run_dir"] for r in d["runs"] if not r.get("alias_of")]
    cmp = compare(runs, results / "compare_figure4", fid="fid_mnist") if runs else {}
    return {"benchmarks": str(bench_md), "verdict": str(results / "verdict.md"), "compare": cmp.get("md")}


def _report_folder(folder: Path) -> Path:
    import run_all

    return run_all.write_report(folder)


def _spawn(argv: list[str], log: Path) -> tuple[subprocess.Popen, Path]:
    """A bench script in its own process (the environment and PYTHONPATH of this one), output into `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    f = open(log, "ab")  # the child writes it; closed when this process exits
    path = [str(common.ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]  # this checkout's package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    proc = subprocess.Popen([sys.executable, *argv], stdout=f, stderr=subprocess.STDOUT, cwd=common.ROOT, env=env)
    return proc, log


def _wait(procs: list, stage: str) -> None:
    failed = [str(log) for proc, log in procs if proc.wait() != 0]
    if failed:
        raise RuntimeError(f"{stage}: a process failed, see {failed}; rerun the same command to resume")


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if skip - set(STAGES):
        raise ValueError(f"--skip {sorted(skip - set(STAGES))}: valid stages are {list(STAGES)}")
    if "teacher" in skip and not args.teacher:
        raise ValueError("--skip teacher needs --teacher SPEC (the teacher to distil)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.teacher = sweeprun.absolute_spec(args.teacher) if args.teacher else ""
    os.chdir(common.ROOT)  # the presets name data/ and assets/ relatively
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = plan(args)
    record = {**_record(args, argv, p), "stages": {}}
    background = None
    if p["gmm_background"] and "gmm" not in skip:
        script = str(common.ROOT / "bench" / "gmm_sweep.py")
        background = _spawn([script, *gmm_argv(args, p, out)], out / "logs" / "gmm.log")
    teacher = args.teacher
    steps = [
        ("teacher", lambda: train_teacher_stage(args, p, out)),
        ("distill", lambda: distill_stage(args, p, out, teacher)),
        ("figure4", lambda: figure4_stage(args, p, out, teacher)),
        ("gmm", lambda: gmm_stage(args, p, out, background)),
        ("report", lambda: report_stage(out)),
    ]
    for name, fn in steps:
        if name in skip or (name == "teacher" and args.teacher):
            continue
        t0 = time.time()
        record["stages"][name] = {**fn(), "wall_sec": round(time.time() - t0, 1)}
        teacher = teacher or record["stages"]["teacher"]["spec"]
        common.write_json(out / "repro.json", {k: v for k, v in record.items() if k != "_t0"})
        print(f"[repro] {name}: {record['stages'][name]['wall_sec']} s", flush=True)
    record["wall_sec"] = round(time.time() - record.pop("_t0"), 1)
    common.write_json(out / "repro.json", record)
    return record


def _record(args, argv, p: dict) -> dict:
    """The header of repro.json: machine, commit, command, the plan (common.record's fields)."""
    import torch

    command = " ".join(["bench/repro.py", *(sys.argv[1:] if argv is None else argv)])
    ns = argparse.Namespace(quick=args.quick, scale=args.scale, seed=args.seed, command=command)
    return common.record("repro", ns, torch.device(p["device"]), p)


if __name__ == "__main__":
    main(sys.argv[1:])
