"""Sample-based distances between two feature sets: FID, KID, precision/recall, Inception/classifier score.

Pure functions of feature tensors [N, D]; everything is accumulated in float64.

* FID (Heusel et al. 2017): Frechet distance between Gaussians fitted to the features,
  d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2); covariances use 1/(n-1) like pytorch-fid.
  The trace term is computed from the eigenvalues of the symmetric PSD matrix S1^1/2 S2 S1^1/2 (same
  eigenvalues as S1 S2), which is real and stable where `scipy.linalg.sqrtm(S1 @ S2)` can turn complex.
* KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3,
  averaged over random subsets; mean and (population) std over the subsets, as torchmetrics'
  `KernelInceptionDistance` (tests check parity with it; it is not imported here because `import torchmetrics`
  pulls in transformers and takes 5-20 s on a small CPU machine).
* Precision/recall (Kynkaanniemi et al. 2019): each set's manifold = union of balls around its points with
  radius = distance to the k-th nearest neighbour (k = 3) in the same set; precision = fraction of generated
  points inside the reference manifold, recall = fraction of reference points inside the generated manifold.
  Both depend on the set sizes: compare at equal sizes.
* Inception score (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)), mean and std over splits. With the MNIST
  classifier this is the "classifier score" (at most 10, the number of classes).
"""

from __future__ import annotations

import numpy as np
import torch


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, D] -> (mu [D], sigma [D, D]) in float64; sigma uses 1/(N - 1)."""
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features of shape [N >= 2, D], got {tuple(features.shape)}")
    f = features.detach().double().cpu()
    mu = f.mean(0)
    fc = f - mu
    return mu, fc.T @ fc / (len(f) - 1)


class FeatureSums:
    """n, sum f and sum f f^T in float64 (EDM `fid.py`): batches added in any order, or summed over ranks
    (`all_reduce`), give the mu and sigma of the whole feature set (sigma with 1/(n - 1), as `feature_stats`)."""

    def __init__(self, dim: int, device: str | torch.device = "cpu"):
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)  # [D]
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)  # [D, D]

    def add(self, features: torch.Tensor) -> FeatureSums:  # [B, D]
        f = features.detach().to(self.sum.device, torch.float64)
        self.n += len(f)
        self.sum += f.sum(0)
        self.outer += f.T @ f
        return self

    def all_reduce(self) -> FeatureSums:
        """Sum over the ranks of a torchrun job (a no-op with one process)."""
        from .. import dist

        for t in (self.n, self.sum, self.outer):
            dist.all_reduce_sum_(t)
        return self

    def mu_sigma(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu [D], sigma [D, D]) float64 on the CPU."""
        n = float(self.n)
        if n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {int(n)}")
        mu = self.sum / n
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu(), ((sigma + sigma.T) / 2).cpu()


def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(s)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); accepts tensors or numpy arrays."""
    mu1, mu2, s1, s2 = (torch.as_tensor(np.asarray(a), dtype=torch.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(
            f"inconsistent shapes: mu {tuple(mu1.shape)}, {tuple(mu2.shape)}; "
            f"sigma {tuple(s1.shape)}, {tuple(s2.shape)}"
        )
    root1 = _psd_sqrt((s1 + s1.T) / 2)
    m = root1 @ s2 @ root1
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)


def fid(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """FID between two feature sets [N, D], [M, D]."""
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))


def poly_mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 between x [m, D] and y [n, D] with the KID kernel k(a, b) = (a.b / D + 1)^3."""
    m, n, d = len(x), len(y), x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    return (
        (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
        + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
        - 2 * kxy.mean()
    )


def kid(
    features_a: torch.Tensor,  # [N, D]
    features_b: torch.Tensor,  # [M, D]
    *,
    num_subsets: int = 100,  # random subsets to average over (100 as torchmetrics and clean-fid)
    subset_size: int = 1000,  # points per subset, capped at min(N, M)
    generator: torch.Generator | None = None,  # for reproducible subsets
) -> tuple[float, float]:
    """KID = unbiased polynomial-kernel MMD^2, (mean, std) over subsets drawn without replacement."""
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    m = min(subset_size, len(features_a), len(features_b))
    if m < 2:
        raise ValueError(f"KID needs at least 2 points per set, got {len(features_a)} and {len(features_b)}")
    a, b = features_a.detach().double().cpu(), features_b.detach().double().cpu()
    values = []
    for _ in range(num_subsets):
        ia = torch.randperm(len(a), generator=generator)[:m]
        ib = torch.randperm(len(b), generator=generator)[:m]
        values.append(poly_mmd(a[ia], b[ib]))
    v = torch.stack(values)
    return float(v.mean()), float(v.std(unbiased=False))


def _kth_neighbour_radii(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in x (itself excluded), [N]."""
    if len(x) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set, got {len(x)}")
    return torch.cat(
        [torch.cdist(x[i : i + batch_size], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), batch_size)]
    )


def _inside_fraction(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    inside = [
        (torch.cdist(points[i : i + batch_size], centres) <= radii).any(1) for i in range(0, len(points), batch_size)
    ]
    return float(torch.cat(inside).double().mean())


def precision_recall(
    reference_features: torch.Tensor,  # [N, D] real / teacher
    sample_features: torch.Tensor,  # [M, D] generated
    *,
    k: int = 3,  # neighbourhood size of the k-NN radii (Kynkaanniemi et al. use 3)
    batch_size: int = 512,  # rows per distance block (memory: batch_size * max(N, M) doubles)
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) -> (precision, recall)."""
    ref, gen = reference_features.detach().double().cpu(), sample_features.detach().double().cpu()
    precision = _inside_fraction(gen, ref, _kth_neighbour_radii(ref, k, batch_size), batch_size)
    recall = _inside_fraction(ref, gen, _kth_neighbour_radii(gen, k, batch_size), batch_size)
    return precision, recall


def inception_score(logits: torch.Tensor, *, num_splits: int = 10) -> tuple[float, float]:
    """exp E KL(p(y|x) || p(y)) from logits [N, K]; (mean, population std) over disjoint splits."""
    if num_splits < 1 or len(logits) < num_splits:
        raise ValueError(f"need 1 <= num_splits <= N, got num_splits={num_splits}, N={len(logits)}")
    log_p = logits.detach().double().cpu().log_softmax(-1)
    scores = []
    for chunk in log_p.chunk(num_splits):
        log_py = chunk.exp().mean(0).log()
        scores.append((chunk.exp() * (chunk - log_py)).sum(1).mean().exp())
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(unbiased=False))
