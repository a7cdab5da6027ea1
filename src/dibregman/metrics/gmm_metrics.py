"""Exact metrics for analytic teachers: a Gaussian mixture p(x) = sum_k w_k N(x; mu_k, S_k) in R^d.

Written against plain tensors (means [K, d], covs [K, d, d] (or [K, d] diagonal, or [K] isotropic variances),
weights [K]) or any object with `.means`, `.covs`, `.weights` (duck-typed, e.g. teachers.gmm.GaussianMixture).

Definitions (m_k(x) = Mahalanobis distance of x to component k, k*(x) = argmin_k m_k(x), "nearest mode"):
* within_3sigma: fraction of samples with m_{k*}(x) <= 3. For exact samples of well-separated modes this is
  the chi-square CDF P(chi2_d <= 9) (0.989 in 2-D, 0.47 in 10-D), reported as `within_3sigma_chi2`.
* mode_proportions[k]: fraction of samples whose nearest mode is k (sums to 1); `mode_tv` = total variation
  0.5 sum_k |proportion_k - w_k|.
* mode k is covered when at least `coverage` * w_k * n samples (and at least one) have k as nearest mode AND
  lie within 3 sigma of it; coverage = 0.25, i.e. a quarter of the mode's expected share (1/(4K) for equal
  weights).
* MMD^2: unbiased U-statistic with the Gaussian RBF kernel exp(-|x - y|^2 / (2 h^2)); the bandwidth h is the
  median pairwise distance within the exact reference sample (median heuristic, fixed once per call, so the
  student value and the noise floor use the same kernel) unless given. For a multimodal p the median is
  about the distance between modes, so this kernel is nearly blind to blur within a mode: pass several
  bandwidths (a sum of RBF kernels, e.g. `bandwidth=(0.05, 0.2, 1.0)`) to see several scales at once.
* energy distance: 2 E|X - Y| - E|X - X'| - E|Y - Y'| with U-statistics for the within-set terms.
* noise floor: the same metric between two fresh, independent exact sample sets of the same size (n_kernel),
  `num_floor_trials` times: `*_floor` = mean, `*_floor_std` = std. The student's value (student vs one exact
  reference set) has the same distribution when the student is exact, so a student matches p at this sample
  size when its value lies within about 2-3 floor_std of the floor.
* log_density: mean log p(x) over the student samples; `log_density_exact` is the same for exact samples
  (a Monte-Carlo estimate of -H(p)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def gmm_params(teacher=None, *, means=None, covs=None, weights=None) -> tuple[torch.Tensor, ...]:
    """(means [K, d], full covs [K, d, d], normalised weights [K]) in float64 from an object or tensors."""
    if teacher is not None:
        means, covs, weights = teacher.means, teacher.covs, teacher.weights
    if means is None or covs is None:
        raise ValueError("give a teacher with .means/.covs/.weights or means= and covs=")
    means = torch.as_tensor(means, dtype=torch.float64).cpu()
    covs = torch.as_tensor(covs, dtype=torch.float64).cpu()
    k, d = means.shape
    if covs.ndim == 1:
        covs = covs[:, None, None] * torch.eye(d, dtype=torch.float64)
    elif covs.ndim == 2:
        covs = torch.diag_embed(covs)
    if covs.shape != (k, d, d):
        raise ValueError(
            f"covs must be [K, d, d], [K, d] or [K] for means {tuple(means.shape)}, got {tuple(covs.shape)}"
        )
    w = (
        torch.full((k,), 1.0 / k, dtype=torch.float64)
        if weights is None
        else torch.as_tensor(weights, dtype=torch.float64).cpu()
    )
    if w.shape != (k,) or (w < 0).any():
        raise ValueError(f"weights must be K={k} non-negative numbers, got {w.tolist()}")
    return means, covs, w / w.sum()


def sample_gmm(n: int, means, covs, weights, generator: torch.Generator | None = None) -> torch.Tensor:
    """n exact samples [n, d] (float64)."""
    means, covs, weights = gmm_params(means=means, covs=covs, weights=weights)
    comp = torch.multinomial(weights, n, replacement=True, generator=generator)
    z = torch.randn(n, means.shape[1], generator=generator, dtype=torch.float64)
    chol = torch.linalg.cholesky(covs)
    return means[comp] + (chol[comp] @ z[:, :, None])[:, :, 0]


def mahalanobis_sq(x: torch.Tensor, means: torch.Tensor, covs: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distance of every x [N, d] to every component, [N, K]."""
    chol = torch.linalg.cholesky(covs)  # [K, d, d]
    diff = (x.double()[None] - means[:, None]).transpose(1, 2)  # [K, d, N]
    z = torch.linalg.solve_triangular(chol, diff, upper=False)
    return z.square().sum(1).T


def gmm_log_prob(x: torch.Tensor, means, covs, weights) -> torch.Tensor:
    """log p(x) [N] of the mixture at x [N, d] (float64)."""
    means, covs, weights = gmm_params(means=means, covs=covs, weights=weights)
    d = means.shape[1]
    log_det = 2 * torch.linalg.cholesky(covs).diagonal(dim1=-2, dim2=-1).log().sum(-1)  # [K]
    log_comp = -0.5 * (mahalanobis_sq(x, means, covs) + log_det + d * math.log(2 * math.pi))
    return torch.logsumexp(log_comp + weights.log(), dim=1)


