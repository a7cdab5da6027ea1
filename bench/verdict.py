"""The verdict of the objective sweeps: per objective, where it beats reverse KL at equal images and where not,
written from the numbers of `mnist_sweep.json` and `gmm_sweep.json` (nothing in it is typed by hand).

    python bench/verdict.py [--results bench/results] [--out FILE.md]

Rule (`seedstats.compare`): at equal images an objective is "better" / "worse" than reverse KL only when the
[min, max] ranges of the two over seeds do not overlap; otherwise "within seed spread". MNIST: in-loop FID at the
sweep's equal-images points, final FID and classifier score. GMM (per exact teacher): modes covered, within 3
sigma, mode TV and MMD^2. Each objective's ESS/batch and weight max stand beside it: a win bought with a
collapsed weight (ESS near 1/batch) is a different finding from one with healthy weights. Why: each weighted
objective's sensitivity |d log w / d l| at l = 0 times the default discriminator's q-side logit error measured by
`ratio_calibration.json` (when present) gives the factor its weights are off by; `grad_noise.json` (when present)
how noisy one batch's generator gradient is under its weights, as the fraction of a reverse-KL batch that is as
noisy relative to its mean, and how far its mean direction is from reverse KL's. What to use: per goal (sharpness:
MNIST final FID; mode coverage: GMM mode TV per teacher) the objective with the best mean, recommended over
reverse KL only where it is better beyond the seed spread. `run_all.py` puts this block at the top of
BENCHMARKS.md; paste the `--out` file into the README where it should appear there.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

import common
import gmm_report
import seedstats as ss
import sweeprun

BASELINE = "rkl"
TITLE = "Verdict: each objective against reverse KL at equal images"
CALIBRATION = "ratio_calibration.json"  # bench/ratio_calibration.py: the discriminator's logit error
GRAD_NOISE = "grad_noise.json"  # bench/grad_noise.py: the generator gradient's noise under each objective's weights
GMM_METRICS = (("modes_covered", "modes", False), ("within_3sigma", "within 3σ", False),
               ("mode_tv", "mode TV", True), ("mmd2", "MMD²", True))  # fmt: skip


def mnist_verdict(d: dict) -> dict | None:
    """{"points", "rows": [{label, alias_of, cells: {column: {relation, objective, baseline}}, ess, weight_max}]}."""
    import mnist_report

    rows = d.get("summary") or mnist_report.summarise(d)
    base = next((r for r in rows if r["label"] == BASELINE), None)
    if base is None:
        return None
    slopes = _slopes(d)
    points = [p["kimg"] for p in base["fid_at"]]
    out = []
    for r in rows:
        if r["label"] == BASELINE:
            continue
        at = {p["kimg"]: p["fid"] for p in r["fid_at"]}
        base_at = {p["kimg"]: p["fid"] for p in base["fid_at"]}
        cells = {f"FID at {common.fmt(k, 4)} kimg": _cell(at.get(k), base_at[k], True) for k in points}
        cells[f"final FID (n={d['sizes']['n_fid']})"] = _cell(r["final_fid"], base["final_fid"], True)
        cells["classifier score"] = _cell(r["classifier_score"], base["classifier_score"], False)
        out.append(_row(r, cells, slopes))
    goal = f"sharpness (final FID, n={d['sizes']['n_fid']})"
    return {"rows": out, "baseline": _weights(base), "goals": [_goal(goal, rows, "final_fid", True)]}


def gmm_verdict(d: dict) -> list[dict]:
    """Per teacher: {"teacher", "rows": [...]} as `mnist_verdict`, on the exact metrics."""
    rows = d.get("summary") or gmm_report.summarise(d)
    slopes, out = _slopes(d), []
    for teacher in dict.fromkeys(r["teacher"] for r in rows):
        mine = [r for r in rows if r["teacher"] == teacher]
        base = next((r for r in mine if r["label"] == BASELINE), None)
        if base is None:
            continue
        vs = [
            _row(r, {name: _cell(r[key], base[key], lower) for key, name, lower in GMM_METRICS}, slopes)
            for r in mine
            if r["label"] != BASELINE
        ]
        goals = [_goal("mode coverage (mode TV)", mine, "mode_tv", True)]
        out.append({"teacher": teacher, "rows": vs, "baseline": _weights(base), "goals": goals})
    return out


def log_weight_slope(name: str, params: dict) -> float:
    """|d log w / d l| at l = 0: a logit error delta moves the objective's log weight by about this times delta
    (SBA(lambda): |lambda|; LR: 1/2; reverse KL: 0, its weight is 1 whatever the discriminator says)."""
    l = torch.zeros((), dtype=torch.float64, requires_grad=True)
    log_w = sweeprun.divergence_of(name, params).log_weight(l)
    if not log_w.requires_grad:  # a constant weight
        return 0.0
    (grad,) = torch.autograd.grad(log_w, l)
    return abs(float(grad))


def _slopes(d: dict) -> dict:
    """{label: log_weight_slope} of the sweep's runs that record their divergence."""
    runs = {r["label"]: r for r in d.get("runs") or [] if r.get("divergence")}
    return {label: log_weight_slope(r["divergence"], r.get("params") or {}) for label, r in runs.items()}


