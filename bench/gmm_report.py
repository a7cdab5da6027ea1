"""The GMM sweep's numbers over seeds, its figures and its BENCHMARKS.md section, all from `gmm_sweep.json`
(`summarise`, `plot_all`, `render`; `gmm_sweep.py` trains and writes the JSON).

Reads the current JSON (several teachers and seeds, aliases, weight statistics) and the one written before it
(one teacher, runs without a `teacher` key): a missing number reads as n/a.
"""

from __future__ import annotations

from pathlib import Path

import torch

import common
import seedstats as ss

TITLE = "GMM objective sweep with seeds (exact teachers)"
METRICS = {  # metric -> lower is better (the direction of "better" in the verdict)
    "modes_covered": False,
    "within_3sigma": False,
    "mode_tv": True,
    "mmd2": True,
    "energy": True,
}


def teacher_of(d: dict, r: dict) -> str:
    return r.get("teacher") or d["preset"]["model"]["teacher"]


def _weight(r: dict, name: str):
    v = r.get(f"{name}_half")
    return v if v is not None else r.get(f"{name}_last")


def at_floor(m: dict) -> bool:
    """MMD^2 within 3 std of its exact-sample noise floor: the student matches p at this sample size."""
    return m["mmd2"] <= m["mmd2_floor"] + 3 * m["mmd2_floor_std"]


def summarise(d: dict) -> list[dict]:
    """Per (teacher, objective) in JSON order: each exact metric, the MMD^2 floor and the weight statistics as mean
    [min, max] over seeds, and the bands of modes covered / within 3 sigma over training."""
    keys = list(dict.fromkeys((teacher_of(d, r), r["label"]) for r in d["runs"]))
    rows = []
    for teacher, label in keys:
        every = [r for r in d["runs"] if teacher_of(d, r) == teacher and r["label"] == label]
        rs = [r for r in every if not r.get("failed")]  # a diverged run stopped early: not at equal images
        ms = [r["metrics"] for r in rs]
        row = {
            "teacher": teacher,
            "label": label,
            "weight": every[0].get("weight"),
            "alias_of": every[0].get("alias_of"),
            "seeds": [r.get("seed") for r in rs],
            "failed_seeds": [r.get("seed") for r in every if r.get("failed")],
            "num_modes": every[0]["metrics"]["num_modes"],
            **{k: ss.stat(m.get(k) for m in ms) for k in (*METRICS, "log_density", "mmd2_floor")},
            "at_floor": sum(at_floor(m) for m in ms),
            "ess_frac": ss.stat(_weight(r, "ess_frac") for r in rs),
            "weight_max": ss.stat(_weight(r, "weight_max") for r in rs),
            "disc_acc": ss.stat(_weight(r, "disc_acc") for r in rs),
            "bad_steps": sum(r.get("bad_steps", 0) for r in every),
            "wall_sec": sum(r.get("wall_sec") or 0 for r in rs),
            "images_seen": ss.stat(r.get("images_seen") for r in rs),
        }
        for key in ("modes_covered", "within_3sigma"):
            x, mean, lo, hi = ss.band([[(c["kimg"], c[key]) for c in r.get("curve", [])] for r in rs])
            row[f"{key}_band"] = {"kimg": x, "mean": mean, "min": lo, "max": hi}
        rows.append(row)
    return rows


# ---- figures --------------------------------------------------------------------------------------------
def plot_all(d: dict, out: Path, seed: int, name: str = "gmm_sweep") -> list[str]:
    names = [f"{name}.png", f"{name}_curves.png"]
    plot_scatter(d, Path(out) / names[0], seed)
    plot_curves(d, Path(out) / names[1])
    return names


def _samples(r: dict, n: int):
    from dibregman.generators import generate, load_generator

    gen, _ = load_generator(r["run_dir"])
    return generate(gen, n, seed=r["seed"] + 2)


