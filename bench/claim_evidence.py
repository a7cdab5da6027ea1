"""The evidence behind the verdict on the paper's claim (issue 31), gathered from the committed MNIST run records
(nothing in it is typed by hand): per design -- the objective sweep's recipe, the paper's design, each tuned
setting of `equal_tuning.py` -- and objective, the final FID with MNIST features (n = 2000 against the 10k test
set) and, where it was scored, the Inception FID at n = 2000 against the whole test set (`final.inception_full`:
`rescore_inception.py`, `equal_tuning.py --finals`), per seed and as mean [min, max] over seeds; the runs that
diverged, with where they stopped (left out of the statistics); each objective against reverse KL of the same
design by the sweep's rule (`seedstats.compare`: better or worse only where the two seed ranges are disjoint);
and the order of every setting under each feature set.

    python bench/claim_evidence.py [--runs DIR ...] [--out bench/results]

A run is any `result.json` below a --runs folder (default: bench/results/mnist_{sweep,placebo,paper}_runs and
equal_tuning_runs). Its design comes from its path: `mnist_sweep_paper/` is the paper's design,
`equal_tuning/<probe>/` a tuned setting, anything else the recipe. Writes claim_evidence.json and
claim_evidence.md into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import common
import seedstats as ss

NAME = "claim_evidence"
TITLE = "The paper's claim on MNIST: every design and objective, final FIDs over seeds"
BASELINE = "rkl"
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_RUNS = ["mnist_sweep_runs", "mnist_placebo_runs", "mnist_paper_runs", "equal_tuning_runs"]
FEATURES = (("mnist", "FID, MNIST features"), ("inception", "Inception FID"))


def design_of(path: Path) -> str:
    parts = path.parts
    if "equal_tuning" in parts:
        return f"tuned: {parts[parts.index('equal_tuning') + 1]}"
    return "paper design" if "mnist_sweep_paper" in parts else "recipe"


def fids(result: dict) -> dict:
    """{"mnist": FID at n = 2000 with MNIST features, "inception": Inception FID vs the whole test set or None}."""
    final = result.get("final") or {}
    inc = final.get("inception_full") or {}
    mnist = final.get("mnist_features") or {}
    return {"mnist": mnist.get("fid"), "inception": inc.get("fid"), "n_mnist": mnist.get("n_samples"),
            "n_inception": inc.get("n_samples")}  # fmt: skip


def gather(roots: list[Path]) -> list[dict]:
    """One row per run: design, label, seed, images seen, failed (the reason) and its FIDs."""
    rows = []
    for root in roots:
        for path in sorted(Path(root).rglob("result.json")):
            r = json.loads(path.read_text())
            rows.append({"design": design_of(path.relative_to(root)), "label": r["label"], "seed": r["seed"],
                         "kimg": r.get("images_seen", 0) / 1000, "failed": r.get("failed"),
                         "run": path.parent.relative_to(root).as_posix(), **fids(r)})  # fmt: skip
    return sorted(rows, key=lambda x: (x["design"], x["label"], x["seed"]))


def summarise(rows: list[dict]) -> list[dict]:
    """Per (design, label): the seeds, per feature set the stat over healthy seeds (Inception only where every
    healthy seed was scored) and the comparison with reverse KL of the same design."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["design"], r["label"]), []).append(r)
    out = []
    for (design, label), runs in groups.items():
        ok = [r for r in runs if not r["failed"]]
        diverged = [{"seed": r["seed"], "kimg": r["kimg"], "why": r["failed"]} for r in runs if r["failed"]]
        row = {"design": design, "label": label, "seeds": [r["seed"] for r in ok], "diverged": diverged}
        for key, _ in FEATURES:
            values = [r[key] for r in ok]
            row[key] = ss.stat(values) if values and all(v is not None for v in values) else None
            row[f"{key}_per_seed"] = values
        out.append(row)
    base = {g["design"]: g for g in out if g["label"] == BASELINE}
    for g in out:
        b = base.get(g["design"])
        for key, _ in FEATURES:
            g[f"{key}_vs_rkl"] = None if b is None or g is b else ss.compare(g[key], b[key])
    return sorted(out, key=lambda g: (g["design"], (g["mnist"] or {}).get("mean", float("inf"))))


def orders(summary: list[dict]) -> dict:
    """Per feature set, every setting with a statistic, best (lowest mean) first."""
    res = {}
    for key, _ in FEATURES:
        have = [g for g in summary if g[key] is not None]
        res[key] = [{"design": g["design"], "label": g["label"], "mean": g[key]["mean"], "n": g[key]["n"]}
                    for g in sorted(have, key=lambda g: g[key]["mean"])]  # fmt: skip
    return res


def _seeds(values: list, seeds: list[int]) -> str:
    if all(v is None for v in values):
        return "-"
    return ", ".join(f"{s}: {'-' if v is None else common.fmt(v, 3)}" for s, v in zip(seeds, values, strict=True))


def render(data: dict, _extra: dict | None = None) -> str:
    roots = ", ".join(f"`{Path(r).name}`" for r in data["sizes"]["roots"])
    lines = [f"## {TITLE}", "", f"Gathered {data['date_utc']} from {len(data['runs'])} run records under {roots} "
             f"(commit {data['git_commit']}; command `{data['command']}`).", ""]  # fmt: skip
    lines += ["Final EMA students at 150k images. FID with MNIST features at n = 2000 and Inception FID at n = 2000, "
              "both against the whole 10k test set; mean [min, max] over the healthy seeds; 'vs rkl' by the sweep's "
              "rule (better or worse only where the seed ranges are disjoint). Inception is blank where not every "
              "seed was scored.", ""]  # fmt: skip
    for design in sorted({g["design"] for g in data["summary"]}):
        lines += [f"### {design}", ""]
        head = ["objective", "seeds", "MNIST FID per seed", "MNIST FID", "vs rkl", "Inception per seed",
                "Inception FID", "vs rkl", "diverged"]  # fmt: skip
        rows = []
        for g in (g for g in data["summary"] if g["design"] == design):
            div = "; ".join(f"seed {d['seed']} at {d['kimg']:g} kimg" for d in g["diverged"]) or "-"
            cells = [f"`{g['label']}`", len(g["seeds"])]
            for key, _ in FEATURES:
                vs = g[f"{key}_vs_rkl"]
                cells += [_seeds(g[f"{key}_per_seed"], g["seeds"]), ss.fmt_stat(g[key]) if g[key] else "-",
                          vs if vs not in (None, "n/a") else "-"]  # fmt: skip
            rows.append([*cells, div])
        lines += [*common.table(head, rows), ""]
    for key, title in FEATURES:
        order = data["orders"][key]
        shown = " < ".join(f"{o['label']} ({o['design']}, {common.fmt(o['mean'], 3)}, {common.count(o['n'], 'seed')})"
                           for o in order)  # fmt: skip
        lines += [f"**Order under {title}** (mean, lowest first): {shown or 'nothing scored yet'}.", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="*", type=Path, default=None, help="folders searched for result.json")
    args = common.parse(common.add_common_args(p), argv, NAME)
    roots = args.runs if args.runs is not None else [RESULTS / d for d in DEFAULT_RUNS]
    device = common.setup(args)
    data = common.record(NAME, args, device, {"roots": [str(r) for r in roots]})
    data["runs"] = gather([r for r in roots if Path(r).is_dir()])
    data["summary"] = summarise(data["runs"])
    data["orders"] = orders(data["summary"])
    common.finish(data, args.out, render)
    return data


if __name__ == "__main__":
    main(sys.argv[1:])
