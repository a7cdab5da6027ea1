"""The MNIST sweep's numbers over seeds, its figures and its BENCHMARKS.md section, all from `mnist_sweep.json`
(`summarise`, `plot_all`, `render`; `mnist_sweep.py` trains and writes the JSON).

Reads the current JSON (runs with seeds, a teacher row, a target) and the single-seed one written before it
(no seeds, no teacher row): a missing number reads as n/a.
"""

from __future__ import annotations

import json
from pathlib import Path

import common
import seedstats as ss

TITLE = "MNIST objective sweep: Figure 4 with seeds (FID versus images seen)"
LOOSE = 2.0  # the second "kimg to reach" target: this multiple of the teacher's FID (the first is the FID itself)


def teacher_from_quality(out: Path, teacher: dict) -> dict | None:
    """The teacher row from `<out>/teacher_quality.json` (Heun at its largest NFE) when it measured the same
    teacher file; its n is its own (`final.n_samples`)."""
    path = Path(out) / "teacher_quality.json"
    if not path.is_file():
        return None
    tq = json.loads(path.read_text())
    if tq["teacher"].get("sha256") != teacher.get("sha256"):
        return None
    rows = [r for r in tq["rows"] if r["sampler"] == "heun"]
    if not rows:
        return None
    row = max(rows, key=lambda r: r["nfe"])
    m = row["mnist_features"]
    n = m["n_samples"]
    return {"source": "teacher_quality.json", "sampler": "heun", "nfe": row["nfe"], "final": m, "loop_n": n}


def target(given: float | None, teacher: dict | None, n_loop: int) -> dict | None:
    """The FID target of "kimg to reach": --target-fid, else the teacher's FID at the in-loop n (from this sweep,
    or from teacher_quality.json when it measured at that n); None when neither exists."""
    if given is not None:
        return {"fid": given, "source": "--target-fid", "n": n_loop}
    if not teacher:
        return None
    if "loop" in teacher:
        return {"fid": teacher["loop"]["fid"], "source": f"teacher, Heun {teacher['nfe']}", "n": n_loop}
    if teacher.get("loop_n") == n_loop:
        return {"fid": teacher["final"]["fid"], "source": "teacher_quality.json", "n": n_loop}
    return None


def _curves(runs: list[dict], key: str) -> list[list[tuple[float, float]]]:
    curves = [[(c["kimg"], c[key]) for c in r.get("curve", []) if c.get(key) is not None] for r in runs]
    return [c for c in curves if c]


def _final(r: dict, net: str, key: str):
    return (r.get("final", {}).get(net) or {}).get(key)


def _weight(r: dict, name: str):
    """A run's weight statistic: the second-half mean where logged, else the last value (older JSON)."""
    v = r.get(f"{name}_half")
    return v if v is not None else r.get(f"{name}_last")


