"""The analytic mixture teacher against independent references: Monte-Carlo posterior means, scipy."""

import math

import numpy as np
import pytest
import torch

from dibregman.sample import sample_teacher
from dibregman.teachers import Denoiser, GaussianMixture, load_teacher, ring_mixture


def _full_cov_mixture(d: int = 2, num_modes: int = 3, seed: int = 0) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(num_modes, d, generator=g, dtype=torch.float64)
    a = torch.randn(num_modes, d, d, generator=g, dtype=torch.float64)
    covs = 0.3 * a @ a.transpose(1, 2) + 0.05 * torch.eye(d, dtype=torch.float64)  # full, well conditioned
    return GaussianMixture(means, covs=covs, weights=torch.tensor([0.5, 0.3, 0.2][:num_modes]))


@pytest.mark.parametrize("sigma", [0.3, 1.0, 3.0])
def test_denoiser_equals_monte_carlo_posterior_mean(sigma):
    gmm = _full_cov_mixture()
    gen = torch.Generator().manual_seed(1)
    x0 = gmm.sample(400_000, generator=gen).double()  # prior samples, the importance proposal
    x = gmm.sample(6, sigma=sigma, generator=gen)  # query points from the noisy marginal
    # E[x0 | x_t = x] = sum_j w_j x0_j with w_j proportional to p(x_t = x | x0_j) = N(x; x0_j, sigma^2 I)
    logw = -(x.double()[:, None] - x0[None]).square().sum(-1) / (2 * sigma**2)  # [6, M]
    w = logw.softmax(dim=1)
    mc = w @ x0  # [6, 2]
    stderr = (w.square()[:, :, None] * (x0[None] - mc[:, None]).square()).sum(1).sqrt()  # [6, 2]
    exact = gmm(x, sigma).double()
    assert ((exact - mc).abs() <= 5 * stderr + 2e-3).all(), (exact, mc, stderr)


@pytest.mark.parametrize("sigma", [0.0, 0.1, 1.0, 10.0])
def test_score_is_gradient_of_log_prob_and_tweedie(sigma):
    gmm = _full_cov_mixture(d=3)
    x = gmm.sample(64, sigma=sigma + 0.5, generator=torch.Generator().manual_seed(2)).double()
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(gmm.log_prob(x, sigma).sum(), x)
    torch.testing.assert_close(gmm.score(x.detach(), sigma), grad, rtol=1e-9, atol=1e-9)
    if sigma > 0:  # Tweedie: D(x) = x + sigma^2 score(x)
        torch.testing.assert_close(gmm(x.detach(), sigma), x.detach() + sigma**2 * grad, rtol=1e-9, atol=1e-9)


def test_log_prob_matches_scipy_and_integrates_to_one():
    from scipy.stats import multivariate_normal

    gmm = _full_cov_mixture()
    sigma = 0.7
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    ref = sum(
        float(w)
        * multivariate_normal(m.numpy(), (c + sigma**2 * torch.eye(2, dtype=torch.float64)).numpy()).pdf(x.numpy())
        for w, m, c in zip(gmm.weights, gmm.means, gmm.covs, strict=True)
    )
    np.testing.assert_allclose(gmm.log_prob(x, sigma).numpy(), np.log(ref), rtol=1e-10)
    lo = gmm.means.min(0).values - 8
    hi = gmm.means.max(0).values + 8
    n = 300
    gx, gy = torch.meshgrid(*[torch.linspace(lo[i], hi[i], n, dtype=torch.float64) for i in range(2)], indexing="ij")
    cell = ((hi - lo) / (n - 1)).prod()
    mass = gmm.log_prob(torch.stack([gx.flatten(), gy.flatten()], 1), sigma).exp().sum() * cell
    assert abs(float(mass) - 1) < 1e-3


def test_samples_have_the_mixture_moments():
    gmm = _full_cov_mixture(d=3)
    x, labels = gmm.sample(200_000, sigma=0.5, generator=torch.Generator().manual_seed(4), return_labels=True)
    freq = torch.bincount(labels, minlength=3).double() / len(labels)
    torch.testing.assert_close(freq, gmm.weights, atol=5e-3, rtol=0)
    mean = gmm.weights @ gmm.means
    second = torch.einsum("k,kde->de", gmm.weights, gmm.covs + gmm.means[:, :, None] * gmm.means[:, None, :])
    cov = second - torch.outer(mean, mean) + 0.25 * torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(x.double().mean(0), mean, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(x.double().T), cov, atol=0.1, rtol=0.02)
    assert gmm.sigma_data == pytest.approx(math.sqrt((cov.diagonal().sum() - 0.75) / 3))


