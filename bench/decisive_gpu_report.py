"""The decisive comparison's numbers over seeds, its figure and its Markdown, all from `decisive_gpu.json`
(`summarise`, `plot_all`, `render`; `decisive_gpu.py` plans, trains and writes the JSON).

A setting is (design, batch, objective); its final FID (MNIST features, n = 2000 against the 10k test set) is
the mean with the [min, max] over seeds. The winner of a design and batch is the objective whose seed range lies
wholly below the other's; overlapping ranges are a "tie" (`seedstats.compare`).
"""

from __future__ import annotations

from pathlib import Path

import common
import seedstats as ss
import sweeprun

TITLE = "Decisive comparison at larger batch: reverse KL vs SBA(λ=5), paper design and tuned design"
VERDICT = {ss.BETTER: "first", ss.WORSE: "second", ss.TIE: "tie"}  # seedstats' word -> who wins


def _final(r: dict, net: str):
    return ((r.get("final") or {}).get(net) or {}).get("fid")


def _row(d: dict, design: dict, batch: int, label: str) -> dict:
    every = [r for r in d["runs"] if (r["design"], r["batch"], r["label"]) == (design["key"], batch, label)]
    rs = [r for r in every if not r.get("failed")]  # a diverged run stopped early: not at equal images
    curves = [[(c["kimg"], c["fid"]) for c in r.get("curve", []) if c.get("fid") is not None] for r in rs]
    x, mean, lo, hi = ss.band([c for c in curves if c])
    return {
        "design": design["key"], "design_label": design["label"], "batch": batch, "label": label,
        "seeds": [r["seed"] for r in rs], "failed_seeds": [r["seed"] for r in every if r.get("failed")],
        "fid": ss.stat(_final(r, "mnist_features") for r in rs),
        "inception_fid": ss.stat(_final(r, "inception") for r in rs),
        "images_seen": ss.stat(r.get("images_seen") for r in rs),
        "train_sec": ss.stat(r.get("train_sec") for r in rs),
        "bad_steps": sum(r.get("bad_steps", 0) for r in every),
        "fid_band": {"kimg": x, "mean": mean, "min": lo, "max": hi},
    }  # fmt: skip


def summarise(d: dict) -> dict:
    """Rows per (design, batch, objective) and the verdict per (design, batch) on the final FID."""
    first, second = d["objectives"]
    rows, verdicts = [], []
    for design in d["designs"]:
        for b in d["sizes"]["batches"]:
            pair = [_row(d, design, b, label) for label in (first, second)]
            rows += pair
            said = ss.compare(pair[0]["fid"], pair[1]["fid"])
            who = VERDICT.get(said)
            winner = {"first": first, "second": second, "tie": "tie"}.get(who, said)
            verdicts.append({"design": design["key"], "design_label": design["label"], "batch": b, "winner": winner,
                             "compare": said, first: pair[0]["fid"], second: pair[1]["fid"]})  # fmt: skip
    images = {r["images_seen"]["min"] for r in rows if r["images_seen"]} | {
        r["images_seen"]["max"] for r in rows if r["images_seen"]
    }
    return {"rows": rows, "verdicts": verdicts, "images_per_run": sorted(images)}


