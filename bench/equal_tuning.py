"""Equal tuning of reverse KL and SBA(5) on MNIST (issue 31, item 4): the same budget, chosen by the same written
rule, from the same starting point; then each objective's best setting to the full schedule with three seeds.

    python bench/equal_tuning.py [--probe-kimg 40] [--only rkl] [--records bench/results/mnist_sweep_runs]
    python bench/equal_tuning.py --finals [--seeds 3] [--n-inception 2000]      # after every probe finished
    python bench/equal_tuning.py --collect                                      # the report alone

The rule (written before any probe ran):
- Start: the objective sweep's config (`mnist` preset + `mnist_sweep.RECIPE`: linear head at 50x the critic's lr,
  weights normalised in 8 sigma bins and capped at 5, generator lr half the critic's, batch 64, 150k images).
- Six probes per objective, each moving one knob from the start: the critic head (`mean`; linear at 10x), the
  lr ratio of generator to critic (1:1; 1:4), the batch (4x the start's, same lr), and the objective's own weight
  knob: for SBA(5) raw weights (no normalisation, no cap, logits clamped at 8: `presets.PAPER_DESIGN`'s
  weights); reverse KL's weights are 1 whatever the knob, so its sixth probe is the critic off
  (`loss.disc_weight = 0`: psi is trained by denoising alone, as DMD's).
- Every probe is seed `--seed` and the first `--probe-kimg` images of the full 150k-image schedule (a prefix:
  the winner's seed-0 run continues to the end). Its score is the mean of the in-loop FID (MNIST features,
  n = 500 vs the 10k test set) at its last three logged points up to `--probe-kimg`; the start's score comes
  from the sweep's own run where its records (`--records`) hold the same config and seed.
- Best = the lowest score, the start included. `--finals` trains each objective's best setting to 150k images
  with `--seeds` seeds and scores it at the end: FID with MNIST features (n = --n-fid) and Inception FID
  (n = --n-inception), both against the whole 10k test set.

Runs are `mnist_sweep` runs (resumable, `sweeprun.py` folders under <work>/equal_tuning/<probe>); stop and run
again to continue. Writes `equal_tuning.json` (its "best" block is what `decisive_gpu.py --best` reads),
`equal_tuning.md` and `equal_tuning.png` into --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import common
import equal_tuning_report as report
import mnist_sweep
import sweeprun
from dibregman.config import parse_set
from dibregman.config_help import config_diff

NAME = "equal_tuning"
TITLE = report.TITLE
OBJECTIVES = {s[0]: s for s in sweeprun.FIGURE4 if s[0] in ("rkl", "sba(lam=5)")}
COMMON_PROBES = {  # probe -> overrides on the start (batch: a factor on the start's batch)
    "start": {},
    "head-mean": {"model.disc_head": "mean"},
    "head-x10": {"optim.head_lr_mult": 10.0},
    "lr-1to1": {"optim.gen_lr": 2e-4},
    "lr-1to4": {"optim.gen_lr": 5e-5},
    "batch-x4": {"batch_factor": 4},
}
OWN_PROBE = {
    "rkl": ("critic-off", {"loss.disc_weight": 0.0}),
    "sba(lam=5)": (
        "weights-raw",
        {"divergence.normalize": "none", "divergence.weight_clip": None, "divergence.logit_clamp": 8.0},
    ),
}


def probes(label: str) -> dict[str, dict]:
    own, pairs = OWN_PROBE[label]
    return {**COMMON_PROBES, own: pairs}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probe-kimg", type=float, default=None, help="images per probe, thousands (40)")
    p.add_argument("--kimg", type=float, default=None, help="the full schedule, thousands (150)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of each best setting under --finals")
    p.add_argument("--only", default="", help="objectives this process trains: rkl, sba(lam=5) (default both)")
    p.add_argument("--probes", default="", help="probe names this process trains (default all)")
    p.add_argument("--records", default="bench/results/mnist_sweep_runs", help="the sweep's records (start scores)")
    p.add_argument("--finals", action="store_true", help="train each objective's best setting with --seeds seeds")
    p.add_argument("--collect", action="store_true", help="train nothing: the report from finished runs")
    p.add_argument("--batch", type=int, default=None, help="the start's batch (the preset's, 64)")
    p.add_argument("--fid-every-kimg", type=float, default=None, help="in-loop FID period (kimg / 30)")
    p.add_argument("--n-fid-loop", type=int, default=None, help="samples per in-loop FID (500)")
    p.add_argument("--n-fid", type=int, default=None, help="samples of the finals' MNIST-feature FID (2000)")
    p.add_argument("--n-inception", type=int, default=None, help="samples of the finals' Inception FID (2000)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override of every run")
    return common.add_common_args(p)


def sizes_of(args) -> dict:
    a = copy.copy(args)
    a.teacher_nfe, a.n_inception, a.ckpt_every_kimg, a.teacher, a.seeds = 0, 0, None, "", 1
    sizes = mnist_sweep.sizes_of(a)
    args.batch = a.batch
    sizes["probe_kimg"] = args.probe_kimg or (sizes["kimg"] if args.quick else 40.0)
    sizes["n_inception_full"] = common.size(args, "n_inception", 2000, 0)
    sizes["seeds"] = list(range(args.seed, args.seed + args.seeds))
    return sizes


def probe_args(args, probe: str, pairs: dict, until: float | None):
    """A copy of `args` for mnist_sweep.train_run: the probe's overrides before --set, its own --work."""
    a = copy.copy(args)
    extra = {k: v for k, v in pairs.items() if k != "batch_factor"}
    a.set = [f"{k}={'null' if v is None else v}" for k, v in extra.items()] + list(args.set)
    a.work, a.until_kimg, a.paper_design, a.teacher = args.work / NAME / probe, until, False, ""
    base = args.batch or mnist_sweep.get_preset("mnist").optim.batch_size
    a.batch = base * pairs.get("batch_factor", 1)
    return a


