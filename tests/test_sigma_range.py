"""validate(): the discriminator's sigma range must cover the generator step's (both are S(t) on
[gen_sigma_min, gen_sigma_max] with S the loss.sigma_schedule, Karras by default, and t ~ U[0, t_max], t = 0 at
the top, see draws.draw_batch), else the generator step reads ratios at noise levels the discriminator never
trained on; and the flow schedules' options are checked."""

import pytest
import torch

from dibregman.config import override, validate
from dibregman.presets import PRESETS, get_preset


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "sd15"])  # sd15 needs a prompts file
def test_presets_cover(name):
    cfg = validate(get_preset(name))
    assert cfg.loss.disc_t_max >= cfg.loss.gen_t_max


def test_uncovered_generator_sigma_is_refused():
    with pytest.raises(ValueError) as e:
        validate(override(get_preset("gmm"), {"loss.disc_t_max": 0.95}))  # the gmm preset before the fix
    msg = str(e.value)
    assert "loss.disc_t_max=0.95" in msg and "loss.gen_t_max=1.0" in msg
    assert "[0.00193, 2]" in msg and "[0.001, 2]" in msg  # both ranges, in sigma
    validate(override(get_preset("gmm"), {"loss.gen_t_max": 0.9, "loss.disc_t_max": 0.9}))  # equal ranges are fine


def test_sid_origin_needs_the_full_discriminator_range():
    sid = {"loss.gen_t_origin": "sigma_min", "loss.gen_t_max": 0.8}
    with pytest.raises(ValueError, match="gen_t_origin=sigma_min"):
        validate(override(get_preset("mnist"), {**sid, "loss.disc_t_max": 0.95}))
    validate(override(get_preset("mnist"), {**sid, "loss.disc_t_max": 1.0}))


def _flow_sigma_at(p: float, lo: float = 0.002, hi: float = 80.0) -> float:
    """sigma at position p of flow_logit_normal(0, 1) on [lo, hi], from the standard library's normal CDF."""
    import math
    from statistics import NormalDist

    def logit_cdf(sigma):  # P(t <= sigma / (1 + sigma)) = Phi(logit t) = Phi(ln sigma)
        return NormalDist().cdf(math.log(sigma))

    c_lo, c_hi = logit_cdf(lo), logit_cdf(hi)
    return math.exp(NormalDist().inv_cdf(c_hi - p * (c_hi - c_lo)))  # sigma = t / (1 - t) = e^{logit t}


def test_uncovered_flow_schedule_is_refused_in_one_line():
    flow = {"loss.sigma_schedule": "flow_logit_normal", "loss.gen_t_max": 1.0}
    with pytest.raises(ValueError) as e:
        validate(override(get_preset("mnist"), {**flow, "loss.disc_t_max": 0.9}))
    msg = str(e.value)
    assert "\n" not in msg and "sigma_schedule=flow_logit_normal" in msg
    assert f"[{_flow_sigma_at(0.9):.3g}, 80]" in msg and "[0.002, 80]" in msg  # the flow schedule's sigma spans
    from dibregman.noise import karras_sigma_at

    assert f"[{float(karras_sigma_at(torch.tensor(0.9), 0.002, 80.0)):.3g}, 80]" not in msg  # not Karras' spans
    validate(override(get_preset("mnist"), {**flow, "loss.disc_t_max": 1.0}))
    sid = {**flow, "loss.gen_t_max": 0.8, "loss.gen_t_origin": "sigma_min", "loss.disc_t_max": 0.95}
    with pytest.raises(ValueError, match="set loss.disc_t_max to 1"):
        validate(override(get_preset("mnist"), sid))


@pytest.mark.parametrize(
    ("pairs", "match"),
    [
        ({"loss.flow_shift": 3.0}, "loss.flow_shift=3.0 has no effect with loss.sigma_schedule=karras"),
        ({"loss.sigma_schedule": "flow_uniform", "loss.flow_t_std": 2.0}, "flow_t_std=2.0 has no effect"),
        ({"loss.sigma_schedule": "flow_uniform", "loss.flow_shift": 0.0}, "loss.flow_shift=0.0 must be > 0"),
        ({"loss.sigma_schedule": "flow_logit_normal", "loss.flow_t_std": -1.0}, "loss.flow_t_std=-1.0 must be > 0"),
        ({"loss.sigma_schedule": "flow"}, "loss.sigma_schedule='flow' is not valid; choose one of"),
    ],
)
def test_flow_options_are_checked(pairs, match):
    with pytest.raises(ValueError, match=match):
        validate(override(get_preset("mnist"), pairs))
    flow = {"loss.sigma_schedule": "flow_logit_normal", "loss.flow_shift": 3.0, "loss.flow_t_mean": -0.5}
    validate(override(get_preset("mnist"), {**flow, "loss.flow_t_std": 1.5}))
