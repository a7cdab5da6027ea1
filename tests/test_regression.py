"""DMD's regression term (`loss.regression_weight`, regression.py): the pairs are the teacher's ODE map, kept in
the run folder and refused under another config, the term pulls G towards them, and resume stays bitwise."""

from __future__ import annotations

import pytest
import torch

from dibregman.config import override, validate
from dibregman.loop import Trainer
from dibregman.metrics.gmm_metrics import mode_statistics
from dibregman.noise import karras_sigmas
from dibregman.presets import get_preset
from dibregman.regression import FILE
from dibregman.sample import heun_sampler
from test_distill import GMM_SMALL

REG = {"loss.regression_weight": 1.0, "loss.regression_pairs": 512, "loss.regression_steps": 12}


def _cfg(steps: int, **pairs):
    return override(get_preset("gmm"), {**GMM_SMALL, "run.total_kimg": steps * 32 / 1000, **REG, **pairs})


def _params(tr: Trainer) -> dict:
    mods = {"g": tr.m.generator, "f": tr.m.fake, "d": tr.m.disc, "e": tr.ema}
    return {f"{n}.{k}": v.clone() for n, m in mods.items() for k, v in m.state_dict().items()}


def test_pairs_are_the_teachers_ode_map_and_cover_every_mode(tmp_path):
    """x = Heun(sigma_max z) from the stored z; on an uneven ring (2 % on the lightest mode) the map carries
    every mode with close to its weight, which is what the term hands the generator."""
    tr = Trainer(_cfg(1, **{"model.teacher": "gmm:ring8-uneven", "loss.regression_pairs": 2000}), tmp_path)
    reg, t = tr.regression, tr.m.teacher
    sigmas = karras_sigmas(12, max(0.002, float(t.sigma_min)), min(80.0, float(t.sigma_max)), 7.0)
    assert torch.allclose(reg.x[:64], heun_sampler(t, reg.z[:64], sigmas).float(), atol=1e-6)
    st = mode_statistics(reg.x, t.means, t.covs, t.weights)
    assert st["modes_covered"] == 8 and st["within_3sigma"] > 0.95
    assert (tmp_path / FILE).is_file()


def test_the_term_pulls_the_generator_to_its_pairs(tmp_path):
    """From the same start, 40 steps with a large weight end far closer to the pairs than 40 without the term (which
    drift away from them: the tiny MLP's Eq. 4 step has no reason to follow the ODE map); without it nothing is
    made or logged."""
    mse = {}
    for w in (0.0, 50.0):
        tr = Trainer(_cfg(40, **{"loss.regression_weight": w, "optim.gen_lr": 3e-3}), tmp_path / str(w))
        if w == 0.0:
            assert tr.regression is None and not (tmp_path / str(w) / FILE).exists()
            z, x, _ = Trainer(_cfg(1), tmp_path / "pairs").regression.batch(0, 0, 512)
            with torch.no_grad():
                start = (tr.m.generator(z, None) - x).square().mean()
        tr.train()
        with torch.no_grad():
            mse[w] = (tr.m.generator(z, None) - x).square().mean()
    assert mse[50.0] < start and mse[50.0] < 0.5 * mse[0.0]
    assert '"loss/gen_regression"' in (tmp_path / "50.0" / "log.jsonl").read_text()
    assert '"loss/gen_regression"' not in (tmp_path / "0.0" / "log.jsonl").read_text()


def test_resume_with_the_term_is_bitwise_exact_and_reuses_the_pairs(tmp_path):
    full = Trainer(_cfg(6), tmp_path / "full")
    full.train()
    Trainer(_cfg(3), tmp_path / "split").train()
    stamp = (tmp_path / "split" / FILE).stat().st_mtime_ns
    resumed = Trainer(_cfg(6), tmp_path / "split")
    assert resumed.state.step == 3 and (tmp_path / "split" / FILE).stat().st_mtime_ns == stamp
    resumed.train()
    a, b = _params(full), _params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pairs_made_for_another_config_are_refused(tmp_path):
    Trainer(_cfg(1), tmp_path)
    with pytest.raises(ValueError, match="holds pairs made for"):
        Trainer(_cfg(1, **{"loss.regression_pairs": 256}), tmp_path)


def test_bad_regression_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="regression_weight=-1.0 must be >= 0"):
        validate(_cfg(1, **{"loss.regression_weight": -1.0}))
    with pytest.raises(ValueError, match="regression_pairs=0"):
        validate(_cfg(1, **{"loss.regression_pairs": 0}))


def test_a_reward_turns_the_presets_term_off_and_refuses_an_explicit_one():
    """The term pulls G to the untilted teacher's ODE map (q to p), a reward tilts q to p r*: the same rule as the
    GAN term."""
    from dibregman import api

    assert get_preset("gmm").loss.regression_weight > 0
    with pytest.warns(UserWarning, match="turns off the 'gmm' preset's regression term"):
        cfg = api.preset("gmm", **{"reward.name": "gmm_modes"})
    assert cfg.loss.regression_weight == 0 and cfg.loss.gan_weight == 0
    with pytest.raises(ValueError, match="regression_weight must be 0 with a reward"):
        api.preset("gmm", **{"reward.name": "gmm_modes", "loss.regression_weight": 0.5})
