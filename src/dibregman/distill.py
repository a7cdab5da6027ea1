"""Algorithm 1 of Di-Bregman (Zhu et al. 2025, arXiv 2510.16983) as pure functions of tensors.

No network is called and no optimiser is stepped here: the training step (`loop.py`) evaluates the networks,
gathers across ranks and hands the tensors to these functions (FastGen's `variational_score_distillation_loss`
is the model). Symbols (as in the paper): G_theta the one-step generator, phi the teacher, psi the auxiliary
fake score, eta the discriminator with logit l_t(x) = log(p_t / q_t), ratio r_t = e^{-l}, D(x, sigma)
denoisers, score s(x) = (D(x, sigma) - x) / sigma^2, so s_phi - s_psi = (D_phi - D_psi) / sigma^2.

- `time_weight_divisor`  w(t) of Eq. 4, written once (`dmd | unit | score`).
- `dibregman_loss`       lines 6-15: Theorem 1 (Eq. 4) as a surrogate whose gradient w.r.t. x = G(z) is
                         -w(t) h''(r) r (s_phi - s_psi).
- `target_ratio_loss`    Appendix G's Eq. 14 extra term for a reward-tilted target p r* (`rewards.py`).
- `gan_generator_loss`   the optional GAN term -log sigmoid(l(G(z)_t)) (SiDA).
- `fake_score_loss`      lines 16-17: EDM-weighted denoising score matching of psi on generator samples.
- `discriminator_loss`   lines 18-22: Eq. 5 as binary cross-entropy, real -> 1, generator -> 0, same sigma.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

Weighting = Literal["dmd", "unit", "score"]  # choices of w(t), see `time_weight_divisor`
WEIGHTINGS = get_args(Weighting)


class NonFiniteError(RuntimeError):
    """A NaN/Inf appeared in a quantity the step depends on; the engine skips and counts the step."""


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample [N] tensor shaped to broadcast against x [N, *shape]."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def per_sample_mean(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).mean(1)


def time_weight_divisor(
    weighting: str,  # dmd | unit | score
    sigma: torch.Tensor,  # [N] noise levels
    x0: torch.Tensor,  # [N, *shape] clean generator samples G(z)
    d_phi: torch.Tensor,  # [N, *shape] teacher denoiser D_phi(x_t, sigma)
) -> torch.Tensor:
    """w(t) of Eq. 4 as the divisor c [N] with w(t) (s_phi - s_psi) = (D_phi - D_psi) / c, i.e. w(t) = sigma^2 / c:
    dmd c = mean|x0 - D_phi| per sample (DMD's normalisation), unit c = 1, score c = sigma^2 (the raw scores)."""
    if weighting == "dmd":
        return per_sample_mean((x0 - d_phi).abs()).clamp_min(1e-5)
    if weighting == "unit":
        return torch.ones_like(sigma, dtype=d_phi.dtype)
    if weighting == "score":
        return sigma.to(d_phi.dtype).square()
    raise ValueError(f"unknown weighting {weighting!r}; valid: {list(WEIGHTINGS)}")


def time_weight(weighting: str, sigma: torch.Tensor, x0: torch.Tensor, d_phi: torch.Tensor) -> torch.Tensor:
    """w(t) itself, [N] float64: sigma^2 / `time_weight_divisor` (the factor Eq. 14's term shares with Eq. 4)."""
    s2 = sigma.to(d_phi.dtype).square()
    return (s2 / time_weight_divisor(weighting, sigma, x0, d_phi)).double()


def dibregman_loss(
    x: torch.Tensor,  # [N, *shape] = G(z), with gradient
    d_phi: torch.Tensor,  # [N, *shape] teacher denoiser at x_t (no gradient)
    d_psi: torch.Tensor,  # [N, *shape] fake-score denoiser at x_t (no gradient)
    weight: torch.Tensor,  # [N] Bregman weight h''(r) r, stabilised (no gradient)
    divisor: torch.Tensor,  # [N] `time_weight_divisor`: w(t) = sigma^2 / divisor
    norm: float = 1.0,  # divide the summed loss by this: the global micro-batch size
) -> torch.Tensor:
    """Surrogate of Theorem 1 (Eq. 4): its gradient w.r.t. x is -w(t) h''(r) r (s_phi - s_psi) / (dim norm)."""
    grad_x = -(bcast(weight, x) * ((d_phi - d_psi) / bcast(divisor, x)))  # Eq. 4, line 10
    return (grad_x * x).flatten(1).mean(1).sum() / norm


def target_ratio_loss(
    x: torch.Tensor,  # [N, *shape] = G(z), with gradient
    grad_log_r: torch.Tensor,  # [N, *shape] grad_x log R_t(x_t) (`rewards.target_term`)
    log_w_star: torch.Tensor,  # [N] log w(r*_t) (`rewards.target_term`)
    log_norm: torch.Tensor,  # [N] the normalisation's log factor of Eq. 4's weights (`stabilized_log_weight`)
    time_weight: torch.Tensor,  # [N] w(t) of Eq. 4 (`time_weight`)
    norm: float = 1.0,  # divide the summed loss by this, as in `dibregman_loss`
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 14's extra term in the units of `dibregman_loss`: its gradient w.r.t. x is -w(t) n w(r*_t) grad log R_t
    / (dim norm); returns (loss, per-sample coefficient w(t) n w(r*) in float64, possibly non-finite: the caller
    checks)."""
    coef = (log_w_star.double() + log_norm.double()).exp() * time_weight.double()
    grad_x = -(bcast(coef, x) * grad_log_r.double()).to(x.dtype)  # Eq. 14, second term
    return (grad_x * x).flatten(1).mean(1).sum() / norm, coef


def gan_generator_loss(
    logits: torch.Tensor,  # [N] discriminator logits l at the generator's noisy samples (with gradient)
    logit_clamp: float = 10.0,  # logits clamped to +-this (SiDA)
) -> torch.Tensor:
    """Per-sample non-saturating GAN term -log sigmoid(l) = softplus(-l), [N]."""
    return F.softplus(-logits.clamp(-logit_clamp, logit_clamp))


def fake_score_loss(
    d_psi: torch.Tensor,  # [N, *shape] psi(x0 + sigma n, sigma), with gradient
    x0: torch.Tensor,  # [N, *shape] clean generator samples (no gradient)
    weight: torch.Tensor,  # [N] EDM loss weight lambda(sigma) (`noise.edm_training_sigma`)
    norm: float = 1.0,  # divide the summed loss by this
) -> torch.Tensor:
    """EDM-weighted DSM of psi on generator samples: lambda(sigma) ||psi(x0 + sigma n) - x0||^2 (lines 16-17)."""
    return (weight * per_sample_mean((d_psi - x0).square())).sum() / norm


def discriminator_loss(
    l_real: torch.Tensor,  # [N] logits at noisy real/teacher samples
    l_fake: torch.Tensor,  # [N] logits at noisy generator samples, same sigma
    norm: float = 1.0,  # divide the summed loss by this
) -> tuple[torch.Tensor, dict]:
    """Eq. 5 as BCE with logits: real/teacher -> 1, generator -> 0 (lines 18-22); returns (loss, stats)."""
    loss = (F.softplus(-l_real) + F.softplus(l_fake)).sum() / norm
    with torch.no_grad():
        acc = 0.5 * ((l_real > 0).float().mean() + (l_fake < 0).float().mean())
    return loss, {"disc_acc": acc, "logit_real": l_real.detach().mean(), "logit_fake": l_fake.detach().mean()}
