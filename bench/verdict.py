"""The verdict of the objective sweeps: per objective, where it beats reverse KL at equal images and where not,
written from the numbers of `mnist_sweep.json` and `gmm_sweep.json` (nothing in it is typed by hand).

    python bench/verdict.py [--results bench/results] [--out FILE.md]

Rule (`seedstats.compare`): at equal images an objective is "better" / "worse" than reverse KL only when the
[min, max] ranges of the two over seeds do not overlap; otherwise "within seed spread". MNIST: in-loop FID at the
sweep's equal-images points, final FID and classifier score. GMM (per exact teacher): modes covered, within 3
sigma, mode TV and MMD^2. Each objective's ESS/batch and weight max stand beside it: a win bought with a
collapsed weight (ESS near 1/batch) is a different finding from one with healthy weights. `run_all.py` puts this
block at the top of BENCHMARKS.md; paste the `--out` file into the README where it should appear there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common
import seedstats as ss

BASELINE = "rkl"
TITLE = "Verdict: each objective against reverse KL at equal images"
GMM_METRICS = (("modes_covered", "modes", False), ("within_3sigma", "within 3σ", False),
               ("mode_tv", "mode TV", True), ("mmd2", "MMD²", True))  # fmt: skip


def mnist_verdict(d: dict) -> dict | None:
    """{"points", "rows": [{label, alias_of, cells: {column: {relation, objective, baseline}}, ess, weight_max}]}."""
    import mnist_report

    rows = d.get("summary") or mnist_report.summarise(d)
    base = next((r for r in rows if r["label"] == BASELINE), None)
    if base is None:
        return None
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
        out.append(_row(r, cells))
    return {"rows": out, "baseline": _weights(base)}


def gmm_verdict(d: dict) -> list[dict]:
    """Per teacher: {"teacher", "rows": [...]} as `mnist_verdict`, on the exact metrics."""
    import gmm_report

    rows = d.get("summary") or gmm_report.summarise(d)
    out = []
    for teacher in dict.fromkeys(r["teacher"] for r in rows):
        mine = [r for r in rows if r["teacher"] == teacher]
        base = next((r for r in mine if r["label"] == BASELINE), None)
        if base is None:
            continue
        vs = [
            _row(r, {name: _cell(r[key], base[key], lower) for key, name, lower in GMM_METRICS})
            for r in mine
            if r["label"] != BASELINE
        ]
        out.append({"teacher": teacher, "rows": vs, "baseline": _weights(base)})
    return out


def _cell(a: dict | None, b: dict | None, lower_is_better: bool) -> dict:
    return {"relation": ss.compare(a, b, lower_is_better), "objective": a, "baseline": b}


def _weights(r: dict) -> dict:
    return {"ess_frac": r.get("ess_frac"), "weight_max": r.get("weight_max")}


def _row(r: dict, cells: dict) -> dict:
    return {"label": r["label"], "alias_of": r.get("alias_of"), "seeds": len(r["seeds"]), "cells": cells,
            "failed_seeds": r.get("failed_seeds") or [], **_weights(r)}  # fmt: skip


# ---- Markdown -------------------------------------------------------------------------------------------
def markdown(all_data: dict) -> list[str]:
    """The verdict block (heading included) from whichever of the two sweep JSONs exist; [] if neither."""
    mnist, gmm = all_data.get("mnist_sweep"), all_data.get("gmm_sweep")
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
    if v:
        lines += [f"### MNIST ({_sizes(mnist)})", "", *_table(v), "", *_sentences(v), ""]
    elif mnist:
        lines += ["### MNIST", "", "No reverse-KL runs in mnist_sweep.json: no verdict.", ""]
    for g in gmm_verdict(gmm) if gmm else []:
        lines += [f"### GMM `{g['teacher']}` ({_sizes(gmm)})", "", *_table(g), "", *_sentences(g), ""]
    return lines


def _sizes(d: dict) -> str:
    """Run length and the seeds that finished (of those planned, while a sweep is still under way)."""
    s = d["sizes"]
    planned = s.get("seeds", [d.get("seed")])
    seeds = sorted({r.get("seed", d.get("seed")) for r in d.get("runs") or []}) or planned
    of = f" of {len(planned)} planned" if len(seeds) < len(planned) else ""
    smoke = ", smoke run: the numbers mean nothing" if d.get("quick") else ""
    return f"{common.fmt(s['kimg'], 4)} kimg per run, {len(seeds)} seed{'s' * (len(seeds) > 1)}{of}{smoke}"


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


def _sentences(v: dict) -> list[str]:
    """One line per objective: where it wins, where it loses, the rest within seed spread."""
    out = []
    for r in v["rows"]:
        by = {rel: [col for col, c in r["cells"].items() if c["relation"] == rel] for rel in (ss.BETTER, ss.WORSE)}
        if r["seeds"] < 2:
            text = "fewer than two seeds: no spread to judge by"
        elif not by[ss.BETTER] and not by[ss.WORSE]:
            text = "within seed spread of reverse KL everywhere"
        else:
            parts = [f"better at {', '.join(by[ss.BETTER])}"] if by[ss.BETTER] else []
            parts += [f"worse at {', '.join(by[ss.WORSE])}"] if by[ss.WORSE] else []
            text = "; ".join(parts) + "; within seed spread elsewhere"
        if r["failed_seeds"]:
            text += f"; diverged with seeds {r['failed_seeds']} (left out)"
        out.append(f"- {_label(r)}: {text} (ESS/batch {ss.fmt_stat(r['ess_frac'])}, weight max "
                   f"{ss.fmt_stat(r['weight_max'])}).")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(common.RESULTS), help="folder holding mnist_sweep.json / gmm_sweep.json")
    p.add_argument("--out", default="", help="write the block to this file (default: print it)")
    args = p.parse_args(argv)
    import run_all

    text = "\n".join(markdown(run_all.load_results(Path(args.results)))).rstrip() + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text, end="")
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
