"""bench/rescore_inception.py: a finished sweep run's exported student is scored at n samples against the whole
reference, the result kept in its result.json (a second call computes nothing); a folder without a run is skipped.
The Inception net is replaced by the MNIST feature net here (no Inception weights in tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_rescore_adds_inception_full_once(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.chdir(ROOT)
    import common
    import mnist_sweep
    import rescore_inception
    import sweeprun
    from dibregman.metrics import features

    monkeypatch.setattr(common, "mnist_available", lambda: False)
    work = tmp_path / "work"
    mnist_sweep.main(["--quick", "--threads", "1", "--seeds", "1", "--only", "rkl", "--teacher-nfe", "0",
                      "--out", str(tmp_path / "out"), "--work", str(work)])  # fmt: skip
    (rd,) = [p.parent for p in work.rglob("result.json")]
    mnist_net = features.get_feature_net("mnist", "cpu")
    monkeypatch.setattr(features, "get_feature_net", lambda name, device: mnist_net)
    reference = "digits:"  # the built-in small digit set stands in for the 10k test set

    capsys.readouterr()
    (r,) = rescore_inception.main([str(rd), str(tmp_path), "--n", "12", "--threads", "1", "--reference", reference])
    printed = capsys.readouterr().out
    assert "no result.json or generator.safetensors, skipped" in printed and "rkl seed 0: Inception FID" in printed
    saved = sweeprun.read_result(rd)["final"]["inception_full"]
    assert saved["n_samples"] == 12 and saved["n_reference"] > 12 and saved == r["final"]["inception_full"]
    before = (rd / "result.json").stat().st_mtime_ns
    rescore_inception.main([str(rd), "--n", "12", "--threads", "1", "--reference", reference])
    assert (rd / "result.json").stat().st_mtime_ns == before  # already there at this n: nothing recomputed
