"""The decisive comparison at larger batch (issue 31, item 7): reverse KL (`rkl`) against SBA(lambda = 5)
(`sba(lam=5)`) on the MNIST teacher at batch 256 and 1024, three seeds each, under two designs:

(a) the paper's design: `mnist_sweep.py --paper-design` (`presets.PAPER_DESIGN` over `mnist_sweep.RECIPE`);
(b) each objective's own best setting of the equal-tuning study, read from `--best FILE` (default
    bench/results/equal_tuning.json, schema `{"best": {"rkl": {"set": {"section.key": value}}, "sba(lam=5)":
    {"set": {...}}}}`, applied over mnist_sweep's default config like its `--set`); without the file, the plain
    recipe (mnist_sweep's default config), labelled "recipe (no tuning file)", and the outputs say so.

For one H100, in at most 10 minutes (the command this script was written for):

    python bench/decisive_gpu.py --device cuda --out bench/results --work /tmp/decisive

NEVER RUN ON A GPU: it was written and tested on a CPU alone (its --quick smoke run); the sizing below is
measured when it runs, not guessed, but the first GPU call is its first real test.

The budget (`--budget-s`, 540 s from the start of `run()`) is met by measurement: a probe trains `--probe-steps`
steps (after a warm-up) of every distinct training config (design x batch, and objective where their configs
differ in more than the divergence) and times one Trainer build, one checkpoint, one in-loop FID and one final
evaluation. Then ONE number of training images is chosen for all 24 runs (2 objectives x 2 batches x 3 seeds x 2
designs): the largest multiple of lcm(batches) x `--points` such that every run's training plus its evaluations
fits PLAN_FRACTION (90 %) of what is left of the budget less REPORT_S for the report (the rest absorbs the
probe's prediction error). Every run sees exactly that many images; the plan is written to
`<work>/decisive_gpu/plan.json` and reused by the next call, so a second call continues the same runs
(`sweeprun.py` folders under --work) instead of planning new ones. A run is started only while its predicted time
still fits the budget; the rest are listed as not finished (run the command again). The GPU machine needs
data/mnist (`make data`) like mnist_sweep.py; `--quick` does not (batches 4 and 8, 2 seeds, one unit of images).

Every run is `mnist_sweep.train_run` (in-loop FID with the MNIST feature net at n = --n-fid-loop, `--points`
points after the initial generator; final FID, KID, precision / recall, classifier score at n = --n-fid = 2000
against the 10k test set; Inception FID at n = --n-inception when asked, 0 = off, and only if it fits the
budget). Writes `decisive_gpu.json`, `decisive_gpu.md` and `decisive_gpu.png` into --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import common
import decisive_gpu_report as report
import mnist_sweep
import sweeprun
from dibregman.config import override, validate

NAME = "decisive_gpu"
TITLE = report.TITLE
OBJECTIVES = tuple(s for s in sweeprun.FIGURE4 if s[0] in ("rkl", "sba(lam=5)"))  # (label, divergence, params)
BEST = common.RESULTS / "equal_tuning.json"
FIXED_KEYS = ("divergence.name", "divergence.lam", "optim.batch_size")  # and run.*: set by this comparison
SMOKE_POOL = ["model.teacher_pool=8", "model.teacher_pool_steps=1"]  # quick without data/mnist: a cheap real side
REPORT_S = 15.0  # seconds of the budget kept for collecting, plotting and writing the outputs
PLAN_FRACTION = 0.9  # the plan fills this share of the time left: the rest absorbs the probe's prediction error


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of this call, seconds (540)")
    p.add_argument("--batches", default=None, help="global batches, comma-separated (256,1024; quick 4,8)")
    p.add_argument("--seeds", "--num-seeds", dest="seeds", type=int, default=None, help="seeds per setting (3)")
    p.add_argument("--best", default=str(BEST), help="the equal-tuning study's JSON (design b)")
    p.add_argument("--points", type=int, default=None, help="in-loop FID points per run after kimg 0 (10; quick 1)")
    p.add_argument("--n-fid-loop", type=int, default=None, help="samples per in-loop FID (500)")
    p.add_argument("--n-fid", type=int, default=None, help="samples of the final MNIST-feature FID (2000)")
    p.add_argument("--n-inception", type=int, default=None, help="samples of the Inception FID (0 = off)")
    p.add_argument("--kimg", type=float, default=None, help="fix the training images per run (thousands): no probe")
    p.add_argument("--max-kimg", type=float, default=None, help="upper bound of the planned images per run")
    p.add_argument("--probe-steps", type=int, default=None, help="timed steps per probed config (10; quick 1)")
    p.add_argument("--teacher", default="", help="teacher spec (default: the mnist preset's shipped teacher)")
    p.add_argument("--replan", action="store_true", help="probe and plan again, ignoring <work>/decisive_gpu/plan.json")
    p.add_argument("--collect", action="store_true", help="train nothing: rebuild the outputs from finished runs")
    return common.add_common_args(p)


def sizes_of(args) -> dict:
    batches = args.batches or ("4,8" if args.quick else "256,1024")
    seeds = args.seeds or (2 if args.quick else 3)
    return {
        "batches": sorted({int(b) for b in batches.split(",") if b.strip()}),
        "seeds": list(range(args.seed, args.seed + seeds)),
        "points": args.points or (1 if args.quick else 10),
        "n_fid_loop": common.size(args, "n_fid_loop", 500, 16),
        "n_fid": common.size(args, "n_fid", 2000, 16),
        "n_inception": args.n_inception or 0,
        "probe_steps": args.probe_steps or (1 if args.quick else 10),
        "budget_s": args.budget_s,
    }


# ---- designs -----------------------------------------------------------------------------------------------------
def designs(path: Path) -> list[dict]:
    """Design (a), the paper's, and design (b), each objective's best setting from `path` (or the plain recipe)."""
    paper = {"key": "paper", "label": "paper design", "paper_design": True, "sets": {s[0]: {} for s in OBJECTIVES}}
    if not path.is_file():
        note = f"no tuning file ({path} not found): design (b) is the plain recipe, mnist_sweep's default config"
        recipe = {"key": "recipe", "label": "recipe (no tuning file)", "paper_design": False, "note": note}
        return [paper, {**recipe, "sets": {s[0]: {} for s in OBJECTIVES}}]
    best = json.loads(path.read_text()).get("best") or {}
    missing = [s[0] for s in OBJECTIVES if not isinstance((best.get(s[0]) or {}).get("set"), dict)]
    if missing:
        raise ValueError(f"{path}: no best[label]['set'] for {missing}; expected {{'best': {{label: {{'set': ...}}}}}}")
    sets = {s[0]: best[s[0]]["set"] for s in OBJECTIVES}
    fixed = sorted({k for st in sets.values() for k in st if k in FIXED_KEYS or k.startswith("run.")})
    note = f"each objective's best setting from {path}" + (f"; ignored (fixed here): {fixed}" if fixed else "")
    return [paper, {"key": "best", "label": "equal-tuning best", "paper_design": False, "sets": sets, "note": note}]


def design_args(args, design: dict, label: str, batch: int):
    """A copy of `args` for the reused sweep functions: the design's keys as --set, its own --work, the batch."""
    a = copy.copy(args)
    a.set = [*args.smoke_set, *(f"{k}={json.dumps(v)}" for k, v in design["sets"][label].items())]
    a.paper_design, a.batch, a.until_kimg = design["paper_design"], batch, None
    a.work = args.work / NAME / design["key"]
    return a


