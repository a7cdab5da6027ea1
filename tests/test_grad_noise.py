"""`bench/grad_noise.py`: the generator gradient under each objective's weights, at a checkpoint it only reads."""

import hashlib
import json
import math
import sys
from pathlib import Path

import pytest

from dibregman.loop import distill

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from test_distill import gmm_cfg, steps_kimg  # noqa: E402


def test_grad_noise_pairs_objectives_at_a_checkpoint_it_leaves_alone(tmp_path):
    import grad_noise

    run = tmp_path / "run"
    distill(gmm_cfg(**{"run.total_kimg": steps_kimg(300), "run.device": "cpu"}), run)
    ckpt = sorted(run.glob("ckpt-*.pt"))[-1]
    before = hashlib.sha256(ckpt.read_bytes()).hexdigest(), sorted(p.name for p in run.iterdir())
    argv = [str(ckpt), "--batches", "8", "--objectives", "sba(lam=5),fkl", "--out", str(tmp_path / "a")]
    a = grad_noise.main(argv)
    assert (hashlib.sha256(ckpt.read_bytes()).hexdigest(), sorted(p.name for p in run.iterdir())) == before
    (row,) = a["checkpoints"]
    objs = row["objectives"]
    assert list(objs) == ["rkl", "sba(lam=5)", "fkl"]  # reverse KL first: the reference
    assert row["kimg"] == pytest.approx(steps_kimg(300)) and row["batch"] == 32
    rkl = objs["rkl"]
    assert rkl["batch_equiv"] == 1.0 and rkl["cos_rkl"] == pytest.approx(1.0) and rkl["ess_frac"] == pytest.approx(1)
    assert objs["sba(lam=5)"]["ess_frac"] < 1 and objs["sba(lam=5)"]["weight_max"] > 1
    for r in objs.values():
        assert r["noise"] > 0 and all(math.isfinite(r[k]) for k in ("noise", "signal", "rel_noise"))
    b = grad_noise.main([*argv[:-1], str(tmp_path / "b")])  # the same batches: the same numbers
    assert b["checkpoints"][0]["objectives"] == objs
    assert json.loads((tmp_path / "a/grad_noise.json").read_text())["checkpoints"][0]["objectives"] == objs
    assert "| sba(lam=5) |" in (tmp_path / "a/grad_noise.md").read_text()
    c = grad_noise.main([*argv[:-1], str(tmp_path / "b"), "--append", "--objectives", "lr"])  # measured again: replaced
    assert len(c["checkpoints"]) == 1 and list(c["checkpoints"][0]["objectives"]) == ["rkl", "lr (= js)"]
    other = tmp_path / "other" / ckpt.name
    other.parent.mkdir()
    other.write_bytes(ckpt.read_bytes())
    d = grad_noise.main([str(other), "--batches", "4", "--objectives", "lr", "--out", str(tmp_path / "b"), "--append"])
    assert [r["run"] for r in d["checkpoints"]] == ["run", "other"]  # another checkpoint: added
    e = grad_noise.main([*argv[:-1], str(tmp_path / "b"), "--append", "--set", "divergence.weight_clip=2"])
    assert [(r["run"], r["set"]) for r in e["checkpoints"]][-1] == ("run", {"divergence.weight_clip": 2})
    assert len(e["checkpoints"]) == 3 and e["checkpoints"][-1]["objectives"]["sba(lam=5)"]["weight_max"] <= 2
    assert "weights with weight_clip=2" in (tmp_path / "b/grad_noise.md").read_text()
    import verdict

    assert set(verdict.gradient_noise(e)) == {"lr (= js)"}  # the --set row is not the sweep's weights: left out
    row = {"signal": 1.0, "batch_equiv": 0.5, "cos_rkl": 1.0}
    two = {"checkpoints": [{"batches": k, "objectives": {"rkl": row, "lr (= js)": row}} for k in (32, 16)]}
    n = verdict.gradient_noise(two)["lr (= js)"]
    assert n["batches"] == [16, 32]
    assert "16-32 paired batches" in verdict._noise({"label": "lr (= js)"}, {"lr (= js)": n})
    with pytest.raises(ValueError, match="divergence.. keys only"):
        grad_noise.main([str(ckpt), "--set", "optim.gen_lr=1", "--out", str(tmp_path / "c")])
    bad = tmp_path / "bad" / ckpt.name
    bad.parent.mkdir()
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable dibregman checkpoint"):
        grad_noise.main([str(bad), "--out", str(tmp_path / "c")])
    with pytest.raises(ValueError, match="not among the objectives"):
        grad_noise.main([str(ckpt), "--objectives", "sba(lam=7)", "--out", str(tmp_path / "c")])