def plot_scatter(d: dict, path: Path, seed: int) -> None:
    """One row per teacher: its exact samples, then each objective's first-seed EMA samples over them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import sweeprun
    from dibregman.teachers import load_teacher

    n = 64 if d.get("quick") else 2000
    first = [r for r in d["runs"] if r["seed"] == d["sizes"]["seeds"][0] and not r.get("alias_of")]
    teachers = d.get("teachers") or [d["preset"]["model"]["teacher"]]
    ncol = 1 + max([sum(teacher_of(d, r) == t for r in first) for t in teachers] or [0])
    fig, axes = plt.subplots(len(teachers), ncol, figsize=(2.6 * ncol, 2.8 * len(teachers)), dpi=80, squeeze=False)
    for row, t in zip(axes, teachers, strict=True):
        ref = load_teacher(t).sample(n, generator=torch.Generator().manual_seed(seed + 9)).cpu()
        panels = [(f"{t}: exact", None)] + [(r["label"], r) for r in first if teacher_of(d, r) == t]
        for ax, (label, r) in zip(row, panels, strict=False):
            ax.scatter(ref[:, 0], ref[:, 1], s=1, c="tab:gray", alpha=0.3)
            if r is not None and Path(r["run_dir"], "generator.safetensors").is_file():
                x = _samples(r, n)
                ax.scatter(x[:, 0], x[:, 1], s=1, c="tab:red", alpha=0.5)
                m = r["metrics"]
                label = f"{label}: {m['modes_covered']}/{m['num_modes']}, {m['within_3sigma']:.2f} in 3σ"
            ax.set_title(label, fontsize=7)
            ax.set(xlim=(-3.2, 3.2), ylim=(-3.2, 3.2), xticks=[], yticks=[], aspect="equal")
        for ax in row[len(panels) :]:
            ax.axis("off")
    fig.suptitle(f"{d['sizes']['kimg']:g} kimg per run, seed {d['sizes']['seeds'][0]} (red: EMA student)", fontsize=9)
    fig.tight_layout()
    sweeprun.save_figure(fig, path)
    plt.close(fig)


def plot_curves(d: dict, path: Path) -> None:
    """Modes covered and within 3 sigma versus images seen: mean and min/max band over seeds, a row per teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import sweeprun

    rows = d.get("summary") or summarise(d)
    teachers = list(dict.fromkeys(r["teacher"] for r in rows)) or ["none"]
    fig, axes = plt.subplots(len(teachers), 2, figsize=(12, 3.8 * len(teachers)), dpi=80, squeeze=False)
    for ax_row, t in zip(axes, teachers, strict=True):
        for r in (r for r in rows if r["teacher"] == t and not r["alias_of"]):
            for ax, key in zip(ax_row, ("modes_covered_band", "within_3sigma_band"), strict=True):
                b = r[key]
                label = f"{r['label']} ({common.count(len(r['seeds']), 'seed')})"
                (line,) = ax.plot(b["kimg"], b["mean"], marker=".", label=label)
                if len(r["seeds"]) > 1:
                    ax.fill_between(b["kimg"], b["min"], b["max"], color=line.get_color(), alpha=0.15)
        ax_row[0].set_ylabel(f"{t}: modes covered")
        ax_row[1].set_ylabel("fraction within 3σ of a mode")
        for ax in ax_row:
            ax.set_xlabel("kimg (generator images seen / 1000)")
    if axes[0][1].get_legend_handles_labels()[0]:  # nothing to name when no run has finished yet
        axes[0][1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    sweeprun.save_figure(fig, path)
    plt.close(fig)


# ---- BENCHMARKS.md section ------------------------------------------------------------------------------
def overrides(d: dict) -> str:
    """A variant's `--set` overrides as `key=value` in code spans ("" for the sweep itself)."""
    return ", ".join(f"`{k}={v}`" for k, v in (d.get("set") or {}).items())


def variant(d: dict) -> str:
    """Empty for the sweep itself; for a variant (`gmm_sweep_TAG.json`) its overrides, or its tag when it has none."""
    if d.get("benchmark", "gmm_sweep") == "gmm_sweep":
        return ""
    return overrides(d) or d["benchmark"].removeprefix("gmm_sweep_")


def title(d: dict) -> str:
    """The section heading: the sweep's, or a variant's with its overrides."""
    return f"{TITLE}: {variant(d)}" if variant(d) else TITLE


def render(d: dict, all_data: dict) -> str:
    f, s = common.fmt, d["sizes"]
    rows = d.get("summary") or summarise(d)
    seeds = s.get("seeds", [d.get("seed")])
    lines = [
        f"## {title(d)}",
        "",
        common.header_line(d),
        "",
        f"Every objective trained for {f(s['kimg'], 4)} kimg (images seen per run: "
        f"{sorted({r['images_seen'] for r in d['runs']})}), batch {s['batch']}, seeds {seeds}, all other settings "
        f"from the `gmm` preset (in the JSON; the preset's own length is {f(d.get('preset_total_kimg'), 5)} kimg). "
        "Metrics of the EMA student's samples; numbers are mean [min, max] over seeds. MMD² at floor: seeds whose "
        "MMD² lies within 3 std of the exact-vs-exact noise floor. ESS/batch, weight max and discriminator "
        "accuracy: each run's mean over the second half of training (the last logged value in older results).",
        "",
    ]
    for teacher in dict.fromkeys(r["teacher"] for r in rows):
        lines += teacher_section(d, teacher, [r for r in rows if r["teacher"] == teacher])
    lines += proportional(d) + aliases(d) + missing(d)
    for r in (r for r in rows if r.get("failed_seeds")):
        lines += [f"`{r['teacher']}` `{r['label']}` diverged with seeds {r['failed_seeds']}: left out.", ""]
    for name, plot in zip(("GMM samples", "GMM curves"), d.get("plots", []), strict=False):
        lines += [f"![{name}]({plot})", ""]
    return "\n".join(lines)


def teacher_section(d: dict, teacher: str, rows: list[dict]) -> list[str]:
    f, fs = common.fmt, ss.fmt_stat
    m0 = next(r["metrics"] for r in d["runs"] if teacher_of(d, r) == teacher)
    body = [
        [f"`{r['label']}`" + (f" (= `{r['alias_of']}`)" if r["alias_of"] else ""), f"`{r['weight']}`",
         len(r["seeds"]), f"{fs(r['modes_covered'])} of {r['num_modes']}", fs(r["within_3sigma"]),
         fs(r["mode_tv"]), fs(r["mmd2"]), f"{r['at_floor']}/{len(r['seeds'])}", fs(r["ess_frac"]),
         fs(r["weight_max"]), fs(r["disc_acc"]), r["bad_steps"], f(r["wall_sec"], 4)]
        for r in rows
    ]  # fmt: skip
    head = ["objective", "weight(l)", "seeds", "modes", "within 3σ", "mode TV", "MMD²", "MMD² at floor",
            "ESS/batch", "weight max", "disc. acc.", "skipped steps", "wall s (all seeds)"]  # fmt: skip
    return [
        f"### `{teacher}`",
        "",
        f"Exact-sampler references at n={f(m0.get('n_samples'))}: within 3σ {f(m0.get('within_3sigma_exact'))} "
        f"(χ² value {f(m0.get('within_3sigma_chi2'))}), modes {f(m0.get('modes_covered_exact'))}/"
        f"{f(m0.get('num_modes'))}, mode TV {f(m0.get('mode_tv_exact'))}; MMD² floor {f(m0.get('mmd2_floor'), 3)} "
        f"± {f(m0.get('mmd2_floor_std'), 3)} (on n={f(m0.get('n_kernel'))}).",
        "",
        *common.table(head, body),
        "",
    ]


def proportional(d: dict) -> list[str]:
    """The groups of objectives with proportional weights and their MMD²: a measured noise level."""
    groups = d.get("proportional_weights", [])
    if not groups:
        return []
    mmd: dict = {}
    for r in d["runs"]:
        mmd.setdefault((teacher_of(d, r), r["label"]), []).append(r["metrics"]["mmd2"])
    norm = d["preset"]["divergence"]["normalize"]
    lines = [
        f"Objectives with proportional weights (identical after the `{norm}` normalisation, so their runs "
        "differ at most by floating-point rounding amplified by training; where their numbers differ, that "
        "spread is a noise level for the table):"
        if norm != "none"
        else "Objectives with proportional weights (no normalisation: the factor scales the step size):",
        "",
    ]
    for teacher in dict.fromkeys(teacher_of(d, r) for r in d["runs"]):
        for g in groups:
            vals = " / ".join(ss.fmt_stat(ss.stat(mmd[teacher, x])) for x in g if (teacher, x) in mmd)
            lines.append(f"- `{teacher}`: {', '.join(f'`{x}`' for x in g)}: MMD² {vals}")
    return [*lines, ""]


def aliases(d: dict) -> list[str]:
    return [
        f"`{a}` has the same Bregman weight as `{src}`, bitwise (so the same training): its runs are `{src}`'s.\n"
        for a, src in (d.get("aliases") or {}).items()
    ]


def missing(d: dict) -> list[str]:
    miss = d.get("missing") or []
    if not miss:
        return []
    return [common.unfinished(miss, ("teacher", "label"), d.get("aliases")), ""]


__all__ = ["TITLE", "METRICS", "summarise", "plot_all", "render", "title", "variant", "overrides", "at_floor"]
