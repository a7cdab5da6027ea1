"""GMM objective sweep: every registered divergence (registry defaults) and SBA at several lambda,
distilled under the same budget (kimg, batch, seed) from the exact 8-mode ring teacher of the `gmm` preset;
exact metrics.

    python bench/gmm_sweep.py [--kimg 1000] [--batch 512] [--n-eval 4000] [--set loss.gen_sigma_max=10 ...]

Every hyper-parameter other than --kimg / --batch (and --set) is read from `presets.PRESETS["gmm"]` at run
time.
Writes `gmm_sweep.json`, `gmm_sweep.png` (scatter plots) and `gmm_sweep_curves.png` (modes / within-3-sigma
versus images seen). Metrics: `dibregman.metrics.gmm_metrics.exact_metrics` on the EMA generator's samples.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys

import torch

import common
from dibregman import build, divergences
from dibregman.config import override, parse_set
from dibregman.evaluate import exact_metrics
from dibregman.generators import generate
from dibregman.loop import Trainer
from dibregman.metrics.gmm_metrics import mode_statistics
from dibregman.presets import get_preset

NAME = "gmm_sweep"
TITLE = "GMM objective sweep (exact teacher)"
SBA_LAMBDAS = (-1.0, 0.5, 1.0, 3.0, 5.0, 10.0)  # the paper's SBA family; lambda = -1 is BE, 1 is LS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kimg", type=float, default=None, help="kimg per objective (default: preset's total_kimg x scale)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: the preset's)")
    p.add_argument("--n-eval", type=int, default=None, help="student samples for the exact metrics (4000 x scale)")
    p.add_argument("--num-seeds", type=int, default=1, help="seeds per objective (--seed, --seed + 1, ...)")
    p.add_argument("--workers", type=int, default=1, help="runs in parallel, one CPU thread each (CPU only)")
    p.add_argument("--only", default="", help="comma-separated labels / divergence names (rkl,sba(lam=5))")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for all runs")
    return common.add_common_args(p)


def runs() -> list[tuple[str, str, dict]]:
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


def equivalent_groups(specs: list[tuple[str, str, dict]]) -> list[list[str]]:
    """Runs whose log-weights differ by a constant on the clamped logit range (weights proportional): after a
    normalisation of the weights they train identically up to floating-point rounding."""
    l = torch.linspace(-10, 10, 401, dtype=torch.float64)
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for label, name, params in specs:
        lw = divergences.get(name, **params).log_weight(l)
        for ref, members in groups:
            if float((lw - ref).max() - (lw - ref).min()) < 1e-9:
                members.append(label)
                break
        else:
            groups.append((lw, [label]))
    return [members for _, members in groups if len(members) > 1]


_INIT_CACHE: dict = {}  # (model config, seed, device) -> (pretrained MLP, RNG state after it), per process


def cached_pretrain(teacher, cfg, device):
    """Pretrain the MLP that initialises G and psi once, not once per objective (`build_models(pretrain=...)`).

    `build.pretrain_mlp` seeds torch with run.seed first, so its result and the RNG state it leaves behind
    are functions of (teacher, model config, seed, device) only; replaying both equals recomputing them.
    """
    key = (json.dumps(cfg.model.__dict__, sort_keys=True), cfg.run.seed, str(device))
    if key not in _INIT_CACHE:
        net = build.pretrain_mlp(teacher, cfg, device)
        _INIT_CACHE[key] = (net, torch.get_rng_state())
    net, rng = _INIT_CACHE[key]
    torch.set_rng_state(rng)
    return copy.deepcopy(net)


def _worker_run(job: tuple) -> tuple[dict, torch.Tensor]:
    """One run in a worker process (--workers > 1): one CPU thread, the same code path as in-process runs."""
    args, spec, seed, sizes = job
    torch.set_num_threads(1)
    return one_run(args, spec, seed, sizes, torch.device("cpu"))


def make_config(args, name: str, params: dict, kimg: float, seed: int, device):
    pairs = parse_set(args.set)
    if args.quick:
        pairs.setdefault("model.init_steps", 10)  # smoke run only: a barely pretrained initialisation
    cfg = override(get_preset("gmm"), pairs)
    every = min(cfg.run.log_every_kimg, kimg / 10)
    return override(
        cfg,
        {
            "divergence.name": name,
            **{f"divergence.{k}": v for k, v in params.items()},
            "optim.batch_size": args.batch or cfg.optim.batch_size,
            "run.total_kimg": kimg,
            "run.seed": seed,
            "run.log_every_kimg": every,
            "run.ckpt_every_kimg": kimg,
            "run.sample_every_kimg": 0.0,
            "run.tensorboard": False,
            "run.device": device.type,
            "run.threads": args.threads,
        },
    )


def one_run(args, spec: tuple, seed: int, sizes: dict, device) -> tuple[dict, torch.Tensor]:
    label, name, params = spec
    cfg = make_config(args, name, params, sizes["kimg"], seed, device)
    curve = []

    def hook(trainer, num_images: int) -> dict:
        t = trainer.m.teacher
        st = mode_statistics(generate(trainer.ema, sizes["n_curve"], seed=1, device=device), t.means, t.covs, t.weights)
        curve.append(
            {
                "kimg": num_images / 1000,
                "modes_covered": st["modes_covered"],
                "within_3sigma": st["within_3sigma"],
            }
        )
        return {"exact/modes_covered": st["modes_covered"], "exact/within_3sigma": st["within_3sigma"]}

    run_dir = common.fresh_dir(args.work / NAME / f"{''.join(c if c.isalnum() else '_' for c in label)}-s{seed}")
    trainer = Trainer(cfg, run_dir, hooks=[hook], pretrain=cached_pretrain)
    res = trainer.train()
    x = generate(trainer.ema, sizes["n_eval"], seed=seed + 2, device=device)
    metrics = exact_metrics(x, trainer.m.teacher, seed=seed)
    metrics.pop("mode_proportions", None)
    last = [json.loads(s) for s in (run_dir / "log.jsonl").read_text().splitlines() if s.strip()][-1]
    out = {
        "label": label,
        "seed": seed,
        "divergence": name,
        "params": params,
        "weight": divergences.get(name, **params).formula,
        "images_seen": res["num_images"],
        "steps": res["steps"],
        "bad_steps": res["bad_steps"],
        "wall_sec": round(res["wall_sec"], 1),
        "ess_frac_last": last.get("weight/ess_frac"),
        "weight_max_last": last.get("weight/max"),
        "metrics": metrics,
        "curve": curve,
    }
    return out, x[: sizes["n_plot"]]


def run(args) -> dict:
    device = common.setup(args)
    if args.quick:
        args.batch = args.batch or 64
    sizes = {
        # default: the preset's own length (the "default settings"); quick: 2 steps
        "kimg": common.size(args, "kimg", get_preset("gmm").run.total_kimg, 2 * (args.batch or 0) / 1000, False),
        "n_eval": common.size(args, "n_eval", 4000, 64),
        "n_curve": 32 if args.quick else 2000,
        "n_plot": 64 if args.quick else 2000,
    }
    cfg0 = make_config(args, "sba", {}, sizes["kimg"], args.seed, device)
    sizes["batch"] = cfg0.optim.batch_size
    sizes["seeds"] = list(range(args.seed, args.seed + args.num_seeds))
    data = common.record(NAME, args, device, sizes)
    data["preset"] = cfg0.to_dict()  # the config of every run but its divergence section
    data["preset_total_kimg"] = get_preset("gmm").run.total_kimg  # the preset's own length, for comparison
    data["runs"], samples = [], {}
    keep = set(filter(None, args.only.split(",")))
    specs = [r for r in runs() if not keep or r[0] in keep or r[1] in keep]
    data["proportional_weights"] = equivalent_groups(specs)
    jobs = [(seed, spec) for seed in sizes["seeds"] for spec in specs]
    for seed, spec in jobs:
        print(f"[{NAME}] {spec[0]} seed {seed}: {sizes['kimg']} kimg, batch {sizes['batch']}", flush=True)
    if args.workers > 1 and device.type == "cpu":
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(args.workers, len(jobs))) as pool:
            results = pool.imap(_worker_run, [(args, spec, seed, sizes) for seed, spec in jobs])
            for r, x in results:  # in job order, as they finish
                _report(data, samples, r, x)
    else:
        for seed, spec in jobs:
            _report(data, samples, *one_run(args, spec, seed, sizes, device))
    plot_scatter(data, samples, args.out / f"{NAME}.png", args.seed)  # first seed
    plot_curves(data, args.out / f"{NAME}_curves.png")
    data["plots"] = [f"{NAME}.png", f"{NAME}_curves.png"]
    common.finish(data, args.out)
    return data


def _report(data: dict, samples: dict, r: dict, x: torch.Tensor) -> None:
    samples.setdefault(r["label"], x)  # the plots show the first seed
    m = r["metrics"]
    print(
        f"[{NAME}] {r['label']} seed {r['seed']}: modes {m['modes_covered']}/{m['num_modes']}, within 3 sigma "
        f"{m['within_3sigma']:.3f}, MMD2 {m['mmd2']:.2e} (floor {m['mmd2_floor']:.2e}), {r['wall_sec']} s",
        flush=True,
    )
    data["runs"].append(r)


def plot_scatter(data: dict, samples: dict, path, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dibregman.teachers import load_teacher

    teacher = load_teacher(data["preset"]["model"]["teacher"])
    ref = teacher.sample(2000, generator=torch.Generator().manual_seed(seed + 9)).cpu()
    first = [r for r in data["runs"] if r["seed"] == data["sizes"]["seeds"][0]]
    n = len(first) + 1
    ncol = 5
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3 * ncol, 3 * nrow), dpi=80, squeeze=False)
    panels = [("exact teacher", ref, None)] + [(r["label"], samples[r["label"]], r) for r in first]
    for ax, (label, x, r) in zip(axes.flat, panels, strict=False):
        ax.scatter(ref[:, 0], ref[:, 1], s=1, c="tab:gray", alpha=0.3)
        if r is not None:
            ax.scatter(x[:, 0], x[:, 1], s=1, c="tab:red", alpha=0.5)
            m = r["metrics"]
            label = f"{label}: {m['modes_covered']}/{m['num_modes']} modes, {m['within_3sigma']:.2f} in 3σ"
        ax.set_title(label, fontsize=8)
        ax.set_xlim(-3.2, 3.2)
        ax.set_ylim(-3.2, 3.2)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(
        f"GMM {data['preset']['model']['teacher']}: {data['sizes']['kimg']:g} kimg per objective, "
        f"batch {data['sizes']['batch']}"
        f", seed {data['sizes']['seeds'][0]} (red: EMA student, grey: exact teacher)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(data: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=80)
    for r in (r for r in data["runs"] if r["seed"] == data["sizes"]["seeds"][0]):
        k = [c["kimg"] for c in r["curve"]]
        style = "-" if r["divergence"] == "sba" else "--"
        axes[0].plot(k, [c["modes_covered"] for c in r["curve"]], style, marker=".", label=r["label"])
        axes[1].plot(k, [c["within_3sigma"] for c in r["curve"]], style, marker=".", label=r["label"])
    axes[0].set_ylabel("modes covered")
    axes[1].set_ylabel("fraction within 3σ of a mode")
    for ax in axes:
        ax.set_xlabel("kimg (generator images seen / 1000)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


METRIC_COLUMNS = ("modes_covered", "within_3sigma", "mode_tv", "mmd2", "energy", "log_density")


def by_label(runs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in runs:
        out.setdefault(r["label"], []).append(r)
    return out


def mean_std(values: list[float], digits: int = 3) -> str:
    """One value as is; several as `mean ± std` (population std over seeds)."""
    if len(values) == 1:
        return common.fmt(values[0], digits)
    v = torch.tensor(values, dtype=torch.float64)
    return f"{common.fmt(float(v.mean()), digits)} ± {common.fmt(float(v.std(unbiased=False)), 2)}"


def table_rows(d: dict) -> list[list]:
    rows = []
    for label, rs in by_label(d["runs"]).items():
        cells = [mean_std([float(r["metrics"][k]) for r in rs]) for k in METRIC_COLUMNS]
        mean, _, std = cells[0].partition(" ± ")  # modes: "6/8" or "6.5/8 ± 0.5"
        cells[0] = f"{mean}/{rs[0]['metrics']['num_modes']}" + (f" ± {std}" if std else "")
        ess = [r["ess_frac_last"] for r in rs if r["ess_frac_last"] is not None]
        rows.append(
            [
                f"`{label}`",
                f"`{rs[0]['weight']}`",
                *cells,
                mean_std(ess) if ess else "n/a",
                sum(r["bad_steps"] for r in rs),
                common.fmt(sum(r["wall_sec"] for r in rs), 4),
            ]
        )
    return rows


def render(d: dict, all_data: dict) -> str:
    f, s = common.fmt, d["sizes"]
    m0 = d["runs"][0]["metrics"] if d["runs"] else {}
    rows = table_rows(d)
    seeds = s["seeds"]
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds} (mean ± std over seeds)"
    lines = [
        f"## {TITLE}",
        "",
        common.header_line(d),
        "",
        f"Teacher `{d['preset']['model']['teacher']}`; every objective trained for {f(s['kimg'], 4)} kimg "
        f"(images seen per run: {sorted({r['images_seen'] for r in d['runs']})}), batch {s['batch']}, "
        f"{seed_text}, all other settings from the `gmm` preset (in the JSON; the preset's own length "
        f"is {f(d.get('preset_total_kimg'), 5)} kimg). Metrics of "
        f"{f(m0.get('n_samples'))} EMA-student samples; MMD² / energy on {f(m0.get('n_kernel'))} of them.",
        "",
        f"Exact-sampler references at this n: within 3σ {f(m0.get('within_3sigma_exact'))} (χ² value "
        f"{f(m0.get('within_3sigma_chi2'))}), modes {f(m0.get('modes_covered_exact'))}/"
        f"{f(m0.get('num_modes'))}, "
        f"MMD² floor {f(m0.get('mmd2_floor'), 3)} ± {f(m0.get('mmd2_floor_std'), 3)}, energy floor "
        f"{f(m0.get('energy_floor'), 3)} ± {f(m0.get('energy_floor_std'), 3)}, mean log p "
        f"{f(m0.get('log_density_exact'))}.",
        "",
        *common.table(
            [
                "objective",
                "weight(l)",
                "modes",
                "within 3σ",
                "mode TV",
                "MMD²",
                "energy",
                "mean log p",
                "ESS/batch (last)",
                "skipped steps",
                "wall s (all seeds)",
            ],
            rows,
        ),
        "",
        *proportional(d),
        f"![GMM scatter]({d['plots'][0]})",
        "",
        f"![GMM curves]({d['plots'][1]})",
        "",
    ]
    return "\n".join(lines)


def proportional(d: dict) -> list[str]:
    """The groups of objectives with proportional weights and their MMD²: a measured noise level."""
    groups = d.get("proportional_weights", [])
    if not groups:
        return []
    mmd = {k: [r["metrics"]["mmd2"] for r in rs] for k, rs in by_label(d["runs"]).items()}
    norm = d["preset"]["divergence"]["normalize"]
    text = (
        f"Objectives with proportional weights (identical after the `{norm}` normalisation, so their runs "
        "differ only by floating-point rounding amplified by training; where their numbers differ, that "
        "spread is a noise level for the table):"
        if norm != "none"
        else "Objectives with proportional weights (no normalisation: the factor scales the step size):"
    )
    lines = [text, ""]
    for g in groups:
        vals = " / ".join(mean_std(mmd[x]) for x in g if x in mmd)
        lines.append(f"- {', '.join(f'`{x}`' for x in g)}: MMD² {vals}")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> dict:
    return run(common.parse(build_parser(), argv, NAME))


if __name__ == "__main__":
    main(sys.argv[1:])