# ---- figure -----------------------------------------------------------------------------------------------------
def plot_all(d: dict, out: Path) -> list[str]:
    """`decisive_gpu.png`: in-loop FID versus images with the min/max band over seeds, one panel per design and
    batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dz, batches = d["designs"], d["sizes"]["batches"]
    fig, axes = plt.subplots(len(dz), len(batches), figsize=(5 * len(batches), 3.8 * len(dz)), squeeze=False)
    rows = {(r["design"], r["batch"], r["label"]): r for r in d["summary"]["rows"]}
    for i, design in enumerate(dz):
        for j, b in enumerate(batches):
            ax = axes[i][j]
            ax.set(title=f"{design['label']}, batch {b}", xlabel="kimg (generator images seen / 1000)")
            ax.set_ylabel(f"FID, MNIST features (n={d['sizes']['n_fid_loop']})")
            for label in d["objectives"]:
                band = rows[(design["key"], b, label)]["fid_band"]
                if not band["kimg"]:
                    continue
                n = len(rows[(design["key"], b, label)]["seeds"])
                (line,) = ax.plot(band["kimg"], band["mean"], marker=".", label=f"{label} ({common.count(n, 'seed')})")
                if n > 1:
                    ax.fill_between(band["kimg"], band["min"], band["max"], color=line.get_color(), alpha=0.2)
            if ax.get_legend_handles_labels()[0]:
                ax.set_yscale("log")
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "no finished run", ha="center", transform=ax.transAxes)
    m = d["machine"]
    fig.suptitle(f"MNIST one-step students, {d['plan']['images_per_run']} images per run, mean and min/max over "
                 f"seeds ({m.get('gpu', m['device'])})", fontsize=10)  # fmt: skip
    fig.tight_layout()
    path = Path(out) / "decisive_gpu.png"
    sweeprun.save_figure(fig, path)
    plt.close(fig)
    return [path.name]


# ---- Markdown ---------------------------------------------------------------------------------------------------
def render(d: dict, all_data: dict) -> str:
    lines = [f"## {TITLE}", "", common.header_line(d), "", setup_text(d), ""]
    lines += result_table(d) + [""] + verdict_table(d) + [""] + notes(d)
    if d.get("plots"):
        lines += [f"![In-loop FID versus images, per design and batch]({d['plots'][0]})", ""]
    return "\n".join(lines)


def setup_text(d: dict) -> str:
    f, s, p, m = common.fmt, d["sizes"], d["plan"], d["machine"]
    n = p["images_per_run"]
    steps = ", ".join(f"{common.count(n // b, 'step')} at batch {b}" for b in s["batches"])
    designs = "; ".join(f"**{x['label']}**" + (f": {x['note']}" if x.get("note") else "") for x in d["designs"])
    inc = f"Inception FID at n={p['n_inception']}" if p.get("n_inception") else "no Inception FID"
    text = (
        f"Device **{m.get('gpu', m['device'])}**, wall time {f(d['wall_sec'], 4)} s of a {f(s['budget_s'], 4)} s "
        f"budget. **Every run saw {n} training images** ({f(n / 1000, 4)} kimg: {steps}); plan: {p['source']}. "
        f"Designs: {designs}. Objectives {', '.join(f'`{x}`' for x in d['objectives'])}, seeds {s['seeds']}, "
        f"teacher `{d['teacher']['path']}` (sha256 {d['teacher'].get('sha256')}). Reference: {d['reference']}. "
        f"In-loop FID (MNIST features, n={s['n_fid_loop']}) at kimg 0 and {common.count(s['points'], 'point')}; "
        f"final FID at n={s['n_fid']}; {inc}. Numbers are mean [min, max] over seeds."
    )
    probe = p.get("probe")
    if probe:
        per = ", ".join(f"{k} {f(v * 1e6, 3)} µs" for k, v in _per_config(probe["sec_per_image"]).items())
        text += (
            f"\n\nProbe ({common.count(probe['steps'], 'timed step')} after {probe['warmup_steps']} warm-up, per "
            "config): training "
            f"time per image {per}; per run {f(p['overhead_s_per_run'], 3)} s besides training (build "
            f"{f(probe['build_s'], 3)} s, in-loop FID {f(probe['loop_eval_s'], 3)} s, checkpoint "
            f"{f(probe['ckpt_s'], 3)} s, final evaluation {f(probe['final_eval_s'], 3)} s, Inception "
            f"{f(probe['inception_s'], 3)} s). Predicted {f(p['predicted_s'], 4)} s for all runs against "
            f"{f(p['available_s'], 4)} s available"
            + (" (over budget even at one unit)" if p["over_budget"] else "")
            + (" (capped by --max-kimg / --quick)" if p["capped"] else "")
            + "."
        )
    return text


def _per_config(sec_per_image: dict) -> dict:
    """{"design/bB/label": s} -> {"design/bB": s} where the objectives share one config (one probe), else as is."""
    groups: dict[str, dict] = {}
    for key, v in sec_per_image.items():
        groups.setdefault(key.rsplit("/", 1)[0], {})[key] = v
    out = {}
    for prefix, g in groups.items():
        out.update({prefix: next(iter(g.values()))} if len(set(g.values())) == 1 else g)
    return out


def result_table(d: dict) -> list[str]:
    s, fs = d["sizes"], ss.fmt_stat
    head = ["design", "batch", "objective", "seeds", f"final FID (n={s['n_fid']})", "Inception FID",
            "images per run", "train s per run", "skipped steps"]  # fmt: skip
    body = [
        [r["design_label"], r["batch"], f"`{r['label']}`", len(r["seeds"]), fs(r["fid"], 4),
         fs(r["inception_fid"], 4), fs(r["images_seen"], 6), fs(r["train_sec"]), r["bad_steps"]]
        for r in d["summary"]["rows"]
    ]  # fmt: skip
    return ["Final metrics of the EMA students (mean [min, max] over seeds):", "", *common.table(head, body)]


def verdict_table(d: dict) -> list[str]:
    first, second = d["objectives"]
    head = ["design", "batch", f"`{first}` FID", f"`{second}` FID", "winner"]
    body = [
        [v["design_label"], v["batch"], ss.fmt_stat(v[first], 4), ss.fmt_stat(v[second], 4), f"**{v['winner']}**"]
        for v in d["summary"]["verdicts"]
    ]
    text = "Which objective wins (final FID; a winner only where the seed ranges do not overlap, else tie):"
    return [text, "", *common.table(head, body)]


def notes(d: dict) -> list[str]:
    out = []
    if not d["tuning_file"]["found"]:
        out.append(f"No tuning file: `{d['tuning_file']['path']}` was not found, so design (b) is the plain recipe.")
    for r in d["summary"]["rows"]:
        if r["failed_seeds"]:
            out.append(f"{r['design_label']}, batch {r['batch']}, `{r['label']}` diverged with seeds "
                       f"{r['failed_seeds']}: left out.")  # fmt: skip
    if d.get("missing"):
        out.append(common.unfinished(d["missing"], ("design", "batch", "label")))
    if d.get("not_started"):
        out.append(f"{common.count(len(d['not_started']), 'run')} not started within the budget: run the same "
                   "command again to continue (the plan and the finished runs are reused).")  # fmt: skip
    if d["plan"].get("inception_dropped"):
        out.append(d["plan"]["inception_dropped"])
    if d.get("inception_skipped"):
        out.append(f"Inception FID skipped: {d['inception_skipped']}")
    return [x for line in out for x in (line, "")]
