"""Few-step students (issue 34): MNIST 1-, 2- and 4-step students of the shipped teacher at equal training images,
for both training inputs (`loss.student_inputs`: backward_sim, noised_data) and `--seeds` seeds, scored like the
objective sweep -- FID with the MNIST feature net (n = --n-fid) and Inception FID (n = --n-inception) against the
whole 10k MNIST test set, as `teacher_quality.py` scores the teacher -- with each K's sampling speed and a
quality-versus-steps plot beside the teacher's FID-versus-NFE curve (`teacher_quality.json`); and the GMM exact
teachers with the same K, where mode coverage is counted exactly (`gmm_sweep.py`'s metrics).

    python bench/fewstep.py [--steps 1,2,4] [--inputs backward_sim,noised_data] [--seeds 2] [--kimg 150]
                            [--n-fid 2000] [--n-inception 2000] [--speed-n 512] [--no-gmm] [--no-mnist]
                            [--gmm-teachers gmm:ring8,gmm:ring8-uneven] [--gmm-kimg K] [--gmm-seeds 2]
                            [--set KEY=VALUE ...] [--gmm-set KEY=VALUE ...] [--collect]

MNIST runs: `mnist_sweep.py`'s config (the `mnist` preset, its RECIPE, the preset's reverse KL) over the whole
sigma range (FULL_RANGE, before --set) plus `model.student_steps = K` and `loss.student_inputs`, trained and
evaluated by `mnist_sweep.train_run` (resumable, in-loop FID at n = --n-fid-loop); then the Inception FID of the
final EMA student against all reference images (kept in the run's result.json). GMM runs: `gmm_sweep.one_run` on
the `gmm` preset with the same keys. K = 1 has no training inputs to choose: it is trained once and shown under
both modes. Every run is a folder under --work (`sweeprun.py`): stop the command and run it again to continue;
`--collect` rebuilds the JSON and plots alone.
Writes `fewstep.json`, `fewstep.md`, `fewstep.png` (MNIST) and `fewstep_gmm.png` into --out.
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import time

import torch

import common
import fewstep_report
import gmm_sweep
import mnist_sweep
import sweeprun
from dibregman.config import parse_set
from dibregman.methods.fewstep import INPUTS
from dibregman.presets import get_preset

NAME = "fewstep"
TITLE = fewstep_report.TITLE
# The MNIST students' generator and critic see every sigma the teacher knows, down to sigma_min: the sweep's RECIPE
# stops the generator at sigma >= 0.085 (gen_t_max 0.8), above the last rungs of a K-step ladder, and leaves a faint
# background noise that costs a one-step student its Inception FID (bench/tuning/results/student_background/).
FULL_RANGE = ["loss.gen_t_max=1.0", "loss.disc_t_max=1.0"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="1,2,4", help="student steps K, comma-separated")
    p.add_argument("--inputs", default=",".join(INPUTS), help=f"training inputs of K > 1, from {list(INPUTS)}")
    p.add_argument("--seeds", "--num-seeds", dest="seeds", type=int, default=2, help="MNIST seeds --seed, ...")
    p.add_argument("--kimg", type=float, default=None, help="MNIST training images per run, thousands (150)")
    p.add_argument("--batch", type=int, default=None, help="MNIST global batch (the preset's, 64)")
    p.add_argument("--teacher", default="", help="MNIST teacher spec (default: the preset's shipped teacher)")
    p.add_argument("--fid-every-kimg", type=float, default=None, help="in-loop FID period (kimg / 30)")
    p.add_argument("--ckpt-every-kimg", type=float, default=None, help="checkpoint period (= the FID period)")
    p.add_argument("--n-fid-loop", type=int, default=None, help="samples per in-loop FID (500)")
    p.add_argument("--n-fid", type=int, default=None, help="samples of the final MNIST-feature FID (2000)")
    p.add_argument("--n-inception", type=int, default=None, help="samples of the Inception FID (2000; 0 off)")
    p.add_argument("--speed-n", type=int, default=None, help="images per sampling-speed row (512)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override of every MNIST run")
    p.add_argument("--no-mnist", action="store_true", help="skip the MNIST students")
    p.add_argument("--no-gmm", action="store_true", help="skip the GMM students")
    p.add_argument("--gmm-teachers", default=",".join(gmm_sweep.TEACHERS), help="gmm: specs, comma-separated")
    p.add_argument("--gmm-kimg", type=float, default=None, help="GMM kimg per run (the preset's 2000)")
    p.add_argument("--gmm-batch", type=int, default=None, help="GMM global batch (the preset's 512)")
    p.add_argument("--gmm-seeds", type=int, default=2, help="GMM seeds --seed, ...")
    p.add_argument("--gmm-n-eval", type=int, default=None, help="GMM samples of the exact metrics (4000)")
    p.add_argument("--gmm-set", action="append", default=[], metavar="KEY=VALUE", help="override of every GMM run")
    p.add_argument("--collect", action="store_true", help="train nothing: rebuild JSON and PNGs from finished runs")
    return common.add_common_args(p)


def settings(args) -> list[tuple[str, int, str]]:
    """(label, K, training input) of every setting; K = 1 once (it has no inputs to choose)."""
    steps = sorted({int(k) for k in args.steps.split(",") if k.strip()})
    inputs = [x.strip() for x in args.inputs.split(",") if x.strip()]
    bad = [x for x in inputs if x not in INPUTS] + [k for k in steps if k < 1]
    if bad or not steps or not inputs:
        raise ValueError(f"--steps/--inputs: {bad or 'empty'} not valid; K >= 1, inputs from {list(INPUTS)}")
    out = []
    for k in steps:
        out += [("k1", 1, inputs[0])] if k == 1 else [(f"k{k}-{m}", k, m) for m in inputs]
    return out


def with_student(args, work, k: int, mode: str, sets: list[str], **extra):
    """A copy of `args` for the reused sweep functions: the student keys appended to its --set, its own --work."""
    a = copy.copy(args)
    a.set = [*sets, f"model.student_steps={k}", f"loss.student_inputs={mode}"]
    a.work, a.until_kimg = work, None
    for key, value in extra.items():
        setattr(a, key, value)
    return a


# ---- MNIST -------------------------------------------------------------------------------------------------------
def mnist_sets(args) -> list[str]:
    """The --set of every MNIST run, for training and for collecting alike: FULL_RANGE, then the user's --set."""
    return [*FULL_RANGE, *args.set]


