"""Samplers: exact ODE solutions, DDIM = Euler (parity with diffusers' DDIMScheduler), evaluation counts."""

import math

import pytest
import torch

from dibregman.networks.unet import build_unet
from dibregman.noise import karras_sigmas
from dibregman.sample import (
    count_evaluations,
    ddim_sampler,
    euler_sampler,
    heun_sampler,
    sample_teacher,
)
from dibregman.teachers import GaussianMixture, ring_mixture


class _Counting:
    """Wraps a denoiser and counts its evaluations."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, sigma, cond=None):
        self.calls += 1
        return self.denoiser(x, sigma, cond)


def test_heun_18_steps_is_35_evaluations():
    assert count_evaluations(18, "heun") == 35
    assert count_evaluations(18, "euler") == count_evaluations(18, "ddim") == 18
    sigmas = karras_sigmas(18)
    for fn, name in [(heun_sampler, "heun"), (euler_sampler, "euler"), (ddim_sampler, "ddim")]:
        d = _Counting(ring_mixture())
        fn(d, torch.randn(4, 2), sigmas)
        assert d.calls == count_evaluations(18, name)
    with pytest.raises(ValueError, match="heun"):
        count_evaluations(18, "dpm")


def test_heun_is_second_order_on_the_gaussian_flow_ode():
    # p_0 = N(mu, s^2 I): the flow ODE is linear, x(t) - mu = sqrt((s^2 + t^2) / (s^2 + T^2)) (x_T - mu)
    mu, s = torch.tensor([1.0, -2.0]), 0.5
    gauss = GaussianMixture(mu[None], stds=s)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    exact = mu + s / math.sqrt(s**2 + 80.0**2) * (80.0 * noise - mu)  # at t = 0

    def err(fn, num_steps):
        return float((fn(gauss, noise, karras_sigmas(num_steps, 0.002, 80.0)) - exact).abs().max())

    heun18, heun72, euler18, euler72 = (
        err(heun_sampler, 18),
        err(heun_sampler, 72),
        err(euler_sampler, 18),
        err(euler_sampler, 72),
    )
    assert heun18 < euler18 / 2 and heun72 < 1e-2 * s
    assert heun18 / heun72 > 10  # 2nd order: 4x the steps, ~16x smaller error
    assert 2 < euler18 / euler72 < 6  # 1st order: ~4x smaller error


@pytest.mark.parametrize("which", ["gmm", "unet"])
def test_ddim_equals_euler_in_edm_form(which):
    torch.manual_seed(0)
    if which == "gmm":
        denoiser, shape = ring_mixture(), (2,)
    else:
        denoiser, shape = build_unet("tiny").eval().requires_grad_(False), (1, 8, 8)
        with torch.no_grad():
            for p in denoiser.parameters():
                p.add_(0.1 * torch.randn_like(p))  # make the network's contribution non-trivial
    noise = torch.randn(2, *shape)
    sigmas = karras_sigmas(4)
    with torch.no_grad():
        a, b = ddim_sampler(denoiser, noise, sigmas), euler_sampler(denoiser, noise, sigmas)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_ddim_matches_diffusers_ddim_scheduler():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", set_alpha_to_one=True, clip_sample=False
    )
    sched.set_timesteps(10)
    alpha_bar = sched.alphas_cumprod.double()
    gmm = GaussianMixture(torch.tensor([[1.0, 0.0], [-1.0, 0.5]]), stds=torch.tensor([0.2, 0.3]))
    # VP <-> EDM: x_VE = x_VP / sqrt(alpha_bar), sigma = sqrt((1 - alpha_bar) / alpha_bar)
    sig = [float(((1 - alpha_bar[t]) / alpha_bar[t]).sqrt()) for t in sched.timesteps]
    sigmas = torch.tensor([*sig, 0.0], dtype=torch.float64)
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_vp = noise * float(alpha_bar[sched.timesteps[0]].sqrt() * sigmas[0])
    for t, s in zip(sched.timesteps, sig, strict=True):
        x_ve = x_vp / alpha_bar[t].sqrt()
        eps = (x_ve - gmm(x_ve, s)) / s  # epsilon prediction of the same teacher
        x_vp = sched.step(eps, t, x_vp, eta=0.0).prev_sample
    ours = ddim_sampler(gmm, noise, sigmas)
    torch.testing.assert_close(ours, x_vp, rtol=1e-6, atol=1e-6)  # final alpha_bar = 1: x_VP = x_VE


def test_sample_teacher_shapes_cond_and_errors():
    ring = ring_mixture()
    cond = torch.full((10,), 3, dtype=torch.long)
    x = sample_teacher(ring, 10, num_steps=8, cond=cond, batch_size=4, generator=torch.Generator().manual_seed(2))
    assert x.shape == (10, 2)
    assert (ring.mode_assignment(x, max_distance=5.0) == 3).all()
    net = build_unet("tiny").eval()
    assert sample_teacher(net, 3, num_steps=2, sampler="euler").shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="heun"):
        sample_teacher(ring, 4, sampler="dpm++")


def test_sample_teacher_from_given_latents_is_the_ode_map_of_those_latents():
    ring = ring_mixture()
    z = torch.randn(10, 2, generator=torch.Generator().manual_seed(3))
    x = sample_teacher(ring, 10, num_steps=8, noise=z, batch_size=4)
    sigmas = karras_sigmas(8, max(0.002, ring.sigma_min), min(80.0, ring.sigma_max), 7.0)
    torch.testing.assert_close(x, heun_sampler(ring, z.clone(), sigmas), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"noise must have shape \(10, 2\)"):
        sample_teacher(ring, 10, noise=z[:9])