def mode_statistics(x: torch.Tensor, means, covs, weights, *, radius: float = 3.0, coverage: float = 0.25) -> dict:
    """within_3sigma, mode_proportions, mode_tv, modes_covered (see module docstring) for samples x [N, d]."""
    means, covs, weights = gmm_params(means=means, covs=covs, weights=weights)
    m2, nearest = mahalanobis_sq(x, means, covs).min(dim=1)
    inside = m2 <= radius**2
    k = len(weights)
    proportions = torch.bincount(nearest, minlength=k).double() / len(x)
    counts_inside = torch.bincount(nearest[inside], minlength=k).double()
    covered = counts_inside >= torch.clamp(coverage * weights * len(x), min=1.0)
    return {
        "within_3sigma": float(inside.double().mean()),
        "mode_proportions": proportions.tolist(),
        "mode_tv": float(0.5 * (proportions - weights).abs().sum()),
        "modes_covered": int(covered.sum()),
        "num_modes": k,
    }


def median_bandwidth(x: torch.Tensor, max_points: int = 1000) -> float:
    """Median pairwise Euclidean distance of (the first `max_points` of) x."""
    x = x[:max_points].double()
    d = torch.cdist(x, x)
    return float(d[torch.triu_indices(len(x), len(x), offset=1).unbind()].median())


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidth: float | Sequence[float]) -> float:
    """Unbiased MMD^2 with the RBF kernel exp(-|x - y|^2 / (2 h^2)), summed over h in `bandwidth`."""
    x, y = x.double(), y.double()
    n, m = len(x), len(y)
    hs = [bandwidth] if isinstance(bandwidth, (int, float)) else list(bandwidth)

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d2 = torch.cdist(a, b).square()
        return sum((-d2 / (2 * h**2)).exp() for h in hs)

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    n_k = len(hs)  # each kernel's diagonal is 1
    return float((kxx.sum() - n_k * n) / (n * (n - 1)) + (kyy.sum() - n_k * m) / (m * (m - 1)) - 2 * kxy.mean())


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| (U-statistics within sets; diagonals are zero)."""
    x, y = x.double(), y.double()
    n, m = len(x), len(y)
    return float(
        2 * torch.cdist(x, y).mean() - torch.cdist(x, x).sum() / (n * (n - 1)) - torch.cdist(y, y).sum() / (m * (m - 1))
    )


def exact_metrics(
    samples: torch.Tensor,  # [N, d] student samples
    teacher=None,  # object with .means/.covs/.weights, or give them as tensors below
    *,
    means=None,
    covs=None,
    weights=None,
    max_points: int = 2000,  # MMD / energy use the first min(N, max_points) samples (O(n^2) memory)
    num_floor_trials: int = 10,  # exact-vs-exact repetitions for the noise floor
    bandwidth: float | Sequence[float] | None = None,  # RBF bandwidth(s); None = median heuristic
    seed: int = 0,  # exact samples are drawn from this seed
) -> dict:
    """Every exact metric of the module docstring, with exact-sample counterparts and noise floors."""
    from scipy.stats import chi2

    means, covs, weights = gmm_params(teacher, means=means, covs=covs, weights=weights)
    x = samples.detach().double().cpu().reshape(len(samples), -1)
    if x.shape[1] != means.shape[1]:
        raise ValueError(f"samples have dimension {x.shape[1]}, the mixture {means.shape[1]}")
    finite = torch.isfinite(x).all(1)
    x = x[finite]
    if len(x) < 2:
        raise ValueError(f"need at least 2 finite samples, got {len(x)} of {len(samples)}")
    gen = torch.Generator().manual_seed(seed)
    exact = sample_gmm(len(x), means, covs, weights, generator=gen)
    out = {"n_samples": len(x), "n_nonfinite": int((~finite).sum()), "dim": means.shape[1]}
    out.update(mode_statistics(x, means, covs, weights))
    ex = mode_statistics(exact, means, covs, weights)
    out.update({f"{key}_exact": ex[key] for key in ("within_3sigma", "mode_tv", "modes_covered")})
    out["within_3sigma_chi2"] = float(chi2.cdf(9.0, df=means.shape[1]))
    out["log_density"] = float(gmm_log_prob(x, means, covs, weights).mean())
    out["log_density_exact"] = float(gmm_log_prob(exact, means, covs, weights).mean())

    m = min(len(x), max_points)
    ref = exact[:m]
    h = bandwidth if bandwidth is not None else median_bandwidth(ref)
    floors = {"mmd2": [], "energy": []}
    for _ in range(num_floor_trials):
        a, b = (sample_gmm(m, means, covs, weights, generator=gen) for _ in range(2))
        floors["mmd2"].append(mmd_rbf(a, b, h))
        floors["energy"].append(energy_distance(a, b))
    out.update(
        {
            "n_kernel": m,
            "mmd_bandwidth": h,
            "mmd2": mmd_rbf(x[:m], ref, h),
            "energy": energy_distance(x[:m], ref),
        }
    )
    for name, vals in floors.items():
        v = torch.tensor(vals, dtype=torch.float64)
        out[f"{name}_floor"] = float(v.mean())
        out[f"{name}_floor_std"] = float(v.std()) if len(v) > 1 else 0.0
    return out
