"""Equal tuning (`equal_tuning.py`): a probe's score, the best setting per objective, the finals over seeds, the
figure and the BENCHMARKS.md section; pure functions of the run folders' records and plain numbers."""

from __future__ import annotations

from pathlib import Path

import common
import seedstats as ss
import sweeprun

TITLE = "Equal tuning: reverse KL and SBA(5), the same budget by the same rule"
FID_KEY = "fid_mnist"
LAST_POINTS = 3


def curve(folder: Path, kimg: float) -> list[tuple[float, float]]:
    """The in-loop FID points of a run up to the first one logged at or after `kimg` (a point is logged at the
    first step past each period)."""
    pts = sweeprun.series(sweeprun.read_log(folder), FID_KEY)
    cut = next((i for i, (k, _) in enumerate(pts) if k >= kimg * (1 - 1e-9)), None)
    return pts if cut is None else pts[: cut + 1]


def score(folder: Path, kimg: float) -> float | None:
    """Mean in-loop FID of the last LAST_POINTS points up to `kimg` (fewer where a tiny run logged fewer after its
    start); None until the run reached `kimg`."""
    pts = [p for p in curve(folder, kimg) if p[0] > 0]
    if not pts or pts[-1][0] < kimg * (1 - 1e-9):
        return None
    last = pts[-LAST_POINTS:]
    return sum(v for _, v in last) / len(last)


def probe_row(label: str, probe: str, pairs: dict, folder: Path, kimg: float, cfg, source: str) -> dict:
    return {
        "objective": label,
        "probe": probe,
        "set": pairs,
        "batch": cfg.optim.batch_size,
        "run_dir": str(folder),
        "source": source,
        "score": score(folder, kimg),
        "curve": curve(folder, kimg),
    }


def best_of(rows: list[dict], table: dict[str, dict]) -> dict:
    """{objective: {"probe", "set", "score", "start_score"}} for every objective whose probes all have a score."""
    out = {}
    for label, probes in table.items():
        mine = {r["probe"]: r for r in rows if r["objective"] == label}
        if set(mine) != set(probes) or any(r["score"] is None for r in mine.values()):
            continue
        best = min(mine.values(), key=lambda r: r["score"])
        pairs = {k: v for k, v in best["set"].items() if k != "batch_factor"}
        if "batch_factor" in best["set"]:
            pairs["optim.batch_size"] = best["batch"]
        out[label] = {
            "probe": best["probe"],
            "set": pairs,
            "score": best["score"],
            "start_score": mine["start"]["score"],
        }
    return out


def final_row(label: str, probe: str, seed: int, result: dict | None, sizes: dict) -> dict:
    row = {"objective": label, "probe": probe, "seed": seed}
    if result is None or result.get("images_seen", 0) < round(sizes["kimg"] * 1000):
        return {**row, "missing": True}
    final = result["final"]
    return {
        **row,
        "fid": final["mnist_features"]["fid"],
        "n_fid": final["mnist_features"]["n_samples"],
        "inception_fid": final.get("inception_full", {}).get("fid"),
        "images_seen": result["images_seen"],
        "failed": result.get("failed"),
        "curve": result.get("curve"),
    }


def summarise_finals(rows: list[dict]) -> dict:
    """Per objective: FID and Inception FID over its finished seeds; and the comparison of the two objectives
    (better / worse only when the seed ranges do not overlap)."""
    out = {}
    for label in dict.fromkeys(r["objective"] for r in rows):
        done = [r for r in rows if r["objective"] == label and not r.get("missing")]
        out[label] = {
            "probe": rows[[r["objective"] for r in rows].index(label)]["probe"],
            "seeds": [r["seed"] for r in done],
            "fid": ss.stat(r["fid"] for r in done),
            "inception_fid": ss.stat(r["inception_fid"] for r in done),
        }
    if {"rkl", "sba(lam=5)"} <= set(out):
        a, b = out["sba(lam=5)"], out["rkl"]
        out["sba_vs_rkl"] = {k: ss.compare(a[k], b[k]) for k in ("fid", "inception_fid")}
    return out


def plot(d: dict, out: Path) -> list[str]:
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["objective"] for r in d["probes"]))
    if not labels:
        return []
    fig, axes = plt.subplots(1, len(labels), figsize=(5.5 * len(labels), 4.2), squeeze=False)
    for ax, label in zip(axes[0], labels, strict=True):
        for r in (r for r in d["probes"] if r["objective"] == label and r["curve"]):
            ks, vs = zip(*r["curve"], strict=True)
            ax.plot(ks, vs, marker=".", label=f"{r['probe']} ({common.fmt(r['score'], 4)})")
        ax.set(xlabel="kimg", ylabel="in-loop FID (MNIST features)", yscale="log", title=f"{label}: probes, seed "
               f"{d['seed']}")  # fmt: skip
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "equal_tuning.png"
    sweeprun.save_figure(fig, path)
    plt.close(fig)
    return [path.name]


def render(d: dict, all_data: dict) -> str:
    f, fs, sz = common.fmt, ss.fmt_stat, d["sizes"]
    lines = [f"## {TITLE}", "", common.header_line(d), "", "The rule, written before any probe ran:", "", d["rule"], ""]
    lines += [f"Probes: seed {d['seed']}, the first {f(sz['probe_kimg'])} kimg of the "
              f"{f(sz['kimg'])}-kimg schedule; score = mean in-loop FID (MNIST features, n = {sz['n_fid_loop']}) "
              f"of the last {LAST_POINTS} points.", ""]  # fmt: skip
    rows = []
    for r in d["probes"]:
        start = next(x["score"] for x in d["probes"] if x["objective"] == r["objective"] and x["probe"] == "start")
        delta = f"{r['score'] - start:+.2f}" if r["score"] is not None and start is not None else "n/a"
        sets = ", ".join(f"`{k}={v}`" for k, v in r["set"].items()) or "-"
        rows.append([r["objective"], r["probe"], sets, r["batch"], f(r["score"], 4), delta, r["source"]])
    lines += [*common.table(["objective", "probe", "overrides", "batch", "score", "vs start", "run"], rows), ""]
    for label, b in d["best"].items():
        lines.append(f"- Best for {label}: `{b['probe']}` (score {f(b['score'], 4)}, start {f(b['start_score'], 4)}).")
    if not d["best"]:
        lines.append("- No objective has all its probes finished yet: no best setting.")
    s = d["summary"]
    if any(k != "sba_vs_rkl" for k in s):
        lines += ["", f"Finals: each best setting, {f(sz['kimg'])} kimg, seeds {sz['seeds']}; FID with MNIST "
                  f"features at n = {sz['n_fid']} and Inception FID at n = {sz['n_inception_full']}, both against "
                  "the 10k test set (mean [min, max] over the finished seeds).", ""]  # fmt: skip
        rows = [[k, v["probe"], len(v["seeds"]), fs(v["fid"], 4), fs(v["inception_fid"], 4)]
                for k, v in s.items() if k != "sba_vs_rkl"]  # fmt: skip
        lines += common.table(["objective", "setting", "seeds", "FID (MNIST features)", "Inception FID"], rows)
        if "sba_vs_rkl" in s:
            c = s["sba_vs_rkl"]
            lines += ["", f"SBA(5) against reverse KL: MNIST features {c['fid']}, Inception {c['inception_fid']}."]
    lines += ["", *(f"![{p}]({p})" for p in d.get("plots", []))]
    return "\n".join(lines).rstrip()