def logit_error(cal: dict | None) -> dict | None:
    """`seedstats.stat` over the calibration benchmark's students of the default discriminator's q-side logit RMSE
    (mean over its sigma bins): the error the generator's weights read (None without that benchmark). Default:
    the placement and head of the preset the benchmark ran (ModelConfig's defaults where it names none)."""
    if not cal or cal.get("quick"):  # a smoke run's error means nothing
        return None
    from dibregman.config import ModelConfig
    from dibregman.presets import get_preset
    from ratio_calibration import q_rmse

    model = get_preset(cal["preset"]).model if cal.get("preset") else ModelConfig()
    default = (model.disc_placement, model.disc_head)
    runs = cal.get("runs") or []
    vals = [
        q_rmse(r["bins"])
        for r in runs
        if (r.get("placement"), r.get("head")) == default and r.get("bins") and "skipped" not in r
    ]
    return ss.stat(vals)


def _goal(goal: str, rows: list[dict], key: str, lower_is_better: bool) -> dict:
    """The objective with the best mean `key` (aliases left out) and how it stands against reverse KL."""
    have = [r for r in rows if r.get(key) and not r.get("alias_of")]
    base = next((r for r in have if r["label"] == BASELINE), None)
    if not have or base is None:
        return {"goal": goal, "best": None}
    sign = 1 if lower_is_better else -1
    best = min(have, key=lambda r: (sign * r[key]["mean"], r is not base))  # a tie goes to reverse KL
    relation = "baseline" if best is base else ss.compare(best[key], base[key], lower_is_better)
    return {"goal": goal, "best": best["label"], "relation": relation, "objective": best[key], "baseline": base[key]}


def _cell(a: dict | None, b: dict | None, lower_is_better: bool) -> dict:
    return {"relation": ss.compare(a, b, lower_is_better), "objective": a, "baseline": b}


def _weights(r: dict) -> dict:
    return {"ess_frac": r.get("ess_frac"), "weight_max": r.get("weight_max")}


def _row(r: dict, cells: dict, slopes: dict) -> dict:
    return {"label": r["label"], "alias_of": r.get("alias_of"), "seeds": len(r["seeds"]), "cells": cells,
            "failed_seeds": r.get("failed_seeds") or [], "slope": slopes.get(r["label"]), **_weights(r)}  # fmt: skip


# ---- Markdown -------------------------------------------------------------------------------------------
def markdown(all_data: dict, calibration: dict | None = None, grad_noise: dict | None = None) -> list[str]:
    """The verdict block (heading included) from whichever of the two sweep JSONs exist; [] if neither.
    `calibration`: ratio_calibration.json's content, for the weights' error in the "why" lines; `grad_noise`:
    grad_noise.json's, for the MNIST lines (its checkpoints are MNIST runs')."""
    mnist, gmm = all_data.get("mnist_sweep"), _gmm_sweeps(all_data)
    err = logit_error(calibration)
    if not mnist and not gmm:
        return []
    lines = [
        f"## {TITLE}",
        "",
        "Written from the sweeps' JSON by `bench/verdict.py`. **better** / **worse**: the objective's [min, max] "
        "over seeds and reverse KL's do not overlap at that point; *within seed spread*: they do. Cells give the "
        "objective's mean [min, max] against reverse KL's.",
        "",
    ]
    v = mnist_verdict(mnist) if mnist else None
    blocks = []
    if v:
        blocks.append(("MNIST", v))
        noise = gradient_noise(grad_noise)
        lines += [f"### MNIST ({_sizes(mnist)})", "", *_table(v), "", *_sentences(v, err, noise), ""]
    elif mnist:
        lines += ["### MNIST", "", "No reverse-KL runs in mnist_sweep.json: no verdict.", ""]
    for d in gmm:
        where = f" with {gmm_report.variant(d)}" if gmm_report.variant(d) else ""
        for g in gmm_verdict(d):
            blocks.append((f"GMM `{g['teacher']}`{where}", g))
            head = f"### GMM `{g['teacher']}`{where} ({_sizes(d, g['teacher'])})"
            lines += [head, "", *_table(g), "", *_sentences(g, err), ""]
    recommend = [_recommendation(where, goal) for where, b in blocks for goal in b["goals"] if goal["best"]]
    if recommend:
        lines += ["### What to use", "", *recommend, ""]
    return lines


