"""Ratio calibration (dibregman.calibration): the exact log-ratio helper against a closed form, the critic built
exactly as the engine builds it, and a trained discriminator logit that tracks the exact log p_t/q_t where an
untrained one does not (so the bar can fail)."""

import json
import math

import pytest
import torch

from dibregman.build import build_models, pretrain_mlp
from dibregman.calibration import Critic, calibrate, exact_log_ratio, sigma_bins, trainable
from dibregman.config import override
from dibregman.presets import get_preset
from dibregman.teachers.gmm import GaussianMixture, ring_mixture

TINY = {"model.init_steps": 100, "model.mlp_hidden": 32, "model.mlp_depth": 2, "optim.batch_size": 128}
P = ring_mixture(4)  # 4 equal modes on the circle of radius 2
Q = ring_mixture(4, weights=torch.tensor([0.4, 0.1, 0.4, 0.1]))  # the same modes, reweighted: a fixed "student"


def _log_normal(x, mean, var):  # isotropic N(x; mean, var I), per row
    d = x.shape[1]
    return -0.5 * ((x - mean).square().sum(1) / var + d * math.log(2 * math.pi * var))


def test_exact_log_ratio_matches_closed_form_for_two_gaussians():
    m1, m2, s1, s2 = torch.tensor([[0.5, -1.0]]), torch.tensor([[-0.3, 0.2]]), 0.7, 1.6
    p, q = GaussianMixture(m1, stds=s1), GaussianMixture(m2, stds=s2)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    for sigma in (0.0, 0.05, 1.0, 10.0):
        ref = _log_normal(x, m1, s1**2 + sigma**2) - _log_normal(x, m2, s2**2 + sigma**2)
        torch.testing.assert_close(exact_log_ratio(p, q, x, sigma), ref, rtol=1e-10, atol=1e-10)
    # 1-D, equal variances: l* = (m1 - m2) x / (s^2 + sigma^2) + const, linear in x
    p1, q1 = GaussianMixture(torch.tensor([[1.0]]), stds=1.0), GaussianMixture(torch.tensor([[-1.0]]), stds=1.0)
    x1 = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None]
    torch.testing.assert_close(exact_log_ratio(p1, q1, x1, 2.0), 2 * x1[:, 0] / 5)
    # per-sample sigma and a dropped mode (weight 0) stay finite where q has mass
    sig = torch.linspace(0.01, 2, 64, dtype=torch.float64)
    drop = ring_mixture(4, weights=torch.tensor([1.0, 1.0, 0.0, 1.0]))
    assert torch.isfinite(exact_log_ratio(P, drop, x, sig)).all()


@pytest.mark.parametrize("placement", ["fake_score", "separate"])
def test_critic_is_built_as_the_engine_builds_it(placement):
    cfg = override(get_preset("gmm"), {**TINY, "model.init_steps": 5, "model.disc_placement": placement})
    m, ring8 = build_models(cfg, torch.device("cpu")), ring_mixture(8)  # the preset's teacher, gmm:ring8
    for init in (None, pretrain_mlp(ring8, cfg, torch.device("cpu"))):  # fitted here, or a shared fitted MLP
        c = Critic(cfg, ring8, init=init)
        for mine, theirs in ((c.fake, m.fake), (c.disc, m.disc)):
            a, b = mine.state_dict(), theirs.state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not trainable("teacher", "mean") and trainable("teacher", "linear")


def test_sigma_bins_span_the_discriminator_range():
    cfg = get_preset("gmm")
    bins = sigma_bins(cfg, P, 4)
    assert bins[0][3] == pytest.approx(2.0) and bins[-1][2] == pytest.approx(1e-3)  # gen_sigma_max .. sigma_min
    assert all(b[2] < b[3] for b in bins) and all(
        a[2] == pytest.approx(b[3]) for a, b in zip(bins[:-1], bins[1:], strict=True)
    )


def test_trained_logit_tracks_the_exact_log_ratio_and_untrained_does_not():
    cfg = override(get_preset("gmm"), TINY)  # the engine's default head and placement: linear on the fake score
    init = pretrain_mlp(P, cfg, torch.device("cpu"))
    trained = calibrate(cfg, P, Q, 1000, num_bins=4, n_eval=500, init=init, eval_at=(0,))
    low = [b for b in trained["bins"] if b["sigma"][1] <= 0.15]  # the two lowest bins: sigma in [0.001, 0.12]
    assert len(low) == 2
    for b in low:
        assert b["corr"] > 0.9, b
        assert b["rmse"] < 0.7 * b["exact_std"], b  # better than the constant logit 0 (rmse ~ exact_std)
        assert b["acc"] > b["acc_bayes"] - 0.03, b
        assert b["logw_rmse"]["5"] == pytest.approx(5 * b["rmse_q"])
    untrained = trained["curve"][0]  # the zero-initialised head: l = 0, no correlation
    assert untrained["steps"] == 0
    assert not any(b["corr"] > 0.9 for b in untrained["bins"])
    # a head with random non-zero output (mean of the fitted MLP's features) fails the bar too
    mean_head = override(cfg, {"model.disc_head": "mean"})
    assert not any(b["corr"] > 0.9 for b in calibrate(mean_head, P, Q, 0, num_bins=4, n_eval=500, init=init)["bins"])
    with pytest.raises(ValueError, match="no trainable parameters"):
        calibrate(override(cfg, {"model.disc_placement": "teacher", "model.disc_head": "mean"}), P, Q, 1, init=init)


def test_bench_script_writes_json_md_png_and_rerenders_identically(tmp_path, monkeypatch):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root / "bench"))
    monkeypatch.chdir(root)  # the script chdirs to the repository root; restore the cwd afterwards
    import ratio_calibration as rc

    small = ["model.mlp_hidden=32", "model.mlp_depth=2", "optim.batch_size=64", "model.init_steps=5"]
    argv = ["--quick", "--threads", "1", "--out", str(tmp_path), "--steps", "3", "--n-eval", "50", "--bins", "2"]
    assert rc.main(argv + [f"--set={kv}" for kv in small]) == 0
    data = json.loads((tmp_path / "ratio_calibration.json").read_text())
    runs = [r for r in data["runs"] if "skipped" not in r]
    assert len(runs) == 2 * 5 and all(len(r["bins"]) == 2 for r in runs)  # 2 students x 5 trainable combinations
    assert [r for r in data["runs"] if "skipped" in r][0]["placement"] == "teacher"
    assert (tmp_path / "ratio_calibration.png").stat().st_size > 1000
    md = (tmp_path / "ratio_calibration.md").read_text()
    assert "SMOKE RUN" in md and "e^{1.5} ≈ 4.5 at λ = 5" in md
    assert rc.main(["--render-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "ratio_calibration.md").read_text() == md