def mnist_sizes(args) -> dict:
    a = copy.copy(args)
    a.teacher_nfe = 0  # the teacher's numbers come from teacher_quality.json
    a.n_inception = 0  # the sweep's own Inception row uses a reference subset; ours uses all of it (below)
    sizes = mnist_sweep.sizes_of(a)
    args.batch = a.batch
    sizes["n_inception_full"] = common.size(args, "n_inception", 2000, 0)
    sizes["speed_n"] = common.size(args, "speed_n", 512, 8)
    return sizes


def mnist_part(args, device, sizes: dict) -> dict:
    specs, real = settings(args), mnist_sweep.real_side(args)
    work = args.work / NAME
    sets = mnist_sets(args)
    cfg0 = mnist_sweep.make_config(with_student(args, work, 1, INPUTS[0], sets), "rkl", {}, args.seed, sizes, real)
    sizes["batch"] = cfg0.optim.batch_size
    teacher = common.teacher_info(cfg0.model.teacher)
    sha, ctx = teacher.get("sha256"), None
    if not args.collect:
        ctx = {**mnist_sweep.context(args, sizes, device, cfg0), "real": real, "teacher_sha": sha}
        ctx["inception_net"] = inception_net(sizes, device, ctx)
        for label, k, mode in specs:
            for seed in sizes["seeds"]:
                a = with_student(args, work, k, mode, sets)
                result = mnist_sweep.train_run(a, (label, "rkl", {}), seed, sizes, ctx)
                if result is not None and ctx["inception_net"] is not None:
                    add_inception(a, label, seed, sizes, ctx, result)
    runs, missing = collect_mnist(args, work, specs, sizes, real, sha)
    recipe = {**mnist_sweep.RECIPE, **parse_set(FULL_RANGE)}
    return {"teacher": teacher, "preset": cfg0.to_dict(), "recipe": recipe, "runs": runs,
            "missing": missing, "reference": mnist_sweep.REFERENCE if real == "mnist" else "teacher samples",
            "speed": None if args.collect else sampling_speed(cfg0, sorted({s[1] for s in specs}), sizes, device),
            "inception_skipped": (ctx or {}).get("inception_skipped")}  # fmt: skip