def summarise(d: dict) -> list[dict]:
    """Per objective (JSON order): FID / score bands over seeds, FID at equal images, kimg to the target, the
    final metrics and the weight statistics as mean [min, max] over seeds."""
    goal = (d.get("target") or {}).get("fid")
    loose = goal * LOOSE if goal is not None else None
    labels = list(dict.fromkeys(r["label"] for r in d["runs"]))
    rows = []
    for label in labels:
        every = [r for r in d["runs"] if r["label"] == label]
        rs = [r for r in every if not r.get("failed")]  # a diverged run stopped early: not at equal images
        fid, sc = _curves(rs, "fid"), _curves(rs, "score")
        x, mean, lo, hi = ss.band(fid)
        sx, smean, slo, shi = ss.band(sc)
        rows.append(
            {
                "label": label,
                "weight": every[0].get("weight"),
                "alias_of": every[0].get("alias_of"),
                "seeds": [r.get("seed", d.get("seed")) for r in rs],
                "failed_seeds": [r.get("seed") for r in every if r.get("failed")],
                "images_seen": ss.stat(r.get("images_seen") for r in rs),
                "fid_band": {"kimg": x, "mean": mean, "min": lo, "max": hi},
                "score_band": {"kimg": sx, "mean": smean, "min": slo, "max": shi},
                "fid_at": [{"kimg": k, "fid": ss.stat_at(fid, k)} for k in ss.checkpoints([k for k in x if k > 0])],
                "reach": ss.reach(fid, goal),
                "reach_loose": ss.reach(fid, loose),
                "final_fid": ss.stat(_final(r, "mnist_features", "fid") for r in rs),
                "kid": ss.stat(_final(r, "mnist_features", "kid") for r in rs),
                "precision": ss.stat(_final(r, "mnist_features", "precision") for r in rs),
                "recall": ss.stat(_final(r, "mnist_features", "recall") for r in rs),
                "classifier_score": ss.stat(_final(r, "mnist_features", "classifier_score") for r in rs),
                "inception_fid": ss.stat(_final(r, "inception", "fid") for r in rs),
                "ess_frac": ss.stat(_weight(r, "ess_frac") for r in rs),
                "weight_max": ss.stat(_weight(r, "weight_max") for r in rs),
                "disc_acc": ss.stat(_weight(r, "disc_acc") for r in rs),
                "bad_steps": sum(r.get("bad_steps", 0) for r in every),
                "train_sec": ss.stat(r.get("train_sec") for r in rs),
            }
        )
    return rows


# ---- figures --------------------------------------------------------------------------------------------
def plot_all(d: dict, out: Path, device) -> list[str]:
    """`mnist_sweep.png` (bands) and, where exports exist, `mnist_sweep_samples.png`; their file names."""
    names = ["mnist_sweep.png"]
    plot_curves(d, Path(out) / names[0])
    if plot_samples(d, Path(out) / "mnist_sweep_samples.png", device):
        names.append("mnist_sweep_samples.png")
    return names


def plot_curves(d: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import sweeprun

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=90)
    for row in d.get("summary") or summarise(d):
        for ax, band in zip(axes, (row["fid_band"], row["score_band"]), strict=True):
            if not band["kimg"]:
                continue
            n, alias = len(row["seeds"]), row["alias_of"]
            label = f"{row['label']} ({common.count(n, 'seed')})" if not alias else f"{row['label']} (= {alias})"
            (line,) = ax.plot(band["kimg"], band["mean"], ":" if alias else "-", marker=".", label=label)
            if n > 1 and not alias:
                ax.fill_between(band["kimg"], band["min"], band["max"], color=line.get_color(), alpha=0.15)
    t, s = d.get("teacher_scores") or {}, d["sizes"]
    if "loop" in t:
        axes[0].axhline(t["loop"]["fid"], color="k", ls="--", lw=1, label=f"teacher, Heun {t['nfe']}")
        axes[1].axhline(t["loop"]["classifier_score"], color="k", ls="--", lw=1)
    axes[0].set_yscale("log")
    axes[0].set_ylabel(f"FID, MNIST features (n={s['n_fid_loop']} vs test set)")
    axes[1].set_ylabel(f"classifier score (n={s['n_fid_loop']}, 1 split; at most 10)")
    for ax in axes:
        ax.set_xlabel("kimg (generator images seen / 1000)")
    if axes[0].get_legend_handles_labels()[0]:  # nothing to name when no run has finished yet
        axes[0].legend(fontsize=7)
    fig.suptitle(f"MNIST one-step distillation: mean and min/max over seeds, batch {s.get('batch')}", fontsize=10)
    fig.tight_layout()
    sweeprun.save_figure(fig, path)
    plt.close(fig)


