"""GMM objective sweep with seeds on exact teachers: does an objective beat reverse KL where the answer is known
exactly? Every objective of the MNIST Figure-4 sweep (reverse KL, SBA(lambda) for lambda in {-1, 1, 3, 5, 10},
LR (= JS), forward KL; `--objectives all`: every registered divergence and more lambdas), `--seeds` seeds, on
the 8-mode ring with equal weights and on the same ring with weights falling geometrically to 2 %.

    python bench/gmm_sweep.py [--teachers gmm:ring8,gmm:ring8-uneven] [--seeds 3] [--objectives figure4|all]
                              [--kimg 2000] [--batch 512] [--n-eval 4000] [--workers 2] [--only rkl,fkl]
                              [--set loss.gen_sigma_max=10 ...] [--tag NAME] [--collect]

Every hyper-parameter other than the teacher, --kimg / --batch (and --set) is read from `presets.PRESETS["gmm"]`
at run time. Runs resume (`sweeprun.py`): stop the command and run it again to continue; finished runs are
skipped; processes with disjoint `--only` lists may share --work/--out. Metrics:
`dibregman.metrics.gmm_metrics.exact_metrics` of the EMA generator's samples (modes covered, within 3 sigma,
mode TV, MMD^2 and energy distance with their exact-sample noise floors); modes covered and within 3 sigma are
also logged along training (log.jsonl keys `exact/*`). Writes `gmm_sweep.json` (every finished run and the
summary over seeds), `gmm_sweep.png` (samples of the first seed) and `gmm_sweep_curves.png` (mean and min/max
band over seeds); `--collect` rebuilds them from the finished runs alone. `--tag NAME` makes the result a variant
of the sweep (with `--set`, in its own --work): `gmm_sweep_NAME.json` / `.png` / `_curves.png`, reported beside
the sweep in BENCHMARKS.md and the verdict under its overrides, e.g. `--set loss.regression_weight=0 --tag noreg`.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys

import torch

import common
import gmm_report
import sweeprun
from dibregman import build, divergences
from dibregman.config import override, parse_set
from dibregman.evaluate import exact_metrics
from dibregman.generators import generate
from dibregman.loop import Trainer
from dibregman.metrics.gmm_metrics import mode_statistics
from dibregman.presets import get_preset

NAME = "gmm_sweep"
TITLE = gmm_report.TITLE
TEACHERS = ("gmm:ring8", "gmm:ring8-uneven")  # the tuned ring, and the same ring with unequal weights (2 % .. )
SBA_LAMBDAS = (-1.0, 0.5, 1.0, 3.0, 5.0, 10.0)  # --objectives all: the paper's SBA family; -1 is BE, 1 is LS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kimg", type=float, default=None, help="kimg per run (default: preset's total_kimg x scale)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: the preset's)")
    p.add_argument("--n-eval", type=int, default=None, help="student samples for the exact metrics (4000 x scale)")
    p.add_argument("--seeds", "--num-seeds", dest="seeds", type=int, default=3, help="seeds --seed, --seed + 1, ...")
    p.add_argument("--teachers", default=None, help=f"comma-separated gmm: specs (default {','.join(TEACHERS)})")
    p.add_argument("--objectives", default="figure4", choices=("figure4", "all"), help="which objectives")
    p.add_argument("--workers", type=int, default=1, help="runs in parallel, one CPU thread each (CPU only)")
    p.add_argument("--only", default="", help="comma-separated labels / divergence names this process trains")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for all runs")
    p.add_argument("--collect", action="store_true", help="train nothing: rebuild JSON and PNGs from finished runs")
    p.add_argument("--tag", default="", help="a variant's name (with --set): writes gmm_sweep_TAG.json and PNGs")
    return common.add_common_args(p)


def registry_runs() -> list[tuple[str, str, dict]]:
    """(label, divergence, parameters): the registry with its defaults, then SBA(lambda), SBA_LAMBDAS."""
    out = [(n, n, divergences.get(n).params) for n in divergences.names()]
    out += [("sba", "sba", {"lam": lam}) for lam in SBA_LAMBDAS]
    seen, unique = set(), []
    for _, name, params in out:
        key = (name, tuple(sorted(params.items())))
        if key not in seen:
            seen.add(key)
            label = name + ("(" + ",".join(f"{k}={v:g}" for k, v in params.items()) + ")" if params else "")
            unique.append((label, name, params))
    return unique


def objectives(which: str) -> list[tuple[str, str, dict]]:
    return list(sweeprun.FIGURE4) if which == "figure4" else registry_runs()


def equivalent_groups(specs: list[tuple[str, str, dict]], alias: dict | None = None) -> list[list[str]]:
    """Runs whose log-weights differ by a constant on the clamped logit range (weights proportional): after a
    normalisation of the weights they train identically up to floating-point rounding. Bitwise-equal weights
    (`alias`: trained once, shown under both names) are left out: their runs are the same run."""
    l = torch.linspace(-10, 10, 401, dtype=torch.float64)
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for label, name, params in specs:
        if label in (alias or {}):
            continue
        lw = divergences.get(name, **params).log_weight(l)
        for ref, members in groups:
            if float((lw - ref).max() - (lw - ref).min()) < 1e-9:
                members.append(label)
                break
        else:
            groups.append((lw, [label]))
    return [members for _, members in groups if len(members) > 1]


_INIT_CACHE: dict = {}  # (model config, seed, device) -> (pretrained MLP, RNG state after it), per process
PRETRAIN_DIR: list = [None]  # the on-disk cache of pretrained MLPs of this sweep (set by `run` and the workers)


def cached_pretrain(teacher, cfg, device):
    """Pretrain the MLP that initialises G and psi once per (teacher, model config, seed), not once per objective
    (`build_models(pretrain=...)`), in memory and in `<work>/gmm_sweep/pretrain/` (shared by worker processes
    and by a resumed sweep: the fit takes about a minute on one CPU core).

    `build.pretrain_mlp` seeds torch with run.seed first, so its result and the RNG state it leaves behind
    are functions of (teacher, model config, seed, device) only; replaying both equals recomputing them. The
    student keys (`model.student_*`, few-step students) do not enter the fit: students of every K share one.
    """
    model = {k: v for k, v in cfg.model.__dict__.items() if not k.startswith("student_")}
    key = json.dumps([model, cfg.run.seed, str(device)], sort_keys=True)
    if key not in _INIT_CACHE:
        _INIT_CACHE[key] = _load_pretrained(key, device) or _pretrain_and_store(teacher, cfg, device, key)
    net, rng = _INIT_CACHE[key]
    torch.set_rng_state(rng)
    return copy.deepcopy(net)


def _pretrain_path(key: str):
    import hashlib

    folder = PRETRAIN_DIR[0]
    return None if folder is None else folder / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"


def _load_pretrained(key: str, device):
    from dibregman.networks.mlp import MLPConfig, MLPDenoiser

    path = _pretrain_path(key)
    if path is None or not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = MLPDenoiser(MLPConfig(**state["cfg"])).to(device)
    net.load_state_dict(state["net"])
    return net, state["rng"]


def _pretrain_and_store(teacher, cfg, device, key: str):
    import os

    net = build.pretrain_mlp(teacher, cfg, device)
    rng = torch.get_rng_state()
    path = _pretrain_path(key)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"key": key, "cfg": net.cfg.to_dict(), "net": net.state_dict(), "rng": rng}, tmp)
        tmp.replace(path)
    return net, rng


def make_config(args, teacher: str, name: str, params: dict, seed: int, sizes: dict):
    pairs = {**parse_set(args.set), "model.teacher": teacher}
    if args.quick:
        pairs.setdefault("model.init_steps", 10)  # smoke run only: a barely pretrained initialisation
    cfg = override(get_preset("gmm"), pairs)
    kimg = sizes["kimg"]
    return override(
        cfg,
        {
            "divergence.name": name,
            **{f"divergence.{k}": v for k, v in params.items()},
            "optim.batch_size": args.batch or cfg.optim.batch_size,
            "run.total_kimg": kimg,
            "run.seed": seed,
            "run.log_every_kimg": min(cfg.run.log_every_kimg, kimg / 10),
            "run.ckpt_every_kimg": min(cfg.run.ckpt_every_kimg, kimg / 4),
            "run.sample_every_kimg": 0.0,
            "run.tensorboard": False,
            "run.device": sizes["device"],
            "run.threads": args.threads,
        },
    )


def run_folder(args, sizes: dict, teacher: str, label: str, seed: int):
    return sweeprun.run_folder(args.work / NAME / sweeprun.slug(teacher.partition(":")[2]), sizes, label, seed)


def one_run(args, job: tuple, sizes: dict) -> dict | None:
    """Train (or resume) and evaluate one run; its result.json, or None when another process holds it."""
    teacher, (label, name, params), seed = job
    cfg = make_config(args, teacher, name, params, seed, sizes)
    rd = run_folder(args, sizes, teacher, label, seed)
    eval_sizes = {"n_eval": sizes["n_eval"], "n_curve": sizes["n_curve"]}
    done = sweeprun.read_result(rd)
    if sweeprun.result_problem(done, cfg, eval_sizes) is None:
        print(f"[{NAME}] {teacher} {label} seed {seed}: finished, skipped", flush=True)
        return done
    print(f"[{NAME}] {teacher} {label} seed {seed}: {sizes['kimg']:g} kimg, batch {cfg.optim.batch_size}", flush=True)
    device = torch.device(sizes["device"])

    def hook(trainer, num_images: int) -> dict:
        t = trainer.m.teacher
        x = generate(trainer.ema, sizes["n_curve"], seed=1, device=device)
        st = mode_statistics(x, t.means, t.covs, t.weights)
        return {"exact/modes_covered": st["modes_covered"], "exact/within_3sigma": st["within_3sigma"]}

    tag = f"[{NAME}] {teacher} {label} seed {seed}"
    ran = sweeprun.train(lambda: Trainer(cfg, rd, hooks=[hook], pretrain=cached_pretrain), tag)
    if ran is None:
        return None
    trainer, counters, failed = ran
    x = generate(trainer.ema, sizes["n_eval"], seed=seed + 2, device=device)
    logs = sweeprun.read_log(rd)
    result = {
        "teacher": teacher,
        **sweeprun.record((label, name, params), seed, cfg, eval_sizes, rd, counters, failed),
        "wall_sec": round(sweeprun.train_seconds(logs), 1),
        **sweeprun.weight_stats(logs),
        "metrics": exact_metrics(x, trainer.m.teacher, seed=seed),
        "curve": [
            {"kimg": r["kimg"], "modes_covered": r["exact/modes_covered"], "within_3sigma": r["exact/within_3sigma"]}
            for r in logs
            if "exact/modes_covered" in r
        ],
    }
    common.write_json(rd / sweeprun.RESULT, result)
    _report(result)
    return result


def _worker_run(job: tuple) -> None:
    """One run in a worker process (--workers > 1): one CPU thread, the same code path as in-process runs."""
    args, job, sizes = job
    torch.set_num_threads(1)
    PRETRAIN_DIR[0] = args.work / NAME / "pretrain"
    one_run(args, job, sizes)


def _worker_pretrain(job: tuple) -> None:
    """The pretrained MLP of one (teacher, seed) into the on-disk cache (--workers > 1: before the runs)."""
    from dibregman.teachers import load_teacher

    args, (teacher, seed), sizes = job
    torch.set_num_threads(1)
    PRETRAIN_DIR[0] = args.work / NAME / "pretrain"
    cfg = make_config(args, teacher, "rkl", {}, seed, sizes)
    cached_pretrain(load_teacher(teacher), cfg, torch.device("cpu"))


def _report(r: dict) -> None:
    m = r["metrics"]
    print(
        f"[{NAME}] {r['teacher']} {r['label']} seed {r['seed']}: modes {m['modes_covered']}/{m['num_modes']}, "
        f"within 3 sigma {m['within_3sigma']:.3f}, MMD2 {m['mmd2']:.2e} (floor {m['mmd2_floor']:.2e}), "
        f"{r['wall_sec']} s",
        flush=True,
    )


def collect(args, sizes: dict, jobs: list, alias: dict) -> tuple[list[dict], list[dict]]:
    """Every finished run (the aliases' under their own labels) and what is missing, in job order."""
    labels = {j[1][0]: j[1] for j in jobs}
    eval_sizes = {"n_eval": sizes["n_eval"], "n_curve": sizes["n_curve"]}
    runs, missing = [], []
    for teacher, (label, name, params), seed in jobs:
        src = labels[alias.get(label, label)]
        cfg = make_config(args, teacher, src[1], src[2], seed, sizes)
        r = sweeprun.read_result(run_folder(args, sizes, teacher, src[0], seed))
        problem = sweeprun.result_problem(r, cfg, eval_sizes)
        if problem:
            missing.append({"teacher": teacher, "label": label, "seed": seed, "why": problem})
            continue
        rec = {k: v for k, v in r.items() if k != "config"}
        rec.update(label=label, divergence=name, params=params, weight=sweeprun.formula(name, params))
        if src[0] != label:
            rec["alias_of"] = src[0]
        runs.append(rec)
    return runs, missing


def run(args) -> dict:
    device = common.setup(args)
    if args.quick:
        args.batch = args.batch or 64
    sizes = {
        # default: the preset's own length (the "default settings"); quick: 2 steps
        "kimg": common.size(args, "kimg", get_preset("gmm").run.total_kimg, 2 * (args.batch or 0) / 1000, False),
        "n_eval": common.size(args, "n_eval", 4000, 64),
        "n_curve": 32 if args.quick else 2000,
        "seeds": list(range(args.seed, args.seed + args.seeds)),
        "device": device.type,
    }
    pairs = parse_set(args.set)
    teachers = (
        args.teachers.split(",")
        if args.teachers
        else [pairs["model.teacher"]]
        if "model.teacher" in pairs
        else TEACHERS
    )
    specs = objectives(args.objectives)
    alias = sweeprun.identical_weights(specs)
    jobs = [(t, s, seed) for t in teachers for s in specs for seed in sizes["seeds"]]
    cfg0 = make_config(args, teachers[0], "sba", {}, args.seed, sizes)
    sizes["batch"] = cfg0.optim.batch_size
    if args.tag and not re.fullmatch(r"[a-z0-9][a-z0-9-]*", args.tag):
        raise ValueError(f"--tag must be lower-case letters, digits and '-' (it names files), got {args.tag!r}")
    data = common.record(f"{NAME}_{args.tag}" if args.tag else NAME, args, device, sizes)
    data["set"] = pairs  # the --set overrides of every run: a variant's title names them
    if not args.collect:
        todo = {alias.get(s[0], s[0]) for s in sweeprun.select(specs, args.only)}
        train = [j for j in jobs if j[1][0] in todo]
        PRETRAIN_DIR[0] = args.work / NAME / "pretrain"
        if args.workers > 1 and device.type == "cpu" and train:
            import multiprocessing as mp

            inits = list(dict.fromkeys((j[0], j[2]) for j in train))  # each (teacher, seed) pretrained once, first
            with mp.get_context("spawn").Pool(min(args.workers, len(train))) as pool:
                list(pool.imap(_worker_pretrain, [(args, k, sizes) for k in inits]))
                list(pool.imap(_worker_run, [(args, j, sizes) for j in train]))
        else:
            for j in train:
                one_run(args, j, sizes)
    data["preset"] = cfg0.to_dict()  # the config of every run but its teacher and divergence section
    data["preset_total_kimg"] = get_preset("gmm").run.total_kimg  # the preset's own length, for comparison
    data.update(teachers=list(teachers), objectives=[s[0] for s in specs], aliases=alias)
    data["proportional_weights"] = equivalent_groups(specs, alias)
    data["runs"], data["missing"] = collect(args, sizes, jobs, alias)
    data["summary"] = gmm_report.summarise(data)
    data["plots"] = gmm_report.plot_all(data, args.out, args.seed, data["benchmark"])
    common.finish(data, args.out)
    return data


render = gmm_report.render
title = gmm_report.title


def main(argv: list[str] | None = None) -> dict:
    return run(common.parse(build_parser(), argv, NAME))


if __name__ == "__main__":
    main(sys.argv[1:])
