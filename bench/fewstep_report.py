"""The few-step benchmark's numbers over seeds, its figures and its Markdown section, all from `fewstep.json`
(`teacher_curve`, `summarise`, `plot_all`, `render`; `fewstep.py` trains and writes the JSON).

A student of K steps costs K network evaluations (NFE = K); the teacher's points are its sampler's evaluations
(Heun with N intervals: 2N - 1) from `teacher_quality.json`, when that file measured the same teacher file.
"""

from __future__ import annotations

import json
from pathlib import Path

import common
import seedstats as ss
import sweeprun

TITLE = "Few-step students: quality versus steps"
GOAL_NFE = 35  # the goal: the 4-step student at least as good as the teacher's Heun-35 on both feature sets


def teacher_curve(out: Path, teacher: dict) -> list[dict]:
    """The teacher's FID-versus-NFE rows of `<out>/teacher_quality.json` ([] when absent or another teacher file)."""
    path = Path(out) / "teacher_quality.json"
    if not path.is_file():
        return []
    tq = json.loads(path.read_text())
    if tq.get("teacher", {}).get("sha256") != teacher.get("sha256"):
        return []
    rows = []
    for r in sorted(tq["rows"], key=lambda r: (r["sampler"], r["nfe"])):
        m, inc = r.get("mnist_features") or {}, r.get("inception") or {}
        rows.append({"sampler": r["sampler"], "nfe": r["nfe"], "fid": m.get("fid"), "n": m.get("n_samples"),
                     "inception_fid": inc.get("fid"), "n_inception": inc.get("n_samples"),
                     "img_per_sec": r.get("img_per_sec")})  # fmt: skip
    return rows


def _mnist_rows(runs: list[dict]) -> list[dict]:
    rows = []
    for label in dict.fromkeys(r["label"] for r in runs):
        every = [r for r in runs if r["label"] == label]
        rs = [r for r in every if not r.get("failed")]
        fin = [r["final"] for r in rs]
        rows.append({
            "label": label, "steps": every[0]["steps_k"], "inputs": every[0]["inputs"], "sigmas": every[0]["sigmas"],
            "seeds": [r["seed"] for r in rs], "failed_seeds": [r["seed"] for r in every if r.get("failed")],
            "fid": ss.stat(f["mnist_features"].get("fid") for f in fin),
            "n_fid": fin[0]["mnist_features"].get("n_samples") if fin else None,
            "inception_fid": ss.stat((f.get("inception_full") or {}).get("fid") for f in fin),
            "n_inception": (fin[0].get("inception_full") or {}).get("n_samples") if fin else None,
            "classifier_score": ss.stat(f["mnist_features"].get("classifier_score") for f in fin),
            "precision": ss.stat(f["mnist_features"].get("precision") for f in fin),
            "recall": ss.stat(f["mnist_features"].get("recall") for f in fin),
            "train_sec": ss.stat(r.get("train_sec") for r in rs),
            "images_seen": ss.stat(r.get("images_seen") for r in rs),
        })  # fmt: skip
    return rows


def _gmm_rows(runs: list[dict]) -> list[dict]:
    rows = []
    for teacher, label in dict.fromkeys((r["teacher"], r["label"]) for r in runs):
        rs = [r for r in runs if r["teacher"] == teacher and r["label"] == label and not r.get("failed")]
        ms = [r["metrics"] for r in rs]
        first = next(r for r in runs if r["teacher"] == teacher and r["label"] == label)
        row = {"teacher": teacher, "label": label, "steps": first["steps_k"], "inputs": first["inputs"],
               "sigmas": first["sigmas"], "seeds": [r["seed"] for r in rs], "num_modes": first["metrics"]["num_modes"],
               "wall_sec": ss.stat(r.get("wall_sec") for r in rs)}  # fmt: skip
        for key in ("modes_covered", "within_3sigma", "mode_tv", "mmd2", "mmd2_floor"):
            row[key] = ss.stat(m.get(key) for m in ms)
        rows.append(row)
    return rows


def goal(d: dict, rows: list[dict]) -> dict | None:
    """Is each 4-step setting at least as good as the teacher's Heun-35 on both feature sets (mean over seeds)?"""
    ref = next((r for r in d.get("teacher_curve", []) if r["sampler"] == "heun" and r["nfe"] == GOAL_NFE), None)
    four = [r for r in rows if r["steps"] == 4]
    if ref is None or not four:
        return None
    out = {"teacher_fid": ref["fid"], "teacher_inception_fid": ref["inception_fid"], "settings": {}}
    for r in four:
        fid, inc = (r["fid"] or {}).get("mean"), (r["inception_fid"] or {}).get("mean")
        met = None if fid is None or inc is None or ref["inception_fid"] is None else (
            fid <= ref["fid"] and inc <= ref["inception_fid"])  # fmt: skip
        out["settings"][r["label"]] = met
    return out