def _gmm_sweeps(all_data: dict) -> list[dict]:
    """The content of gmm_sweep.json, then of its variants (`gmm_sweep_TAG.json`: the sweep under --set)."""
    return [d for k, d in all_data.items() if d and (k == "gmm_sweep" or k.startswith("gmm_sweep_"))]


def _recommendation(where: str, g: dict) -> str:
    best, a, b = f"`{g['best']}`", ss.fmt_stat(g["objective"], 3), ss.fmt_stat(g["baseline"], 3)
    head = f"- {where}, {g['goal']}: "
    if g["relation"] == "baseline":
        return head + f"reverse KL has the best mean ({b}): use `{BASELINE}`."
    if g["relation"] == ss.BETTER:
        return head + f"use {best}, better than reverse KL beyond the seed spread ({a} vs {b})."
    if g["relation"] == ss.TIE:
        return head + (f"{best} has the best mean ({a}) but lies within reverse KL's seed spread ({b}): use "
                       f"`{BASELINE}` until more seeds separate them.")  # fmt: skip
    return head + f"{best} has the best mean ({a} vs {b}) from one seed: not enough to prefer it to `{BASELINE}`."


def _sizes(d: dict, teacher: str | None = None) -> str:
    """Run length and the seeds that finished (of those planned, while a sweep is still under way), counting
    only `teacher`'s runs when given."""
    s = d["sizes"]
    planned = s.get("seeds", [d.get("seed")])
    runs = [r for r in d.get("runs") or [] if teacher is None or r.get("teacher") == teacher]
    seeds = sorted({r.get("seed", d.get("seed")) for r in runs}) or planned
    of = f" of {len(planned)} planned" if len(seeds) < len(planned) else ""
    smoke = ", smoke run: the numbers mean nothing" if d.get("quick") else ""
    return f"{common.fmt(s['kimg'], 4)} kimg per run, {common.count(len(seeds), 'seed')}{of}{smoke}"


def _word(relation: str) -> str:
    return {ss.BETTER: "**better**", ss.WORSE: "**worse**", ss.TIE: "*within seed spread*"}.get(relation, relation)


def _table(v: dict) -> list[str]:
    cols = list(v["rows"][0]["cells"]) if v["rows"] else []
    body = []
    for r in v["rows"]:
        cells = [
            f"{_word(c['relation'])}: {ss.fmt_stat(c['objective'], 3)} vs {ss.fmt_stat(c['baseline'], 3)}"
            if c["relation"] != "n/a"
            else "n/a"
            for c in r["cells"].values()
        ]
        body.append([_label(r), *cells, ss.fmt_stat(r["ess_frac"]), ss.fmt_stat(r["weight_max"])])
    b = v["baseline"]
    body.append(
        [f"`{BASELINE}` (baseline)", *("" for _ in cols), ss.fmt_stat(b["ess_frac"]), ss.fmt_stat(b["weight_max"])]
    )
    return common.table(["objective", *cols, "ESS/batch", "weight max"], body)


def _label(r: dict) -> str:
    return f"`{r['label']}`" + (f" (= `{r['alias_of']}`)" if r["alias_of"] else "")


def _sentences(v: dict, err: dict | None = None, noise: dict | None = None) -> list[str]:
    """One line per objective: where it wins, where it loses, the rest within seed spread; then why (the
    weights' sensitivity to the discriminator's logit error `err`, their effective sample size and, from `noise`,
    what they do to the generator gradient)."""
    out = []
    noise = dict(noise or {})
    for r in v["rows"]:  # an alias is the same run as its target: a measurement under either name is both's
        if r["alias_of"] and r["label"] in noise:
            noise.setdefault(r["alias_of"], noise[r["label"]])
    for r in v["rows"]:
        if r["alias_of"]:
            out.append(f"- {_label(r)}: the same runs as `{r['alias_of']}` (identical weights), read there.")
            continue
        by = {rel: [col for col, c in r["cells"].items() if c["relation"] == rel] for rel in (ss.BETTER, ss.WORSE)}
        if r["seeds"] < 2:
            text = "fewer than two seeds: no spread to judge by"
        elif not by[ss.BETTER] and not by[ss.WORSE]:
            text = "within seed spread of reverse KL everywhere"
        else:
            parts = [f"better at {', '.join(by[ss.BETTER])}"] if by[ss.BETTER] else []
            parts += [f"worse at {', '.join(by[ss.WORSE])}"] if by[ss.WORSE] else []
            ties = any(c["relation"] == ss.TIE for c in r["cells"].values())
            text = "; ".join(parts) + ("; within seed spread elsewhere" if ties else "" if len(parts) > 1 else
                                       ", i.e. everywhere")  # fmt: skip
        if r["failed_seeds"]:
            text += f"; diverged with seeds {r['failed_seeds']} (left out)"
        out.append(f"- {_label(r)}: {text} (ESS/batch {ss.fmt_stat(r['ess_frac'])}, weight max "
                   f"{ss.fmt_stat(r['weight_max'])}).{_why(r, err)}{_noise(r, noise)}")  # fmt: skip
    return out


