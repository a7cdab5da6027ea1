"""bench/critic_retest.py (issue 31, item 1): the test-retest statistics on logits with a known split into signal
and noise, the isotropic 784-D mixture against `GaussianMixture`'s exact maths, and a --quick run of the script
(tiny sizes: the JSON's structure, finite numbers in range, the generator frozen, the report re-rendered from the
JSON alone)."""

import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.chdir(ROOT)  # the script chdirs to the repository root; restore the cwd afterwards


def test_retest_stats_split_signal_from_noise(bench):
    from critic_stats import exact_stats, retest_stats

    g = torch.Generator().manual_seed(0)
    n, sd_signal, sd_noise = 200_000, 0.4, 0.3
    s = sd_signal * torch.randn(n, generator=g)
    l1 = s + sd_noise * torch.randn(n, generator=g) + 2.0  # a per-critic offset: the bin normalisation cancels it
    l2 = s + sd_noise * torch.randn(n, generator=g) - 1.0
    r = retest_stats(l1, l2)
    assert r["delta_centred"] == pytest.approx(sd_noise, rel=0.01)
    assert r["delta"] == pytest.approx(math.sqrt(sd_noise**2 + 3**2 / 2), rel=0.01)  # the offset 3 counts, / sqrt(2)
    assert r["signal_var"] == pytest.approx(sd_signal**2, rel=0.02)
    assert r["snr"] == pytest.approx((sd_signal / sd_noise) ** 2, rel=0.03)
    assert r["corr"] == pytest.approx(sd_signal**2 / (sd_signal**2 + sd_noise**2), rel=0.01)
    assert r["factor"]["5"] == pytest.approx(math.exp(5 * sd_noise), rel=0.05)
    assert 0 < r["weight_corr"]["10"] < r["weight_corr"]["1"] < 1  # larger lambda: heavier tails, less agreement
    assert 0 < r["ess"]["10"] < r["ess"]["1"] < 1
    same = retest_stats(l1, l1)
    assert same["delta"] == same["delta_centred"] == 0 and same["factor"]["10"] == 1
    assert same["corr"] == pytest.approx(1) and same["weight_corr"]["5"] == pytest.approx(1)
    e = exact_stats(l1, s)
    assert e["bias"] == pytest.approx(2.0, abs=0.01) and e["rmse_centred"] == pytest.approx(sd_noise, rel=0.01)


def test_isotropic_mixture_is_gaussian_mixture_exactly(bench):
    from critic_retest_gmm import IsotropicMixture, pair
    from dibregman.calibration import exact_log_ratio
    from dibregman.teachers.gmm import GaussianMixture

    g = torch.Generator().manual_seed(1)
    means, w = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.tensor([0.5, 0.3, 0.2])
    fast, ref = IsotropicMixture(means, 0.3, w), GaussianMixture(means, stds=0.3, weights=w)
    x = 2 * torch.randn(64, 5, generator=g, dtype=torch.float64)
    for sigma in (0.0, 0.1, torch.linspace(0.01, 3, 64, dtype=torch.float64)):
        torch.testing.assert_close(fast.log_prob(x, sigma), ref.log_prob(x, sigma))
        torch.testing.assert_close(fast(x, sigma), ref(x, sigma))
    assert fast.sigma_data == pytest.approx(ref.sigma_data)
    y, labels = fast.sample(20_000, generator=g, return_labels=True)
    torch.testing.assert_close(torch.bincount(labels, minlength=3) / 20_000.0, w.float(), atol=0.01, rtol=0)
    torch.testing.assert_close((y - fast.means[labels].float()).std(), torch.tensor(0.3), atol=0.005, rtol=0)
    p, q, _ = pair()
    assert p.shape == (784,) and 0.4 < p.sigma_data < 0.6  # MNIST's dimension and scale
    x0 = q.sample(256, generator=g).double()
    exact = exact_log_ratio(p, q, x0 + 0.1 * torch.randn(x0.shape, generator=g, dtype=torch.float64), 0.1)
    assert exact.abs().max() <= math.log(2) + 1e-6 and exact.std() > 0.2  # separated modes: log(p_k / q_k)


