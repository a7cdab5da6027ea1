"""The objective sweeps' shared machinery (bench/seedstats.py, bench/sweeprun.py): statistics over seeds on
synthetic numbers, and bitwise-equal weights training bitwise-equal runs."""

import json
import math
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import seedstats as ss  # noqa: E402
import sweeprun  # noqa: E402


def test_band_stat_target_and_compare_on_synthetic_numbers():
    a = [(0.0, 100.0), (5.0, 40.0), (10.0, 20.0)]
    b = [(0.0, 110.0), (5.0, 30.0), (10.0, 24.0), (15.0, 9.0)]
    x, mean, lo, hi = ss.band([a, b])
    assert x == [0.0, 5.0, 10.0] and mean == [105.0, 35.0, 22.0] and lo == [100.0, 30.0, 20.0] and hi[1] == 40.0
    assert ss.stat([3.0, None, float("nan"), 1.0, 2.0]) == {"mean": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert ss.stat([None]) is None and ss.fmt_stat(None) == "n/a"
    assert ss.fmt_stat(ss.stat([20.0, 24.0])) == "22 [20, 24]" and ss.fmt_stat(ss.stat([7.0])) == "7"
    assert ss.checkpoints([5.0, 10.0, 15.0, 20.0]) == [5.0, 10.0, 20.0]  # nearest to 1/4, 1/2, 1 of the last
    assert ss.stat_at([a, b], 10.0) == {"mean": 22.0, "min": 20.0, "max": 24.0, "n": 2}
    assert ss.kimg_to_target(a, 40.0) == 5.0 and ss.kimg_to_target(a, 19.0) is None
    assert ss.kimg_to_target([(0.0, 1.0), (5.0, 7.5)], 7.0, lower_is_better=False) == 5.0  # a score: >= target
    r = ss.reach([a, b], 25.0)
    assert r["per_seed"] == [10.0, 10.0] and r["reached"] == 2 and r["kimg"]["mean"] == 10.0
    r = ss.reach([a, b], 15.0)
    assert r["per_seed"] == [None, 15.0] and r["reached"] == 1 and ss.fmt_reach(r) == "15 kimg (1/2 seeds)"
    assert ss.reach([a], None) is None and ss.fmt_reach(ss.reach([a], 1.0)) == "not reached (0/1)"
    assert ss.tail_mean(b) == pytest.approx((24 + 9) / 2)  # the second half: kimg >= 7.5
    low, high, mid = ss.stat([10.0, 12.0]), ss.stat([13.0, 15.0]), ss.stat([11.0, 14.0])
    assert ss.compare(low, high) == ss.BETTER and ss.compare(high, low) == ss.WORSE
    assert ss.compare(low, high, lower_is_better=False) == ss.WORSE  # a score: higher is better
    assert ss.compare(mid, low) == ss.TIE and ss.compare(ss.stat([12.0, 13.0]), high) == ss.TIE  # touching: tie
    assert ss.compare(ss.stat([1.0]), high) == ss.ONE_SEED and ss.compare(None, high) == "n/a"


def test_tail_mean_is_the_second_half_of_training():
    assert ss.tail_mean([(0.0, 9.0), (5.0, 1.0), (10.0, 2.0), (20.0, 3.0)]) == pytest.approx(2.5)  # kimg >= 10
    assert ss.tail_mean([]) is None


def test_bitwise_equal_weights_are_one_run_and_train_bitwise_equal(tmp_path):
    """SBA(lambda = -1) and forward KL share the weight e^l bit for bit: the sweeps train them once. Check that
    they do train identically, and that another weight (reverse KL's 1) does not."""
    from dibregman.config import override
    from dibregman.loop import Trainer
    from dibregman.presets import get_preset
    from test_distill import GMM_SMALL

    assert sweeprun.identical_weights(list(sweeprun.FIGURE4)) == {"fkl": "sba(lam=-1)"}
    states = {}
    for name, params in (("sba", {"lam": -1.0}), ("fkl", {}), ("rkl", {})):
        pairs = {**GMM_SMALL, "divergence.name": name, **{f"divergence.{k}": v for k, v in params.items()}}
        cfg = override(get_preset("gmm"), {**pairs, "run.total_kimg": 0.256, "run.device": "cpu"})
        tr = Trainer(cfg, tmp_path / name)
        tr.train()
        states[name] = tr.ema.state_dict()
        logs = sweeprun.read_log(tmp_path / name)
        if name == "fkl":
            assert min(r["weight/ess_frac"] for r in logs) < 1.0  # the weights are not all equal: a real test
    equal = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert equal(states["sba"], states["fkl"]) and not equal(states["fkl"], states["rkl"])