def run_sizes(sizes: dict, kimg: float, batch: int, n_inception: int) -> dict:
    """The sizes `mnist_sweep.train_run` reads, for one batch (a checkpoint at every in-loop FID point)."""
    every = kimg / sizes["points"]
    keep = ("seeds", "n_fid_loop", "n_fid")
    return {"kimg": kimg, "fid_every_kimg": every, "ckpt_every_kimg": every, "batch": batch,
            "n_inception": n_inception, **{k: sizes[k] for k in keep}}  # fmt: skip


def cfg0_sizes(sizes: dict, batch: int) -> dict:
    """Sizes of a config built only to be checked or to name the teacher (its length does not matter)."""
    return run_sizes(sizes, math.lcm(*sizes["batches"]) * sizes["points"] / 1000, batch, 0)


def jobs(sizes: dict, dz: list[dict]):
    """(seed, design, batch, spec) of every run: seeds outermost, so a cut-short call has every setting's first seed."""
    return [(s, d, b, spec) for s in sizes["seeds"] for d in dz for b in sizes["batches"] for spec in OBJECTIVES]


# ---- the plan: one number of images for every run -----------------------------------------------------------------
def plan_images(sec_per_image: list[float], overhead_s: float, seconds: float, unit: int, cap: int | None) -> dict:
    """The images per run N, the same for every run: the largest multiple of `unit` with
    sum_r (overhead_s + N sec_per_image[r]) <= seconds (at least one unit: `over_budget` says when even that does
    not fit), at most `cap` (rounded down to a unit, at least one)."""
    per_image, fixed = sum(sec_per_image), overhead_s * len(sec_per_image)
    n = int(max(0.0, seconds - fixed) / per_image // unit) * unit if per_image > 0 else unit
    over = n < unit
    capped = cap is not None and n > max(unit, cap // unit * unit)
    n = max(unit, n) if not capped else max(unit, cap // unit * unit)
    assert n % unit == 0 and n >= unit, (n, unit)
    return {"images_per_run": n, "predicted_s": fixed + n * per_image, "over_budget": over, "capped": capped}


def config_key(cfg) -> str:
    """A training config without what does not change a step's cost (objective, seed): one probe per key."""
    d = cfg.to_dict()
    for k in ("name", "lam"):
        d["divergence"].pop(k, None)
    d["run"].pop("seed", None)
    return json.dumps(d, sort_keys=True)


def timed(fn, device):
    common.sync(device)
    t = time.perf_counter()
    out = fn()
    common.sync(device)
    return out, time.perf_counter() - t


def probe(args, sizes: dict, dz: list[dict], ctx: dict) -> dict:
    """Seconds per training step of every distinct config (a warm-up step, then `probe_steps` timed) and the
    per-run costs: Trainer build, checkpoint, one in-loop FID, the final evaluation (Inception apart)."""
    from dibregman.generators import generate
    from dibregman.loop import Trainer

    dev, n, seen, steps, builds, first = ctx["device"], sizes["probe_steps"], {}, {}, [], None
    out = {"steps": n, "warmup_steps": 1}
    for d in dz:
        for b in sizes["batches"]:
            for label, name, params in OBJECTIVES:
                a = design_args(args, d, label, b)
                kimg = (n + 2) * b / 1000  # longer than the probe: no log, checkpoint or export inside it
                ps = {"kimg": kimg, "fid_every_kimg": kimg, "ckpt_every_kimg": kimg}
                cfg = mnist_sweep.make_config(a, name, params, args.seed, ps, ctx["real"])
                cfg = override(cfg, {"loss.gen_warmup_kimg": 0.0, "loss.gan_warmup_kimg": 0.0})  # full steps only
                key = config_key(cfg)
                if key not in seen:
                    rd = common.fresh_dir(args.work / NAME / "probe" / str(len(seen)))
                    trainer, t_build = timed(lambda cfg=cfg, rd=rd: Trainer(cfg, rd), dev)
                    trainer.train(max_steps=1)  # warm-up: allocation, kernel selection
                    seen[key] = timed(lambda t=trainer: t.train(max_steps=n), dev)[1] / n
                    builds.append(t_build)
                    first = trainer if first is None else first
                    print(f"[{NAME}] probe {d['key']} batch {b}: {seen[key] * 1000:.1f} ms/step", flush=True)
                steps[f"{d['key']}/b{b}/{label}"] = seen[key] / b  # seconds per image
    trainer = first
    out["build_s"] = statistics.median(builds)
    out["ckpt_s"] = timed(trainer.save, dev)[1]
    loop = lambda: mnist_sweep.loop_metrics(trainer.ema, ctx, sizes["n_fid_loop"], args.seed)  # noqa: E731
    timed(loop, dev)  # warm-up of the feature net
    out["loop_eval_s"] = timed(loop, dev)[1]
    final = lambda c: mnist_sweep.final_metrics(trainer.ema, c, {**sizes, "n_inception": 0}, args.seed)  # noqa: E731
    out["final_eval_s"] = timed(lambda: final({**ctx, "inception": None}), dev)[1]
    out["inception_s"] = 0.0
    if ctx.get("inception") is not None:
        m = sizes["n_inception"]  # as mnist_sweep.final_metrics: the first m samples against m reference images
        x = generate(trainer.ema, m, seed=0, device=dev)
        out["inception_s"] = timed(lambda: common.fid(x, ctx["reference"], ctx["inception"], m, dev), dev)[1]
    shutil.rmtree(args.work / NAME / "probe", ignore_errors=True)
    out["sec_per_image"] = steps
    return out


def overhead(p: dict, points: int, inception: bool) -> float:
    """A run's seconds besides its training steps: build, the in-loop FIDs (kimg 0 and `points`), a checkpoint per
    point and the export, the final evaluation."""
    evals = (points + 1) * (p["loop_eval_s"] + p["ckpt_s"]) + p["final_eval_s"]
    return p["build_s"] + evals + (p["inception_s"] if inception else 0.0)


def make_plan(args, sizes: dict, dz: list[dict], ctx: dict, t0: float) -> dict:
    unit = math.lcm(*sizes["batches"]) * sizes["points"]
    cap = None if args.max_kimg is None else round(args.max_kimg * 1000)
    cap = unit if args.quick and cap is None else cap  # the smoke run: one unit whatever the budget
    p = probe(args, sizes, dz, ctx)
    runs = [p["sec_per_image"][f"{d['key']}/b{b}/{spec[0]}"] for _, d, b, spec in jobs(sizes, dz)]
    left = PLAN_FRACTION * (sizes["budget_s"] - (time.time() - t0) - REPORT_S)
    inception = sizes["n_inception"] >= 4 and ctx.get("inception") is not None
    plan = plan_images(runs, overhead(p, sizes["points"], inception), left, unit, cap)
    dropped = None
    if inception and plan["over_budget"]:  # the Inception FID only where it fits the budget
        dropped = f"Inception FID left out: with it not even {unit} images per run fit the budget"
        inception, plan = False, plan_images(runs, overhead(p, sizes["points"], False), left, unit, cap)
    return {**plan, "source": "measured by this call's probe", "unit": unit, "available_s": left, "probe": p,
            "n_inception": sizes["n_inception"] if inception else 0, "inception_dropped": dropped,
            "overhead_s_per_run": overhead(p, sizes["points"], inception)}  # fmt: skip


def plan_key(args, sizes: dict, dz: list[dict]) -> dict:
    """What a saved plan must match to be reused (its images name the run folders)."""
    keep = ("batches", "seeds", "points", "n_fid_loop", "n_fid", "n_inception")
    return {**{k: sizes[k] for k in keep}, "designs": [[d["key"], d["sets"]] for d in dz],
            "teacher": args.teacher, "quick": bool(args.quick)}  # fmt: skip


def get_plan(args, sizes: dict, dz: list[dict], ctx: dict | None, t0: float) -> dict:
    """--kimg, else the saved plan of an earlier call with the same settings, else a new one (probe + budget)."""
    key, path = plan_key(args, sizes, dz), args.work / NAME / "plan.json"
    if args.kimg is not None:
        n = round(args.kimg * 1000)
        unit = math.lcm(*sizes["batches"]) * sizes["points"]
        if n % unit:
            raise ValueError(f"--kimg {args.kimg:g}: {n} images is not a multiple of lcm(batches) x points = {unit}")
        return {"images_per_run": n, "source": "--kimg", "unit": unit, "n_inception": sizes["n_inception"]}
    saved = json.loads(path.read_text()) if path.is_file() else None
    if saved and saved.get("key") == key and not args.replan:
        return {**saved, "source": f"reused from {path} (an earlier call's probe)"}
    if ctx is None:
        raise ValueError(f"--collect needs --kimg or the plan of an earlier call with these settings ({path})")
    plan = {**make_plan(args, sizes, dz, ctx, t0), "key": key}
    path.parent.mkdir(parents=True, exist_ok=True)
    common.write_json(path, plan)
    return plan


# ---- training and collection --------------------------------------------------------------------------------------
def predicted_s(plan: dict, d: dict, b: int, label: str) -> float:
    per = (plan.get("probe") or {}).get("sec_per_image", {}).get(f"{d['key']}/b{b}/{label}")
    return 0.0 if per is None else plan["overhead_s_per_run"] + plan["images_per_run"] * per


def train_all(args, sizes: dict, dz: list[dict], plan: dict, ctx: dict, t0: float) -> list[dict]:
    """Train and evaluate every run that still fits the budget; the runs left for another call."""
    kimg, left = plan["images_per_run"] / 1000, []
    for seed, d, b, spec in jobs(sizes, dz):
        a, rs = design_args(args, d, spec[0], b), run_sizes(sizes, kimg, b, plan["n_inception"])
        done = sweeprun.read_result(sweeprun.run_folder(mnist_sweep.work_dir(a), rs, spec[0], seed))
        if done is None and time.time() - t0 + predicted_s(plan, d, b, spec[0]) > sizes["budget_s"] - REPORT_S:
            left.append({"design": d["key"], "batch": b, "label": spec[0], "seed": seed})
            continue
        mnist_sweep.train_run(a, spec, seed, rs, ctx)
    if left:
        print(f"[{NAME}] {len(left)} runs left for the next call (budget {sizes['budget_s']:g} s)", flush=True)
    return left


def collect(args, sizes: dict, dz: list[dict], plan: dict, real: str, sha: str | None) -> tuple[list, list]:
    kimg, runs, missing = plan["images_per_run"] / 1000, [], []
    for seed, d, b, (label, name, params) in jobs(sizes, dz):
        a, rs = design_args(args, d, label, b), run_sizes(sizes, kimg, b, plan["n_inception"])
        cfg = mnist_sweep.make_config(a, name, params, seed, rs, real)
        r = sweeprun.read_result(sweeprun.run_folder(mnist_sweep.work_dir(a), rs, label, seed))
        where = {"design": d["key"], "batch": b, "label": label, "seed": seed}
        problem = sweeprun.result_problem(r, cfg, {"n_fid": rs["n_fid"], "n_inception": rs["n_inception"]}, sha)
        if problem:
            missing.append({**where, "why": problem})
            continue
        runs.append({**{k: v for k, v in r.items() if k != "config"}, **where})
    return runs, missing


def run(args) -> dict:
    t0 = time.time()
    args.teacher = sweeprun.absolute_spec(args.teacher) if args.teacher else ""
    best = Path(args.best).resolve()
    device = common.setup(args)
    args.device_type, args.set = device.type, []
    sizes, dz, real = sizes_of(args), designs(best), mnist_sweep.real_side(args)
    args.smoke_set = SMOKE_POOL if real == "teacher" else []
    b0 = sizes["batches"][0]
    cfg0 = mnist_sweep.make_config(
        design_args(args, dz[0], "rkl", b0), "rkl", {}, args.seed, cfg0_sizes(sizes, b0), real
    )
    for d in dz:  # a bad key or value in the tuning file fails here, before any training
        for b, (label, name, params) in ((b, spec) for b in sizes["batches"] for spec in OBJECTIVES):
            validate(
                mnist_sweep.make_config(design_args(args, d, label, b), name, params, 0, cfg0_sizes(sizes, b), real)
            )
    teacher = common.teacher_info(cfg0.model.teacher)
    data = common.record(NAME, args, device, sizes)
    data["_t0"] = t0
    ctx = None
    if not args.collect:
        ctx = {**mnist_sweep.context(args, sizes, device, cfg0), "real": real, "teacher_sha": teacher.get("sha256")}
    plan = get_plan(args, sizes, dz, ctx, t0)
    if ctx is not None and not plan["n_inception"]:
        ctx["inception"] = None
    left = [] if args.collect else train_all(args, sizes, dz, plan, ctx, t0)
    data.update(designs=dz, objectives=[s[0] for s in OBJECTIVES], teacher=teacher, plan=plan, not_started=left)
    data["tuning_file"] = {"path": str(best), "found": best.is_file()}
    data["reference"] = mnist_sweep.REFERENCE if real == "mnist" else "teacher samples (no data/mnist; smoke run only)"
    data["recipe"], data["paper_design"] = mnist_sweep.RECIPE, mnist_sweep.PAPER_DESIGN
    data["runs"], data["missing"] = collect(args, sizes, dz, plan, real, teacher.get("sha256"))
    if ctx and ctx.get("inception_skipped"):
        data["inception_skipped"] = ctx["inception_skipped"]
    data["summary"] = report.summarise(data)
    data["plots"] = report.plot_all(data, args.out)
    common.finish(data, args.out, lambda d: report.render(d, {}))
    return data


render = report.render


def main(argv: list[str] | None = None) -> dict:
    return run(common.parse(build_parser(), argv, NAME))


if __name__ == "__main__":
    main(sys.argv[1:])
