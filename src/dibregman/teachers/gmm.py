"""Exact analytic teacher: a Gaussian mixture in any dimension, with any weights and full covariances.

Data p_0 = sum_k pi_k N(mu_k, Sigma_k). Adding EDM noise (x_t = x0 + sigma * eps) keeps it a mixture, so every
noisy marginal is known in closed form:

    p_sigma(x)  = sum_k pi_k N(x; mu_k, C_k),                   C_k = Sigma_k + sigma^2 I
    gamma_k(x)  = pi_k N(x; mu_k, C_k) / p_sigma(x)            (responsibilities, via log-sum-exp)
    D(x, sigma) = E[x0 | x_t = x] = sum_k gamma_k(x) (mu_k + Sigma_k C_k^{-1} (x - mu_k))
    score       = grad_x log p_sigma(x) = -sum_k gamma_k(x) C_k^{-1} (x - mu_k) = (D - x) / sigma^2  (Tweedie)

Numerics: each Sigma_k = U_k diag(lambda_k) U_k^T is diagonalised once (eigh, which is exact and stable for
symmetric positive-definite matrices), so C_k^{-1} = U_k diag(1 / (lambda_k + sigma^2)) U_k^T and
log det C_k = sum log(lambda_k + sigma^2) cost O(d) per sigma. This is what a Cholesky factorisation per sigma
would give, but it also handles a different sigma for every sample in the batch without refactorising.
All maths runs in float64; outputs come back in the input's dtype.

`cond` (optional, int64 [N]) selects one component per sample: the denoiser then is that of the
class-conditional teacher p_0(x | k) = N(mu_k, Sigma_k): the mixture doubles as a conditional teacher.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class GaussianMixture(nn.Module):
    """Analytic mixture teacher `D(x, sigma, cond=None) -> E[x0 | x_t = x]`; `.to(device)` moves buffers."""

    sigma_min: float = 1e-3  # smallest noise level the samplers should use
    sigma_max: float = 80.0  # largest noise level (EDM's)

    def __init__(
        self,
        means: torch.Tensor,  # [K, d] component means
        covs: torch.Tensor | None = None,  # [K, d, d] full covariances (symmetric positive definite)
        stds: torch.Tensor | float | None = None,  # [K] or scalar isotropic standard deviations (instead of covs)
        weights: torch.Tensor | None = None,  # [K] mixture weights (normalised here); None = uniform
    ):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must have shape [K, d], got {tuple(means.shape)}")
        num_modes, d = means.shape
        if (covs is None) == (stds is None):
            raise ValueError("give exactly one of covs ([K, d, d]) or stds ([K] or a float)")
        if covs is not None:
            covs = torch.as_tensor(covs, dtype=torch.float64)
            if covs.shape != (num_modes, d, d):
                raise ValueError(f"covs must have shape {(num_modes, d, d)}, got {tuple(covs.shape)}")
            if not torch.allclose(covs, covs.transpose(1, 2), atol=1e-10):
                raise ValueError("covs must be symmetric")
        else:
            s = torch.as_tensor(stds, dtype=torch.float64).reshape(-1).expand(num_modes)
            covs = s.square()[:, None, None] * torch.eye(d, dtype=torch.float64)
        if weights is None:
            weights = torch.full((num_modes,), 1.0 / num_modes, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if weights.shape != (num_modes,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be {num_modes} non-negative numbers, got {weights.tolist()}")
        eigvals, eigvecs = torch.linalg.eigh(covs)  # Sigma_k = U diag(lambda) U^T
        if (eigvals <= 0).any():
            raise ValueError(f"covs must be positive definite; smallest eigenvalue {eigvals.min().item():.3g}")
        self.register_buffer("means", means)  # [K, d]
        self.register_buffer("covs", covs)  # [K, d, d]
        self.register_buffer("weights", weights / weights.sum())  # [K]
        self.register_buffer("eigvals", eigvals)  # [K, d]
        self.register_buffer("eigvecs", eigvecs)  # [K, d, d], columns are eigenvectors
        mean = self.weights @ means  # [d]
        second = torch.einsum("k,kde->de", self.weights, covs + means[:, :, None] * means[:, None, :])
        total_cov = second - torch.outer(mean, mean)
        self.sigma_data = float(total_cov.diagonal().mean().sqrt())  # overall data std (per coordinate, RMS)
        self.shape = (d,)
        self.num_modes = num_modes

    # ---- the maths, all in float64 -------------------------------------------------------------------------

    def _sigma(self, sigma, x: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1)
        return s.expand(x.shape[0]) if s.numel() == 1 else s  # [N]

    def _terms(self, x: torch.Tensor, sigma, cond=None):
        """Whitened residuals a = C_k^{-1} (x - mu_k) in the eigenbasis, and log pi_k N(x; mu_k, C_k)."""
        x = x.to(torch.float64).reshape(x.shape[0], -1)  # [N, d]
        s2 = self._sigma(sigma, x).square()  # [N]
        var = self.eigvals[None] + s2[:, None, None]  # [N, K, d] eigenvalues of C_k
        z = torch.einsum("kde,nkd->nke", self.eigvecs, x[:, None] - self.means[None])  # U^T (x - mu), [N, K, d]
        a = z / var  # [N, K, d]
        d = x.shape[1]
        log_pdf = -0.5 * ((z * a).sum(-1) + var.log().sum(-1) + d * math.log(2 * math.pi))  # [N, K]
        log_joint = log_pdf + self.weights.log()[None]
        if cond is not None:
            mask = torch.nn.functional.one_hot(torch.as_tensor(cond, device=x.device).long(), self.num_modes)
            log_joint = log_joint.masked_fill(mask == 0, -math.inf)
        return x, a, log_joint

    def responsibilities(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        """gamma_k(x) = p(component k | x_t = x) at noise level sigma, [N, K] (rows sum to 1)."""
        return self._terms(x, sigma, cond)[2].softmax(dim=1).to(x.dtype)

    def log_prob(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """log p_sigma(x), [N] in float64 (differentiable)."""
        return self._terms(x, sigma)[2].logsumexp(dim=1)

    def forward(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        """Exact denoiser D(x, sigma) = E[x0 | x_t = x]."""
        x64, a, log_joint = self._terms(x, sigma, cond)
        gamma = log_joint.softmax(dim=1)  # [N, K]
        shrink = torch.einsum("kde,nke->nkd", self.eigvecs, self.eigvals[None] * a)  # Sigma_k C_k^{-1} (x - mu_k)
        x0 = torch.einsum("nk,nkd->nd", gamma, self.means[None] + shrink)
        return x0.reshape(x.shape).to(x.dtype)

    def score(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        """grad_x log p_sigma(x) = -sum_k gamma_k C_k^{-1} (x - mu_k), exact (also at sigma = 0)."""
        _, a, log_joint = self._terms(x, sigma, cond)
        gamma = log_joint.softmax(dim=1)
        s = -torch.einsum("nk,kde,nke->nd", gamma, self.eigvecs, a)
        return s.reshape(x.shape).to(x.dtype)

    # ---- sampling and evaluation helpers -------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        n: int,  # number of samples
        sigma: float = 0.0,  # noise level: exact samples of p_sigma
        generator: torch.Generator | None = None,
        return_labels: bool = False,  # also return the component index of each sample
    ):
        """Exact samples of p_sigma, float32 [n, d] on the mixture's device (and labels int64 [n])."""
        dev = generator.device if generator is not None else self.means.device
        labels = torch.multinomial(self.weights.to(dev), n, replacement=True, generator=generator)
        eps = torch.randn(n, self.shape[0], generator=generator, device=dev, dtype=torch.float64)
        noise = torch.randn(n, self.shape[0], generator=generator, device=dev, dtype=torch.float64)
        labels = labels.to(self.means.device)
        eps, noise = eps.to(self.means.device), noise.to(self.means.device)
        root = self.eigvecs[labels] * self.eigvals[labels].sqrt()[:, None, :]  # U sqrt(Lambda), [n, d, d]
        x = self.means[labels] + torch.einsum("nde,ne->nd", root, eps) + sigma * noise
        return (x.float(), labels) if return_labels else x.float()

    def mahalanobis(self, x: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of each x to each component at sigma = 0, [N, K]."""
        x = x.to(torch.float64).reshape(x.shape[0], -1)
        z = torch.einsum("kde,nkd->nke", self.eigvecs, x[:, None] - self.means[None])
        return (z.square() / self.eigvals[None]).sum(-1).sqrt()

    def mode_assignment(self, x: torch.Tensor, max_distance: float | None = None) -> torch.Tensor:
        """Nearest component in the Mahalanobis sense, int64 [N]; -1 where farther than `max_distance`."""
        dist, labels = self.mahalanobis(x).min(dim=1)
        if max_distance is not None:
            labels = labels.masked_fill(dist > max_distance, -1)
        return labels


def ring_mixture(
    num_modes: int = 8,  # number of modes, evenly spaced on a circle
    radius: float = 2.0,  # circle radius
    std: float = 0.05,  # isotropic standard deviation of each mode
    weights: torch.Tensor | None = None,  # [num_modes] mixture weights; None = uniform
) -> GaussianMixture:
    """The standard 2-D ring: modes at radius 2, std 0.05 (so sigma_data = sqrt(radius^2/2 + std^2) ~ 1.415).

    Mode k sits at angle 2 pi k / num_modes. Neighbouring modes are 2 * 2 sin(pi / 8) = 1.53 apart, i.e. 30
    stds: well separated, so a dropped mode is unambiguous, while their tight width punishes blurry samples.
    """
    angles = 2 * math.pi * torch.arange(num_modes, dtype=torch.float64) / num_modes
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture(means, stds=std, weights=weights)


def grid_mixture(
    side: int = 5,  # modes per row: side x side modes on a square grid
    spacing: float = 1.0,  # distance between neighbouring modes
    std: float = 0.05,  # isotropic standard deviation of each mode
    weights: torch.Tensor | None = None,  # [side^2] mixture weights; None = uniform
) -> GaussianMixture:
    """A centred 2-D grid of side^2 modes (the 25-mode grid of the GAN mode-collapse literature)."""
    c = (torch.arange(side, dtype=torch.float64) - (side - 1) / 2) * spacing
    means = torch.cartesian_prod(c, c)
    return GaussianMixture(means, stds=std, weights=weights)


def geometric_weights(num_modes: int, smallest: float) -> torch.Tensor:
    """Weights falling geometrically from the first mode to the last, the last carrying `smallest` of the mass,
    interleaved (0, K-1, 1, K-2, ...) so that heavy and light modes are neighbours."""
    assert num_modes >= 2 and 0 < smallest < 1 / num_modes
    lo, hi = 1e-6, 1.0  # ratio q of consecutive weights, found by bisection: q^(K-1) / sum q^k = smallest
    for _ in range(100):
        q = 0.5 * (lo + hi)
        w = q ** torch.arange(num_modes, dtype=torch.float64)
        lo, hi = (q, hi) if w[-1] / w.sum() < smallest else (lo, q)
    w = w / w.sum()
    order = [i // 2 if i % 2 == 0 else num_modes - 1 - i // 2 for i in range(num_modes)]
    return w[torch.tensor(order)]


# Named mixtures for `gmm:NAME`. `uneven` ones put 2 % of the mass on their lightest mode: a default recipe must not
# drop it (issue: mode coverage on data nobody tuned for).
MIXTURES = {
    "ringN": "N modes on a circle of radius 2, equal weights (ring8 is the tuned default)",
    "ringN-uneven": "N modes on the circle, weights geometric from heaviest to 2 % (neighbours alternate)",
    "gridN": "N = k*k modes on a square grid (spacing 1), equal weights",
    "gridN-uneven": "the grid with geometric weights down to 2 %",
}


def gmm_from_spec(name: str, **kwargs) -> GaussianMixture:
    """Named mixtures (`MIXTURES`): `ring8`, `ringN`, `ringN-uneven`, `gridN`, `gridN-uneven`; kwargs go to the
    builder (`ring_mixture` / `grid_mixture`)."""
    base, _, variant = name.partition("-")
    kind = "ring" if base.startswith("ring") else "grid" if base.startswith("grid") else ""
    num = base[4:] or ("8" if kind == "ring" else "25")
    if kind and num.isdigit() and variant in ("", "uneven"):
        k = int(num)
        side = math.isqrt(k)
        if kind == "ring" and k >= 1 or kind == "grid" and side * side == k and k >= 1:
            if variant == "uneven":
                if k < 3:
                    raise ValueError(f"mixture {name!r}: 'uneven' needs at least 3 modes")
                kwargs.setdefault("weights", geometric_weights(k, 0.02))
            return ring_mixture(k, **kwargs) if kind == "ring" else grid_mixture(side, **kwargs)
    raise ValueError(f"unknown mixture {name!r}; valid: " + "; ".join(f"{k} ({v})" for k, v in MIXTURES.items()))


__all__ = [
    "GaussianMixture",
    "ring_mixture",
    "grid_mixture",
    "geometric_weights",
    "gmm_from_spec",
    "tilted_mixture",
    "MIXTURES",
]


def tilted_mixture(teacher: GaussianMixture, factors: torch.Tensor) -> tuple[GaussianMixture, float]:
    """Exact p r* of the `gmm_modes` reward R = c_K for a mixture teacher: weights pi_k c_k / Z; returns
    (mixture, Z)."""
    w = teacher.weights.double().cpu() * factors.double()
    return GaussianMixture(teacher.means.cpu(), covs=teacher.covs.cpu(), weights=w), float(w.sum())
