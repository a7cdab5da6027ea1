"""bench/claim_evidence.py: the verdict's evidence gathered from run records -- the design read from the path, a
diverged run listed and left out, reverse KL's comparison per design by the seed-range rule, Inception only where
every seed was scored, and the orders under both feature sets."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import claim_evidence  # noqa: E402


def _run(root: Path, folder: str, label: str, seed: int, fid: float, inception: float | None = None, **extra):
    final = {"mnist_features": {"fid": fid, "n_samples": 2000}}
    if inception is not None:
        final["inception_full"] = {"fid": inception, "n_samples": 2000}
    path = root / folder / f"{label.replace('(', '_').replace(')', '')}-s{seed}" / "result.json"
    path.parent.mkdir(parents=True)
    record = {"label": label, "seed": seed, "images_seen": 150_016, "final": final, **extra}
    path.write_text(json.dumps(record))


def test_evidence_groups_by_design_leaves_diverged_runs_out_and_orders_both_feature_sets(tmp_path):
    sweep, paper, tuned = "s/mnist_sweep/150kimg-b64", "p/mnist_sweep_paper/150kimg-b64", "t/equal_tuning/head-mean"
    for seed, (a, b) in enumerate([(4.5, 9.8), (6.9, 13.3)]):
        _run(tmp_path, sweep, "rkl", seed, a)
        _run(tmp_path, sweep, "sba(lam=5)", seed, b, inception=30.0 if seed == 0 else None)
    _run(tmp_path, paper, "rkl", 0, 6.0, inception=14.0)
    _run(tmp_path, paper, "sba(lam=5)", 0, 300.0, failed="diverged: in-loop FID ...", images_seen=55_040)
    for seed in range(3):
        _run(tmp_path, tuned + "/mnist_sweep/150kimg-b64", "rkl", seed, 5.0 + seed, inception=12.0 + seed)
    data = claim_evidence.main(["--runs", str(tmp_path), "--out", str(tmp_path / "out")])

    groups = {(g["design"], g["label"]): g for g in data["summary"]}
    assert set(groups) == {("recipe", "rkl"), ("recipe", "sba(lam=5)"), ("paper design", "rkl"),
                           ("paper design", "sba(lam=5)"), ("tuned: head-mean", "rkl")}  # fmt: skip
    sba = groups[("recipe", "sba(lam=5)")]
    assert sba["mnist"]["mean"] == 11.55 and sba["mnist_vs_rkl"] == "worse"
    assert sba["inception"] is None and sba["inception_per_seed"] == [30.0, None]  # one seed scored: no statistic
    div = groups[("paper design", "sba(lam=5)")]
    assert div["seeds"] == [] and div["mnist"] is None and div["diverged"][0]["kimg"] == 55.04
    tuned_rkl = groups[("tuned: head-mean", "rkl")]
    assert tuned_rkl["inception"] == {"mean": 13.0, "min": 12.0, "max": 14.0, "n": 3}
    assert tuned_rkl["mnist_vs_rkl"] is None  # the baseline of its own design
    assert [(o["design"], o["label"]) for o in data["orders"]["inception"]] == [
        ("tuned: head-mean", "rkl"), ("paper design", "rkl")]  # fmt: skip
    assert data["orders"]["mnist"][0] == {"design": "recipe", "label": "rkl", "mean": 5.7, "n": 2}

    md = (tmp_path / "out" / "claim_evidence.md").read_text()
    assert "### paper design" in md and "seed 0 at 55.04 kimg" in md
    assert "| `sba(lam=5)` | 2 | 0: 9.8, 1: 13.3 | 11.6 [9.8, 13.3] | worse | 0: 30, 1: - | - | - |" in md
    assert "**Order under Inception FID** (mean, lowest first): rkl (tuned: head-mean, 13, 3 seeds) < rkl" in md
