"""bench/fewstep.py --quick: MNIST and GMM students of K = 1, 2 for both training inputs train, are scored, plotted and
reported; the same command again trains nothing (resumable runs), and --collect rebuilds the same numbers. Without
data/mnist (patched away here) the quick mode scores against teacher samples, so this runs on a fresh checkout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _argv(tmp_path, *extra) -> list[str]:
    return [
        "--quick", "--threads", "1", "--seeds", "1", "--gmm-seeds", "1", "--gmm-teachers", "gmm:ring8",
        "--steps", "1,2", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_fewstep_quick_trains_reports_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.chdir(ROOT)
    import common
    import fewstep

    monkeypatch.setattr(common, "mnist_available", lambda: False)
    data = fewstep.main(_argv(tmp_path))
    labels = ["k1", "k2-backward_sim", "k2-noised_data"]
    assert [r["label"] for r in data["mnist"]["runs"]] == labels and not data["mnist"]["missing"]
    assert [r["label"] for r in data["gmm"]["runs"]] == labels and not data["gmm"]["missing"]
    assert [r["sigmas"] for r in data["mnist"]["runs"]] == [[2.5], [2.5, 0.8], [2.5, 0.8]]
    assert all(r["images_seen"] == 16 for r in data["mnist"]["runs"])  # equal training images
    run0 = json.loads((Path(data["mnist"]["runs"][0]["run_dir"]) / "config.json").read_text())
    assert run0["loss"]["gen_t_max"] == run0["loss"]["disc_t_max"] == 1.0  # fewstep.FULL_RANGE
    assert data["mnist"]["recipe"]["loss.gen_t_max"] == 1.0
    assert [r["nfe"] for r in data["mnist"]["speed"]] == [1, 2, 35]
    out = tmp_path / "out"
    for png in data["plots"]:
        assert (out / png).stat().st_size > 1000, png
    md = (out / "fewstep.md").read_text()
    row = data["summary"]["mnist"][1]
    assert "## Few-step students" in md and "SMOKE RUN" in md and "| 2 | backward_sim | [2.5, 0.8] |" in md
    assert common.fmt(row["fid"]["mean"], 4) in md
    saved = json.loads((out / "fewstep.json").read_text())
    assert saved["summary"]["mnist"][1]["fid"] == row["fid"]

    capsys.readouterr()
    again = fewstep.main(_argv(tmp_path))
    assert capsys.readouterr().out.count("finished, skipped") == 6  # three MNIST and three GMM runs
    collected = fewstep.main(_argv(tmp_path, "--collect"))
    for part in ("mnist", "gmm"):
        assert again["summary"][part] == collected["summary"][part] == data["summary"][part]


def test_a_result_written_before_a_key_existed_is_the_same_config(tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    import sweeprun
    from dibregman.config import override
    from dibregman.presets import get_preset

    cfg = get_preset("gmm")
    old = cfg.to_dict()
    del old["model"]["student_steps"], old["loss"]["student_inputs"]  # as written before few-step students
    result = {"config": old, "eval_sizes": {"n": 1}}
    assert sweeprun.result_problem(result, cfg, {"n": 1}) is None
    assert "model.student_steps" in sweeprun.result_problem(result, override(cfg, {"model.student_steps": 2}), {"n": 1})
