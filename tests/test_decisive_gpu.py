"""bench/decisive_gpu.py: --quick probes, plans one number of images for every run, trains 2 designs x 2 batches x
2 objectives x 2 seeds, reports them (JSON, Markdown with the winner per design and batch, PNG) and a second call
reuses the plan and trains nothing. Without data/mnist (patched away here) and without a tuning file it runs on a
fresh checkout. The budget arithmetic and the tuning file's reading are checked apart, without training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def _argv(tmp_path, *extra) -> list[str]:
    return ["--quick", "--threads", "1", "--best", str(tmp_path / "absent.json"), "--out", str(tmp_path / "out"),
            "--work", str(tmp_path / "work"), *extra]  # fmt: skip


@pytest.mark.slow
def test_decisive_gpu_quick_plans_trains_reports_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    import common
    import decisive_gpu

    monkeypatch.setattr(common, "mnist_available", lambda: False)
    data = decisive_gpu.main(_argv(tmp_path))
    n = data["plan"]["images_per_run"]
    assert data["plan"]["source"].startswith("measured") and n == data["plan"]["unit"] == 8  # lcm(4, 8) x 1 point
    assert sorted(data["plan"]["probe"]["sec_per_image"]) == [
        f"{d}/b{b}/{o}" for d in ("paper", "recipe") for b in (4, 8) for o in ("rkl", "sba(lam=5)")
    ]
    assert len(data["runs"]) == 16 and not data["missing"] and not data["not_started"]
    assert {r["images_seen"] for r in data["runs"]} == {n}  # every run saw the same images
    rows = data["summary"]["rows"]
    assert [(r["design"], r["batch"], r["label"]) for r in rows] == [
        (d, b, o) for d in ("paper", "recipe") for b in (4, 8) for o in ("rkl", "sba(lam=5)")
    ]
    assert all(r["seeds"] == [0, 1] and r["fid"]["n"] == 2 for r in rows)
    assert all(v["winner"] in ("rkl", "sba(lam=5)", "tie") for v in data["summary"]["verdicts"])
    out = tmp_path / "out"
    assert (out / "decisive_gpu.png").stat().st_size > 1000
    md = (out / "decisive_gpu.md").read_text()
    assert "SMOKE RUN" in md and f"Every run saw {n} training images" in md and "No tuning file" in md
    assert "| paper design | 4 | `rkl` | 2 |" in md and "| recipe (no tuning file) | 8 | `sba(lam=5)` | 2 |" in md
    assert md.count("| **") == 4  # one winner per design and batch
    saved = json.loads((out / "decisive_gpu.json").read_text())
    assert saved["summary"]["verdicts"] == data["summary"]["verdicts"]

    capsys.readouterr()
    again = decisive_gpu.main(_argv(tmp_path))
    assert capsys.readouterr().out.count("finished, skipped") == 16
    assert again["plan"]["source"].startswith("reused") and again["summary"]["rows"] == rows


def test_one_number_of_images_fits_the_budget_for_every_run():
    import decisive_gpu

    per_image = [1e-4] * 12 + [4e-5] * 12  # seconds per image: 12 runs at batch 256, 12 at batch 1024
    unit = 1024 * 10  # lcm(256, 1024) x 10 in-loop points
    plan = decisive_gpu.plan_images(per_image, 5.0, 500.0, unit, None)
    n = plan["images_per_run"]
    assert n % unit == 0 and n >= unit and not plan["over_budget"] and not plan["capped"]
    assert plan["predicted_s"] <= 500.0 < 24 * 5.0 + (n + unit) * sum(per_image)  # the largest that fits
    assert decisive_gpu.plan_images(per_image, 5.0, 100.0, unit, None) == {
        "images_per_run": unit, "predicted_s": 120.0 + unit * sum(per_image), "over_budget": True, "capped": False,
    }  # fmt: skip
    capped = decisive_gpu.plan_images(per_image, 5.0, 500.0, unit, 25_000)
    assert capped["images_per_run"] == 2 * unit and capped["capped"]


def test_design_b_reads_each_objectives_best_setting(tmp_path):
    import decisive_gpu

    path = tmp_path / "equal_tuning.json"
    best = {"rkl": {"set": {"optim.gen_lr": 2e-4}}, "sba(lam=5)": {"set": {"optim.fake_lr": 3e-4, "run.seed": 9}}}
    path.write_text(json.dumps({"best": best}))
    paper, tuned = decisive_gpu.designs(path)
    assert paper["paper_design"] and not tuned["paper_design"] and tuned["key"] == "best"
    assert tuned["sets"] == {k: v["set"] for k, v in best.items()} and "run.seed" in tuned["note"]
    path.write_text(json.dumps({"best": {"rkl": best["rkl"]}}))
    with pytest.raises(ValueError, match="sba"):
        decisive_gpu.designs(path)
    assert decisive_gpu.designs(tmp_path / "absent.json")[1]["label"] == "recipe (no tuning file)"