def summarise(d: dict) -> dict:
    out = {}
    if "mnist" in d:
        out["mnist"] = _mnist_rows(d["mnist"]["runs"])
        out["goal"] = goal(d, out["mnist"])
    if "gmm" in d:
        out["gmm"] = _gmm_rows(d["gmm"]["runs"])
    return out


# ---- figures ----------------------------------------------------------------------------------------------------
def _lines(rows: list[dict], key: str) -> dict[str, list]:
    """{training input: [(K, stat)]} with the K = 1 point (no inputs to choose) on every line."""
    ones = [r for r in rows if r["steps"] == 1 and r.get(key)]
    modes = list(dict.fromkeys(r["inputs"] for r in rows if r["steps"] > 1)) or [r["inputs"] for r in ones[:1]]
    return {m: sorted([(r["steps"], r[key]) for r in rows if r.get(key) and (r["steps"] == 1 or r["inputs"] == m)],
                      key=lambda p: p[0]) for m in modes}  # fmt: skip


def plot_all(d: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    names = []
    if d["summary"].get("mnist"):
        names.append(plot_mnist(d, Path(out) / "fewstep.png"))
    if d["summary"].get("gmm"):
        names.append(plot_gmm(d, Path(out) / "fewstep_gmm.png"))
    return names


def plot_mnist(d: dict, path: Path) -> str:
    import matplotlib.pyplot as plt

    rows = d["summary"]["mnist"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "fid", "FID, MNIST features"), (axes[1], "inception_fid", "Inception FID")):
        ax.set(xlabel="network evaluations (NFE)", ylabel=title, title=title)
        if not any(r.get(key) for r in rows):
            ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
            continue
        for sampler in dict.fromkeys(r["sampler"] for r in d.get("teacher_curve", [])):
            pts = [(r["nfe"], r[key]) for r in d["teacher_curve"] if r["sampler"] == sampler and r[key] is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), "k--o", label=f"teacher ({sampler})")
        for mode, pts in _lines(rows, key).items():
            ks, st = [p[0] for p in pts], [p[1] for p in pts]
            mean = [s["mean"] for s in st]
            err = [[m - s["min"] for m, s in zip(mean, st, strict=True)],
                   [s["max"] - m for m, s in zip(mean, st, strict=True)]]  # fmt: skip
            ax.errorbar(ks, mean, yerr=err, marker="s", capsize=3, label=f"student: {mode}")
        ax.set(xscale="log", yscale="log")
        ticks = sorted({r["steps"] for r in rows} | {r["nfe"] for r in d.get("teacher_curve", [])})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.legend(fontsize=8)
    fig.suptitle("MNIST: K-step students (mean, min/max over seeds) and the teacher's sampler")
    fig.tight_layout()
    sweeprun.save_figure(fig, path)
    plt.close(fig)
    return path.name


def plot_gmm(d: dict, path: Path) -> str:
    import matplotlib.pyplot as plt

    rows = d["summary"]["gmm"]
    teachers = list(dict.fromkeys(r["teacher"] for r in rows))
    fig, axes = plt.subplots(1, len(teachers), figsize=(5 * len(teachers), 3.8), squeeze=False)
    for ax, teacher in zip(axes[0], teachers, strict=True):
        sub = [r for r in rows if r["teacher"] == teacher]
        for mode, pts in _lines(sub, "within_3sigma").items():
            st = [p[1] for p in pts]
            ax.plot([p[0] for p in pts], [s["mean"] for s in st], marker="s", label=f"within 3 sigma: {mode}")
        for mode, pts in _lines(sub, "modes_covered").items():
            frac = [p[1]["mean"] / sub[0]["num_modes"] for p in pts]
            label = f"modes covered / {sub[0]['num_modes']}: {mode}"
            ax.plot([p[0] for p in pts], frac, ls=":", marker="o", label=label)
        ks = sorted({r["steps"] for r in sub})
        ax.set(xscale="log", xlabel="student steps K", ylim=(0, 1.05), title=teacher)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.legend(fontsize=7)
    fig.tight_layout()
    sweeprun.save_figure(fig, path)
    plt.close(fig)
    return path.name