@pytest.mark.slow
def test_quick_run_writes_json_md_png(bench, tmp_path):
    import critic_retest

    out, argv = tmp_path / "out", ["--quick", "--threads", "1", "--heads", "linear_x50,mean"]
    assert critic_retest.main([*argv, "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    d = json.loads((out / "critic_retest.json").read_text())
    assert d["quick"] and d["benchmark"] == "critic_retest" and d["lambdas"] == [1.0, 3.0, 5.0, 10.0]
    nb = len(d["bins"])
    assert nb == 2 and all(0 < b["sigma"][0] < b["sigma"][1] for b in d["bins"])
    assert d["bins"][0]["sigma"][0] > d["bins"][1]["sigma"][0]  # highest sigma first
    assert set(d["mnist"]) == {"linear_x50", "mean"} and "init" in d["mnist"]["mean"]
    for part in ("mnist", "gmm"):
        for label in ("linear_x50", "mean"):
            res = d[part][label]
            assert [r["seed"] for r in res["runs"]] == [0, 1]
            assert len(res["points"]) >= 2 and all(len(p["bins"]) == nb for p in res["points"])
            for b in (b for p in res["points"] for b in p["bins"]):
                assert -1 <= b["corr"] <= 1 and b["delta"] >= b["delta_centred"] >= 0
                assert all(v >= 1 for v in b["factor"].values()) and all(0 < v <= 1 for v in b["ess"].values())
                assert all(math.isfinite(v) for v in (*b["std"], b["signal_var"], *b["weight_corr"].values()))
                if part == "gmm":
                    assert all(math.isfinite(v) and v >= 0 for v in (*b["rmse"], b["exact_std"], b["shared_centred"]))
    for r in d["mnist"]["linear_x50"]["runs"]:
        assert r["generator_frozen"] and r["images"] == 16 and r["curve"]
    assert all(0 <= h["acc"] <= 1 for seed in d["mnist"]["mean"]["heldout"] for h in seed)
    assert (out / "critic_retest.png").stat().st_size > 1000
    md = (out / "critic_retest.md").read_text()
    assert "SMOKE RUN" in md and "λ = 5: weight error factor" in md and "## Where the answer is known" in md
    assert critic_retest.main(["--render-only", "--out", str(out)]) == 0
    assert (out / "critic_retest.md").read_text() == md


@pytest.mark.slow
def test_quick_variant_untrained_generator_without_the_analytic_control(bench, tmp_path):
    import critic_retest

    argv = ["--quick", "--threads", "1", "--heads", "linear_x50", "--generator", "init", "--no-gmm", "--tag", "init"]
    assert critic_retest.main([*argv, "--out", str(tmp_path), "--work", str(tmp_path / "work")]) == 0
    d = json.loads((tmp_path / "critic_retest_init.json").read_text())
    assert d["benchmark"] == "critic_retest_init" and d["setup"]["generator"] == "init" and d["gmm"] == {}
    assert all(r["generator_frozen"] for r in d["mnist"]["linear_x50"]["runs"])
    md = (tmp_path / "critic_retest_init.md").read_text()
    assert "untrained teacher copy" in md and "## Where the answer is known" not in md
    assert "(critic_retest_init.png)" in md and (tmp_path / "critic_retest_init.png").is_file()
    assert not (tmp_path / "critic_retest.json").exists()


def test_bad_flags_are_refused_in_one_line(bench, tmp_path):
    import critic_retest

    with pytest.raises(ValueError, match="--heads 'linear_x7'"):
        critic_retest.main(["--quick", "--heads", "linear_x7", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--eval-kimg"):
        critic_retest.main(["--quick", "--kimg", "1", "--eval-kimg", "2", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--tag"):
        critic_retest.main(["--quick", "--tag", "../x", "--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []  # nothing written
