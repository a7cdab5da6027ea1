"""The `mnist-paper` preset: the paper's own design (presets.PAPER_DESIGN) -- SiDA's parameter-free mean head,
raw weights h''(r) r kept finite by the logit clamp alone, the generator's t ~ U[0, 1] over the whole sigma range,
no GAN term."""

import math

import torch

from dibregman import build, divergences
from dibregman.config import override, validate
from dibregman.draws import schedule_of
from dibregman.networks.discriminator import DiscriminatorHead
from dibregman.presets import PAPER_DESIGN, get_preset


def test_paper_preset_is_mnist_with_the_paper_design_only():
    paper, mnist = get_preset("mnist-paper"), get_preset("mnist")
    assert validate(paper) == override(mnist, PAPER_DESIGN)
    assert (paper.model.disc_head, paper.divergence.normalize, paper.divergence.weight_clip) == ("mean", "none", None)
    assert (paper.loss.gen_t_max, paper.loss.gan_weight) == (1.0, 0.0)
    assert paper.model.teacher == mnist.model.teacher and paper.optim == mnist.optim


def test_paper_weights_are_raw_and_finite_at_every_lambda_up_to_10():
    cfg = override(get_preset("mnist-paper"), {"divergence.name": "sba", "divergence.lam": 10.0})
    div, stab = divergences.get("sba", lam=cfg.divergence.lam), build.stabilizer(cfg)
    l = torch.tensor([-100.0, -8.0, -0.3, 0.0, 0.2, 8.0, 100.0])
    sigma = torch.linspace(0.01, 80, len(l))
    w = divergences.stabilized_weight(div, l, sigma, stab)
    assert bool(torch.isfinite(w).all())
    clamped = l.clamp(-8, 8).double()
    torch.testing.assert_close(w.double(), torch.exp(-10.0 * clamped), rtol=1e-5, atol=0)  # no normalisation, no cap
    assert w.max() > 1e34 and w.min() < 1e-34  # raw: nothing but the clamp bounds them
    # the clamp is the widest that keeps every |lam| <= 10 finite in float32
    assert 10 * stab.logit_clamp < math.log(torch.finfo(torch.float32).max)


def test_paper_generator_draws_the_whole_sigma_range():
    cfg = get_preset("mnist-paper")
    schedule = schedule_of(cfg.loss)
    g = torch.Generator().manual_seed(0)
    lo, hi = 0.002, 80.0
    s = schedule.draw(20_000, cfg.loss.gen_t_max, lo, hi, generator=g, origin=cfg.loss.gen_t_origin)
    assert float(s.min()) < 0.01 and float(s.max()) > 60  # t ~ U[0, 1]: both ends reached
    capped = schedule.draw(20_000, get_preset("mnist").loss.gen_t_max, lo, hi, generator=g)
    assert float(capped.min()) > 0.08  # the mnist preset stops at t = 0.8 (sigma ~ 0.085)


def test_mean_head_has_no_parameters_and_reads_the_feature_mean():
    head = DiscriminatorHead(feature_channels=6, head="mean")
    assert list(head.parameters()) == []
    f = torch.randn(3, 6, 4, 4)
    torch.testing.assert_close(head(f), f.flatten(2).mean(2).mean(1))