def _why(r: dict, err: dict | None) -> str:
    """How far the discriminator's error moves this objective's weights, and how many samples they keep."""
    slope = r.get("slope")
    if not slope:
        return ""
    f = common.fmt
    by = "" if math.isclose(slope, 1.0) else f(slope, 2)
    text = f" A logit error δ moves its log weight by {by}δ"
    if err:
        lo, hi = math.exp(slope * err["min"]), math.exp(slope * err["max"])
        span = f"×{f(lo, 3)}" if math.isclose(lo, hi, rel_tol=0.005) else f"×{f(lo, 3)}-{f(hi, 3)}"
        rmse = ss.fmt_stat(err, 2)
        text += (f": the default discriminator's q-side logit RMSE where the true ratio is known (2-D mixtures, "
                 f"{rmse}, `ratio_calibration.md`) leaves its weights off by {span} (one std)")  # fmt: skip
    ess = r.get("ess_frac")
    if ess:
        text += f"; each step's weighted average keeps about {f(ess['mean'], 2)} of the batch"
    return text + "."


def gradient_noise(data: dict | None) -> dict | None:
    """{label: {"batch_equiv", "cos_rkl": seedstats stat over the checkpoints, "checkpoints": n, "batches": sorted
    distinct batch counts}} from grad_noise.json's content, counting only checkpoints where the objective's mean
    gradient was resolved."""
    if not data:
        return None
    out = {}
    for c in (c for c in data["checkpoints"] if not c.get("set")):  # the sweep's own weights, not a --set variant
        for label, r in c["objectives"].items():
            if label != BASELINE and r["signal"] > 0 < c["objectives"][BASELINE]["signal"]:
                e = out.setdefault(label, {"batch_equiv": [], "cos_rkl": [], "batches": []})
                e["batches"].append(c["batches"])
                e["batch_equiv"].append(r["batch_equiv"])
                e["cos_rkl"].append(r["cos_rkl"])
    return {
        k: {
            "batch_equiv": ss.stat(e["batch_equiv"]),
            "cos_rkl": ss.stat(e["cos_rkl"]),
            "checkpoints": len(e["batch_equiv"]),
            "batches": sorted(set(e["batches"])),
        }
        for k, e in out.items()
    }


def _noise(r: dict, noise: dict | None) -> str:
    """What the weights do to one batch's generator gradient, at the checkpoints grad_noise.json measured."""
    n = (noise or {}).get(r["label"])
    if not n:
        return ""
    be, cos = _span(n["batch_equiv"]), _span(n["cos_rkl"])
    ckpts = common.count(n["checkpoints"], "checkpoint")
    k = n["batches"]
    batches = f"{k[0]}" if len(k) == 1 else f"{k[0]}-{k[-1]}"
    if float(common.fmt(n["cos_rkl"]["max"], 2)) > 1:  # shown above 1: an estimate, not a clipped cosine
        cos += ", an estimate from independent halves of the batches that exceeds 1 by its error"
    return (f" Its weights make one batch's generator gradient as noisy, relative to its mean, as reverse KL's with "
            f"{be} of the batch, its mean direction at cos {cos} to reverse KL's ({ckpts}, "
            f"{batches} paired batches each, `grad_noise.md`).")  # fmt: skip


def _span(s: dict) -> str:
    f = common.fmt
    return f(s["mean"], 2) if s["n"] == 1 else f"{f(s['min'], 2)}-{f(s['max'], 2)}"


def _load(results: Path, name: str) -> dict | None:
    path = Path(results) / name
    return json.loads(path.read_text()) if path.is_file() else None


def load_grad_noise(results: Path) -> dict | None:
    """`grad_noise.json` of a results folder (None when absent)."""
    return _load(results, GRAD_NOISE)


def load_calibration(results: Path) -> dict | None:
    """`ratio_calibration.json` of a results folder (None when absent)."""
    return _load(results, CALIBRATION)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(common.RESULTS), help="folder holding mnist_sweep.json / gmm_sweep.json")
    p.add_argument("--out", default="", help="write the block to this file (default: print it)")
    args = p.parse_args(argv)
    import run_all

    results = Path(args.results)
    block = markdown(run_all.load_results(results), load_calibration(results), load_grad_noise(results))
    text = "\n".join(block).rstrip() + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text, end="")
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