def plot_samples(d: dict, path: Path, device) -> bool:
    """16 samples of each objective's first-seed EMA generator (its export in the run folder); False if none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import sweeprun
    from dibregman.generators import generate, load_generator
    from dibregman.viz import image_grid

    rows = []
    for label in dict.fromkeys(r["label"] for r in d["runs"]):
        r = next(r for r in d["runs"] if r["label"] == label)
        if r.get("run_dir") and (Path(r["run_dir"]) / "generator.safetensors").is_file():
            gen, _ = load_generator(r["run_dir"], device=device)
            rows.append((label, generate(gen, 16, seed=30_000, device=device)))
    if not rows:
        return False
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 0.75 * len(rows) + 0.3), dpi=100, squeeze=False)
    for ax, (label, x) in zip(axes[:, 0], rows, strict=True):
        ax.imshow(image_grid(x, ncol=16)[..., 0], cmap="gray", vmin=0, vmax=255)
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    sweeprun.save_figure(fig, path)
    plt.close(fig)
    return True


# ---- BENCHMARKS.md section ------------------------------------------------------------------------------
def render(d: dict, all_data: dict) -> str:
    rows = d.get("summary") or summarise(d)
    lines = [f"## {TITLE}", "", common.header_line(d), "", setup_text(d), ""]
    lines += curve_table(d, rows) + [""] + final_table(d, rows) + [""] + notes(d, rows, all_data)
    plots = d.get("plots", [])
    lines += [f"![MNIST FID and classifier score over seeds]({plots[0]})", ""] if plots else []
    lines += [f"![MNIST samples, first seed]({plots[1]})", ""] if len(plots) > 1 else []
    return "\n".join(lines)


def setup_text(d: dict) -> str:
    f, s, t = common.fmt, d["sizes"], d["teacher"]
    seeds = s.get("seeds", [d.get("seed")])
    recipe = ", ".join(f"`{k}={v}`" for k, v in (d.get("recipe") or {}).items())
    recipe = f" with the recipe {recipe}" if recipe else ""
    n_inc = s.get("n_inception")
    inception = (
        f"Inception FID of the first n={n_inc} against as many reference images" if n_inc else "no Inception FID"
    )
    return (
        f"Teacher `{t['path']}` (sha256 {t.get('sha256')}, trained on {t.get('num_images')} images); every "
        f"objective {f(s['kimg'], 4)} kimg at batch {s.get('batch')}, seeds {seeds}; the `mnist` preset{recipe} "
        f"(full config in the JSON). Reference: {d['reference']}. In-loop (every "
        f"{f(s['fid_every_kimg'], 4)} kimg, n={s['n_fid_loop']}, kimg 0 = the initial generator): FID of the EMA "
        f"generator with the MNIST feature net and its classifier score exp(E KL(p(y|x) || p(y))) (one split). "
        f"Final: n={s['n_fid']} samples (classifier score over 10 splits); {inception}. Numbers are mean "
        "[min, max] over seeds."
    )


def curve_table(d: dict, rows: list[dict]) -> list[str]:
    s, goal = d["sizes"], d.get("target")
    points = sorted({p["kimg"] for r in rows for p in r["fid_at"]})
    head = ["objective", "weight(l)", "seeds", *(f"FID at {common.fmt(k, 4)} kimg" for k in points)]
    if goal:
        head += [f"kimg to FID ≤ {common.fmt(goal['fid'], 4)}", f"kimg to FID ≤ {common.fmt(goal['fid'] * LOOSE, 4)}"]
    else:
        head.append("kimg to target")
    body = []
    for r in rows:
        at = {p["kimg"]: p["fid"] for p in r["fid_at"]}
        body.append([_name(r), f"`{r['weight']}`", len(r["seeds"]), *(ss.fmt_stat(at.get(k), 4) for k in points)])
        body[-1].append(ss.fmt_reach(r["reach"]))
        if goal:
            body[-1].append(ss.fmt_reach(r.get("reach_loose")))
    t = d.get("teacher_scores") or {}
    if "loop" in t:
        cells = [common.fmt(t["loop"]["fid"], 4) for _ in points]
        body.append([f"teacher (Heun {t['nfe']})", "", "", *cells, *[""] * (len(head) - 3 - len(cells))])
    title = f"In-loop FID (MNIST features, n={s['n_fid_loop']}) at equal images:"
    return [title, "", *common.table(head, body)]


def final_table(d: dict, rows: list[dict]) -> list[str]:
    s, fs = d["sizes"], ss.fmt_stat
    head = ["objective", f"final FID (n={s['n_fid']})", "KID", "precision", "recall", "classifier score",
            "Inception FID", "ESS/batch", "weight max", "disc. acc.", "skipped steps"]  # fmt: skip
    body = [
        [_name(r), fs(r["final_fid"], 4), fs(r["kid"]), fs(r["precision"]), fs(r["recall"]),
         fs(r["classifier_score"], 4), fs(r["inception_fid"], 4), fs(r["ess_frac"]), fs(r["weight_max"]),
         fs(r["disc_acc"]), r["bad_steps"]]
        for r in rows
    ]  # fmt: skip
    t = (d.get("teacher_scores") or {}).get("final")
    if t:
        cells = [common.fmt(t.get(k), 4 if k == "fid" else 3) for k in ("fid", "kid", "precision", "recall")]
        body.append([f"teacher (Heun {d['teacher_scores']['nfe']}, n={t.get('n_samples')})", *cells,
                     common.fmt(t.get("classifier_score"), 4), "", "", "", "", ""])  # fmt: skip
    text = (
        "Final metrics; ESS/batch, weight max and discriminator accuracy are each run's mean over the second half "
        "of training (its last logged value in older results), then mean [min, max] over seeds:"
    )
    return [text, "", *common.table(head, body)]


def _name(r: dict) -> str:
    return f"`{r['label']}`" + (f" (= `{r['alias_of']}`)" if r.get("alias_of") else "")


def notes(d: dict, rows: list[dict], all_data: dict) -> list[str]:
    out = []
    for label, src in (d.get("aliases") or {}).items():
        out.append(
            f"`{label}` has the same Bregman weight as `{src}`, bitwise (so the same training): its runs are "
            f"`{src}`'s, shown under both names."
        )
    goal = d.get("target")
    if goal:
        out.append(
            f"Target FID {common.fmt(goal['fid'], 4)} (n={goal['n']}) from {goal['source']}, and {LOOSE:g}× it "
            f"({common.fmt(goal['fid'] * LOOSE, 4)}): a looser target that counts the images an objective needs where "
            "the first is out of reach."
        )
    elif rows:
        out.append("No target FID: no teacher FID at the in-loop n (pass --target-fid or --teacher-nfe).")
    t = d.get("teacher_scores")
    if t and t.get("source") == "teacher_quality.json":
        out.append(f"Teacher row from teacher_quality.json (n={t['final'].get('n_samples')}): compare at equal n only.")
    for r in rows:
        if r.get("failed_seeds"):
            out.append(f"`{r['label']}` diverged (non-finite steps in a row) with seeds {r['failed_seeds']}: left out.")
    missing = d.get("missing") or []
    if missing:
        out.append(common.unfinished(missing, ("label",), d.get("aliases")))
    if d.get("inception_skipped"):
        out.append(f"Inception FID skipped: {d['inception_skipped']}")
    if "teacher_scores" not in d:  # the single-seed JSON written before this sweep: its teacher line
        out += legacy_teacher(d, all_data)
    return [x for line in out for x in (line, "")]


def legacy_teacher(d: dict, all_data: dict) -> list[str]:
    """The teacher line of the single-seed JSON: teacher_quality.json's Heun row when it measured the same file."""
    tq = all_data.get("teacher_quality")
    if not tq or tq["teacher"].get("sha256") != d["teacher"].get("sha256"):
        return []
    row = max((r for r in tq["rows"] if r["sampler"] == "heun"), key=lambda r: r["nfe"], default=None)
    if row is None:
        return []
    m = row["mnist_features"]
    return [f"Teacher (teacher_quality.json): Heun {row['nfe']}, FID {common.fmt(m['fid'], 4)} (n={m['n_samples']})."]