def run_sizes(sizes: dict, a) -> dict:
    return {**sizes, "batch": a.batch}


def run_dir(a, sizes: dict, label: str, seed: int) -> Path:
    return sweeprun.run_folder(mnist_sweep.work_dir(a), run_sizes(sizes, a), label, seed)


def reached(folder: Path, sizes: dict) -> bool:
    return report.score(folder, sizes["probe_kimg"]) is not None


def start_record(args, sizes: dict, label: str, cfg) -> Path | None:
    """The sweep's own run of the start (same config and seed) in --records, when it reaches --probe-kimg."""
    if not args.records:
        return None
    folder = sweeprun.run_folder(Path(args.records).resolve() / mnist_sweep.NAME, sizes, label, args.seed)
    saved = folder / "config.json"
    if not saved.is_file():
        return None
    diff = config_diff(sweeprun.saved_config(json.loads(saved.read_text())), cfg.to_dict())
    ok = not (diff - sweeprun.REPORTING_KEYS) and reached(folder, sizes)
    return folder if ok else None


def probe_phase(args, sizes: dict, ctx: dict | None, real: str) -> list[dict]:
    rows, only = [], [s.strip() for s in args.probes.split(",") if s.strip()]
    for label in selected(args):
        for probe, pairs in probes(label).items():
            a = probe_args(args, probe, pairs, sizes["probe_kimg"])
            rs = run_sizes(sizes, a)
            cfg = mnist_sweep.make_config(a, OBJECTIVES[label][1], OBJECTIVES[label][2], args.seed, rs, real)
            own = run_dir(a, sizes, label, args.seed)
            folder = (probe == "start" and start_record(args, sizes, label, cfg)) or own
            if ctx is not None and folder == own and (not only or probe in only):
                if not reached(folder, sizes):
                    mnist_sweep.train_run(a, OBJECTIVES[label], args.seed, rs, ctx)
            source = "this study" if folder == own else "the sweep's run (--records)"
            rows.append(report.probe_row(label, probe, pairs, folder, sizes["probe_kimg"], cfg, source))
    return rows


def finals_phase(args, sizes: dict, ctx: dict | None, real: str, best: dict) -> list[dict]:
    import fewstep

    rows = []
    for label in selected(args):
        if label not in best:
            print(f"[{NAME}] {label}: not every probe finished, no best setting yet", flush=True)
            continue
        probe = best[label]["probe"]
        a = probe_args(args, probe, probes(label)[probe], None)
        rs = run_sizes(sizes, a)
        for seed in sizes["seeds"]:
            result = None
            if ctx is not None:
                result = mnist_sweep.train_run(a, OBJECTIVES[label], seed, rs, ctx)
                if result is not None and ctx.get("inception_net") is not None:
                    fewstep.add_inception(a, label, seed, rs, ctx, result)
            result = result or sweeprun.read_result(run_dir(a, sizes, label, seed))
            rows.append(report.final_row(label, probe, seed, result, sizes))
    return rows


def selected(args) -> list[str]:
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in OBJECTIVES]
    if bad:
        raise ValueError(f"--only {bad}: valid objectives are {list(OBJECTIVES)}")
    return only or list(OBJECTIVES)


def run(args) -> dict:
    import fewstep

    parse_set(args.set)  # a bad --set fails before anything trains
    device = common.setup(args)
    args.device_type = device.type
    sizes = sizes_of(args)
    real = mnist_sweep.real_side(args)
    a0 = probe_args(args, "start", {}, None)
    cfg0 = mnist_sweep.make_config(a0, "rkl", {}, args.seed, run_sizes(sizes, a0), real)
    sizes["batch"] = cfg0.optim.batch_size
    data = common.record(NAME, args, device, sizes)
    data.update(rule=__doc__.split("The rule (written before any probe ran):")[1].split("Runs are")[0].strip())
    ctx = None
    if not args.collect:
        sha = common.teacher_info(cfg0.model.teacher).get("sha256")
        ctx = {**mnist_sweep.context(args, sizes, device, cfg0), "real": real, "teacher_sha": sha}
        ctx["inception_net"] = fewstep.inception_net(sizes, device, ctx) if args.finals else None
    data["probes"] = probe_phase(args, sizes, None if args.finals else ctx, real)
    data["best"] = report.best_of(data["probes"], {label: probes(label) for label in OBJECTIVES})
    data["finals"] = finals_phase(args, sizes, ctx if args.finals else None, real, data["best"])
    data["summary"] = report.summarise_finals(data["finals"])
    data["plots"] = report.plot(data, args.out)
    common.finish(data, args.out, lambda d: report.render(d, {}))
    return data


render = report.render


def main(argv: list[str] | None = None) -> dict:
    return run(common.parse(build_parser(), argv, NAME))


if __name__ == "__main__":
    main(sys.argv[1:])