# ---- Markdown -----------------------------------------------------------------------------------------------
def _ladder(sigmas: list[float]) -> str:
    return "[" + ", ".join(common.fmt(s, 3) for s in sigmas) + "]"


def render(d: dict, all_data: dict) -> str:
    fs, f, s = ss.fmt_stat, common.fmt, d["summary"]
    lines = [f"## {TITLE}", "", common.header_line(d), ""]
    if "mnist" in s:
        lines += mnist_section(d, s)
    if "gmm" in s:
        lines += ["### GMM exact teachers", "", f"Preset `gmm` ({d['gmm']['divergence']}), "
                  f"{f(d['sizes']['gmm']['kimg'])} kimg, batch {d['sizes']['gmm']['batch']}, exact metrics of "
                  f"n = {d['sizes']['gmm']['n_eval']} samples.", ""]  # fmt: skip
        rows = [[f"`{r['teacher']}`", r["steps"], r["inputs"] if r["steps"] > 1 else "-", _ladder(r["sigmas"]),
                 len(r["seeds"]), f"{fs(r['modes_covered'])} of {r['num_modes']}", fs(r["within_3sigma"]),
                 fs(r["mode_tv"]), f"{fs(r['mmd2'])} ({fs(r['mmd2_floor'])})"] for r in s["gmm"]]  # fmt: skip
        head = ["teacher", "K", "inputs", "ladder", "seeds", "modes covered", "within 3 sigma", "mode TV",
                "MMD² (floor)"]  # fmt: skip
        lines += [*common.table(head, rows), ""]
        if d["gmm"]["missing"]:
            lines += [common.unfinished(d["gmm"]["missing"], ("teacher", "label")), ""]
    lines += [f"![{p}]({p})" for p in d.get("plots", [])]
    return "\n".join(lines).rstrip()


def mnist_section(d: dict, s: dict) -> list[str]:
    fs, f, m = ss.fmt_stat, common.fmt, d["mnist"]
    sz = d["sizes"]["mnist"]
    lines = ["### MNIST", "", f"Teacher `{m['teacher'].get('path')}` (sha256 {m['teacher'].get('sha256')}); "
             f"{f(sz['kimg'])} kimg per student (equal training images), batch {sz['batch']}; FID with the MNIST "
             f"feature net at n = {sz['n_fid']} and Inception FID at n = {sz['n_inception_full']}, both against "
             f"{m['reference']} (all images).", ""]  # fmt: skip
    rows = [[r["steps"], r["inputs"] if r["steps"] > 1 else "-", _ladder(r["sigmas"]), len(r["seeds"]),
             fs(r["fid"], 4), fs(r["inception_fid"], 4), fs(r["classifier_score"]), fs(r["precision"]),
             fs(r["recall"]), fs(r["train_sec"])] for r in s["mnist"]]  # fmt: skip
    rows += [[f"teacher {t['sampler']}", "-", "-", "-", f(t["fid"], 4), f(t["inception_fid"], 4), "", "", "", ""]
             for t in d.get("teacher_curve", [])]  # fmt: skip
    head = ["K (NFE)", "inputs", "ladder", "seeds", "FID (MNIST feat.)", "Inception FID", "classifier score",
            "precision", "recall", "train s"]  # fmt: skip
    lines += [*common.table(head, rows), ""]
    if len({t["nfe"] for t in d.get("teacher_curve", [])}) < 2:
        lines += ["The teacher's curve has fewer than two points: `bench/teacher_quality.py --nfe 1,3,5,9,17,35` "
                  "measures more.", ""]  # fmt: skip
    g = s.get("goal")
    if g:
        verdicts = ", ".join(f"`{k}`: {'met' if v else 'not met' if v is not None else 'not measured'}"
                             for k, v in g["settings"].items())  # fmt: skip
        lines += [
            f"Goal (4-step FID <= the teacher's Heun-{GOAL_NFE} FID {f(g['teacher_fid'], 4)} and Inception "
            f"FID {f(g['teacher_inception_fid'], 4)}, at 4/{GOAL_NFE} of its evaluations): {verdicts}.",
            "",
        ]
    if m.get("speed"):
        lines += ["Sampling speed (same machine, one process):", ""]
        speed = [[r["sampler"], r["nfe"], r["n"], f(r["img_per_sec"], 4)] for r in m["speed"]]
        lines += common.table(["sampler", "NFE", "images", "img/s"], speed)
        lines.append("")
    if m["missing"]:
        lines += [common.unfinished(m["missing"], ("label",)), ""]
    if m.get("inception_skipped"):
        lines += [f"Inception FID skipped: {m['inception_skipped']}", ""]
    return lines
