"""validate(): the discriminator's sigma range must cover the generator step's (both are Karras(t) on
[gen_sigma_min, gen_sigma_max] with t ~ U[0, t_max], t = 0 at the top, see draws.draw_batch), else the generator
step reads ratios at noise levels the discriminator never trained on."""

import pytest

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