def inception_net(sizes: dict, device, ctx: dict):
    if sizes["n_inception_full"] < 4:
        return None
    from dibregman.metrics.features import get_feature_net

    try:
        return get_feature_net("inception", device)
    except FileNotFoundError as e:
        ctx["inception_skipped"] = str(e)
        return None


def add_inception(a, label: str, seed: int, sizes: dict, ctx: dict, result: dict) -> None:
    """Inception FID of the final EMA student (its export) at n = n_inception_full against the whole reference,
    the samples of the MNIST-feature FID (`mnist_sweep.final_metrics`: seed 20000 + seed); kept in result.json."""
    rd = sweeprun.run_folder(a.work / mnist_sweep.NAME, sizes, label, seed)
    if sweeprun.add_inception_full(rd, result, sizes["n_inception_full"], ctx):
        print(f"[{NAME}] {label} seed {seed}: Inception FID {result['final']['inception_full']['fid']:.2f}", flush=True)


def collect_mnist(args, work, specs, sizes, real, sha) -> tuple[list, list]:
    eval_sizes = {"n_fid": sizes["n_fid"], "n_inception": 0}
    runs, missing = [], []
    for label, k, mode in specs:
        for seed in sizes["seeds"]:
            a = with_student(args, work, k, mode, mnist_sets(args))
            cfg = mnist_sweep.make_config(a, "rkl", {}, seed, sizes, real)
            r = sweeprun.read_result(sweeprun.run_folder(work / mnist_sweep.NAME, sizes, label, seed))
            problem = sweeprun.result_problem(r, cfg, eval_sizes, sha)
            if problem:
                missing.append({"label": label, "seed": seed, "why": problem})
                continue
            runs.append({**{k_: v for k_, v in r.items() if k_ != "config"}, "steps_k": k, "inputs": mode,
                         "sigmas": _ladder(r["config"])})  # fmt: skip
    return runs, missing


def _ladder(config: dict) -> list[float]:
    """The ladder a run trained on (from its config; the family default needs the teacher's kind)."""
    from dibregman.config import DistillConfig
    from dibregman.ladder import resolve_ladder

    m = DistillConfig.from_dict(config).model
    return list(resolve_ladder(m.student_steps, m.sigma_init, m.student_sigmas, flow=_is_flow(m.teacher)))


@functools.cache
def _is_flow(spec: str) -> bool:
    from dibregman.ladder import is_flow_teacher
    from dibregman.teachers import load_teacher

    return is_flow_teacher(load_teacher(spec))


