"""bench/equal_tuning.py --quick: every probe of the written rule trains and is scored, the best setting is the
lowest score, the finals continue the winner's probe run (a prefix of the full schedule) and add seeds, and the
start's score is read from the sweep's own run when --records holds it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_equal_tuning_quick_probes_best_and_finals(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.chdir(ROOT)
    import common
    import equal_tuning

    monkeypatch.setattr(common, "mnist_available", lambda: False)
    monkeypatch.setattr(equal_tuning, "COMMON_PROBES", {"start": {}, "batch-x4": {"batch_factor": 4}})
    monkeypatch.setattr(equal_tuning, "OWN_PROBE", {"rkl": ("lr-1to1", {"optim.gen_lr": 2e-4})})
    monkeypatch.setattr(equal_tuning, "OBJECTIVES", {"rkl": ("rkl", "rkl", {})})
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--quick", "--threads", "1", "--seeds", "2", "--out", str(out), "--work", str(work), "--records", ""]

    data = equal_tuning.main(argv)
    rows = {r["probe"]: r for r in data["probes"]}
    assert set(rows) == {"start", "batch-x4", "lr-1to1"} and all(r["score"] is not None for r in rows.values())
    assert rows["batch-x4"]["batch"] == 4 * rows["start"]["batch"]
    assert rows["lr-1to1"]["score"] != rows["start"]["score"]  # the override reached the run
    best = min(rows.values(), key=lambda r: r["score"])
    assert data["best"]["rkl"]["probe"] == best["probe"]
    # no --finals: nothing trains beyond the probes (here the probe is the whole quick schedule: seed 0 is done)
    assert [bool(r.get("missing")) for r in data["finals"]] == [False, True]

    capsys.readouterr()
    data = equal_tuning.main([*argv, "--finals"])
    printed = capsys.readouterr().out
    assert printed.count("finished, skipped") == 1  # seed 0 is the winner's probe run, already at the end
    assert [r["seed"] for r in data["finals"]] == [0, 1] and not any(r.get("missing") for r in data["finals"])
    assert data["summary"]["rkl"]["fid"]["n"] == 2 and data["summary"]["rkl"]["probe"] == best["probe"]
    md = (out / "equal_tuning.md").read_text()
    assert "The rule, written before any probe ran" in md and f"Best for rkl: `{best['probe']}`" in md
    assert json.loads((out / "equal_tuning.json").read_text())["best"] == data["best"]
    assert (out / "equal_tuning.png").stat().st_size > 1000

    # the start's score from the sweep's own run: its folder under --records/mnist_sweep, same config and seed
    start = Path(rows["start"]["run_dir"])
    records = tmp_path / "records"
    shutil.copytree(start, records / "mnist_sweep" / start.parent.name / start.name)
    shutil.rmtree(start)
    again = equal_tuning.main([*argv[:-1], str(records), "--collect"])
    row = next(r for r in again["probes"] if r["probe"] == "start")
    assert row["source"].startswith("the sweep's run") and row["score"] == rows["start"]["score"]