def test_ring_mixture_attributes_and_registry():
    ring = load_teacher("gmm:ring8")
    assert isinstance(ring, Denoiser) and ring.num_modes == 8 and ring.shape == (2,)
    assert ring.sigma_min == 1e-3 and ring.sigma_max == 80.0
    assert ring.sigma_data == pytest.approx(math.sqrt(2**2 / 2 + 0.05**2))
    torch.testing.assert_close(ring.means.norm(dim=1), torch.full((8,), 2.0, dtype=torch.float64))
    assert load_teacher("gmm:ring4", radius=1.0).num_modes == 4
    with pytest.raises(ValueError, match="valid"):
        load_teacher("gmm:spiral")
    with pytest.raises(ValueError, match="edm"):
        load_teacher("pickle:model.pkl")


def test_conditional_denoiser_is_the_component_denoiser():
    gmm = _full_cov_mixture()
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(5))
    single = GaussianMixture(gmm.means[1:2], covs=gmm.covs[1:2])
    cond = torch.ones(10, dtype=torch.long)
    torch.testing.assert_close(gmm(x, 0.8, cond), single(x, 0.8))
    assert (gmm.responsibilities(x, 0.8, cond)[:, 1] == 1).all()


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture(torch.zeros(1, 2), covs=torch.tensor([[[1.0, 0.0], [0.0, -1.0]]]))
    with pytest.raises(ValueError, match="exactly one"):
        GaussianMixture(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(torch.zeros(2, 2), stds=1.0, weights=torch.tensor([1.0, -1.0]))


def _mode_fractions(gmm: GaussianMixture, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    labels = gmm.mode_assignment(x, max_distance=4.0)  # P(chi_d > 4) < 3e-3 for d <= 3
    near = float((labels >= 0).double().mean())
    return torch.bincount(labels[labels >= 0], minlength=gmm.num_modes).double() / len(x), near


def test_heun_on_ring_reproduces_mode_weights():
    ring = ring_mixture()
    x = sample_teacher(ring, 4000, num_steps=18, generator=torch.Generator().manual_seed(6), batch_size=4000)
    frac, near = _mode_fractions(ring, x)
    assert (frac - 1 / 8).abs().max() < 0.03, frac
    assert near > 0.98


def test_heun_on_uneven_full_covariance_mixture_reproduces_weights():
    gmm = GaussianMixture(
        torch.tensor([[2.0, 0.0, 0.0], [-2.0, 0.0, 1.0], [0.0, 2.5, -1.0], [0.0, -2.5, 0.0]]),
        covs=torch.stack([torch.tensor([[0.05, 0.02, 0.0], [0.02, 0.03, 0.01], [0.0, 0.01, 0.02]])] * 4),
        weights=torch.tensor([0.4, 0.3, 0.2, 0.1]),
    )
    x = sample_teacher(gmm, 4000, num_steps=18, generator=torch.Generator().manual_seed(7), batch_size=4000)
    frac, near = _mode_fractions(gmm, x)
    assert (frac - gmm.weights).abs().max() < 0.03, frac
    assert near > 0.98


def test_named_uneven_and_grid_mixtures():
    from dibregman.teachers.gmm import geometric_weights, gmm_from_spec

    w = geometric_weights(12, 0.02)
    assert abs(float(w.sum()) - 1) < 1e-12 and abs(float(w.min()) - 0.02) < 1e-9
    assert int(w.argmax()) == 0 and int(w.argmin()) == 1  # heavy and light modes are neighbours
    ring = gmm_from_spec("ring12-uneven")
    assert ring.num_modes == 12 and torch.allclose(ring.weights, w)
    grid = gmm_from_spec("grid25")
    assert grid.num_modes == 25 and torch.allclose(grid.weights, torch.full((25,), 0.04, dtype=torch.float64))
    assert torch.allclose(grid.means.mean(0), torch.zeros(2, dtype=torch.float64))
    for bad in ("grid24", "ring8-skewed", "ring2-uneven", "blob"):
        with pytest.raises(ValueError, match="mixture"):
            gmm_from_spec(bad)