@torch.no_grad()
def sampling_speed(cfg, steps: list[int], sizes: dict, device) -> list[dict]:
    """Images per second of K-step sampling (a student is K calls of the teacher's network) and of the teacher's
    Heun sampler at 35 evaluations, same machine, batch min(256, n), after a warm-up batch (the time of a K-step
    chain does not depend on its rungs: the EDM default ladder stands for every ladder)."""
    from dibregman.generators import generate
    from dibregman.ladder import edm_ladder
    from dibregman.networks.student import Student
    from dibregman.sample import sample_teacher
    from dibregman.teachers import load_teacher

    net = load_teacher(cfg.model.teacher).to(device).eval()
    n, rows = sizes["speed_n"], []
    for k in steps:
        gen = Student(net, edm_ladder(k, cfg.model.sigma_init))
        generate(gen, min(8, n), seed=0, device=device)  # warm-up
        common.sync(device)
        t = time.perf_counter()
        generate(gen, n, seed=1, batch_size=min(256, n), device=device)
        common.sync(device)
        rows.append({"sampler": f"student-{k}", "nfe": k, "n": n, "img_per_sec": n / (time.perf_counter() - t)})
    m = max(1, n // 8)  # 35 evaluations per image: fewer images
    sample_teacher(net, min(4, m), num_steps=2)  # warm-up
    common.sync(device)
    t = time.perf_counter()
    sample_teacher(net, m, num_steps=18, batch_size=min(256, m), generator=torch.Generator().manual_seed(0))
    common.sync(device)
    rows.append({"sampler": "teacher heun", "nfe": 35, "n": m, "img_per_sec": m / (time.perf_counter() - t)})
    return rows


# ---- GMM ---------------------------------------------------------------------------------------------------------
def gmm_sizes(args, device) -> dict:
    if args.quick:
        args.gmm_batch = args.gmm_batch or 64
    preset = get_preset("gmm")
    return {
        "kimg": args.gmm_kimg or (2 * args.gmm_batch / 1000 if args.quick else preset.run.total_kimg * args.scale),
        "n_eval": args.gmm_n_eval or (64 if args.quick else round(4000 * args.scale)),
        "n_curve": 32 if args.quick else 2000,
        "seeds": list(range(args.seed, args.seed + args.gmm_seeds)),
        "device": device.type,
        "batch": args.gmm_batch or preset.optim.batch_size,
    }


def gmm_part(args, sizes: dict) -> dict:
    specs, name = settings(args), get_preset("gmm").divergence.name  # the preset's objective
    teachers = [t.strip() for t in args.gmm_teachers.split(",") if t.strip()]
    work = args.work / NAME
    gmm_sweep.PRETRAIN_DIR[0] = work / gmm_sweep.NAME / "pretrain"
    runs, missing = [], []
    for teacher in teachers:
        for label, k, mode in specs:
            for seed in sizes["seeds"]:
                a = with_student(args, work, k, mode, args.gmm_set, batch=args.gmm_batch)
                job = (teacher, (label, name, {}), seed)
                if not args.collect:
                    gmm_sweep.one_run(a, job, sizes)
                cfg = gmm_sweep.make_config(a, teacher, name, {}, seed, sizes)
                r = sweeprun.read_result(gmm_sweep.run_folder(a, sizes, teacher, label, seed))
                problem = sweeprun.result_problem(r, cfg, {"n_eval": sizes["n_eval"], "n_curve": sizes["n_curve"]})
                if problem:
                    missing.append({"teacher": teacher, "label": label, "seed": seed, "why": problem})
                    continue
                runs.append({**{k_: v for k_, v in r.items() if k_ != "config"}, "steps_k": k, "inputs": mode,
                             "sigmas": _ladder(r["config"])})  # fmt: skip
    cfg0 = gmm_sweep.make_config(with_student(args, work, 1, INPUTS[0], args.gmm_set), teachers[0], name, {}, 0, sizes)
    return {"teachers": teachers, "divergence": name, "preset": cfg0.to_dict(), "runs": runs, "missing": missing}


# ---- the benchmark -------------------------------------------------------------------------------------------
def run(args) -> dict:
    args.teacher = sweeprun.absolute_spec(args.teacher) if args.teacher else ""
    device = common.setup(args)
    args.device_type = device.type
    specs, sizes = settings(args), {}
    if not args.no_mnist:
        sizes["mnist"] = mnist_sizes(args)
    if not args.no_gmm:
        sizes["gmm"] = gmm_sizes(args, device)
    data = common.record(NAME, args, device, sizes)
    data["settings"] = [{"label": s[0], "steps": s[1], "inputs": s[2]} for s in specs]
    if not args.no_mnist:
        data["mnist"] = mnist_part(args, device, sizes["mnist"])
        data["teacher_curve"] = fewstep_report.teacher_curve(args.out, data["mnist"]["teacher"])
    if not args.no_gmm:
        data["gmm"] = gmm_part(args, sizes["gmm"])
    data["summary"] = fewstep_report.summarise(data)
    data["plots"] = fewstep_report.plot_all(data, args.out)
    common.finish(data, args.out, lambda d: fewstep_report.render(d, {}))
    return data


render = fewstep_report.render


def main(argv: list[str] | None = None) -> dict:
    return run(common.parse(build_parser(), argv, NAME))


if __name__ == "__main__":
    main(sys.argv[1:])
