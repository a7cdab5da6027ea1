"""Algorithm 1 of Di-Bregman (Zhu et al.) as small loss functions. No optimiser is stepped here.

Symbols (as in the paper): G_theta the one-step generator, phi the teacher, psi the auxiliary fake score,
eta the discriminator with logit l_t(x) = log(p_t / q_t), ratio r_t = e^{-l}, D(x, sigma) denoisers, and
score s(x) = (D(x, sigma) - x) / sigma^2.

- `generator_loss`   lines 4-15: Theorem 1 (Eq. 4) as a surrogate whose gradient w.r.t. x = G(z) is
                      -w(t) h''(r) r (s_phi - s_psi), plus the optional GAN term -log sigmoid(l(G(z)_t)),
                      plus, with a reward, Appendix G's target-ratio term of Eq. 14 (`reward.py`).
- `fake_score_loss`  lines 16-17: EDM-weighted denoising score matching of psi on generator samples.
- `discriminator_loss` lines 18-22: Eq. 5 as binary cross-entropy, real -> 1, generator -> 0, same sigma.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import divergences
from .noise import karras_sigma_at


class NonFiniteError(RuntimeError):
    """A NaN/Inf appeared in a quantity the step depends on; the engine skips and counts the step."""


@dataclass
class Batch:
    """Random draws of one micro-batch (all taken from one seeded generator, so runs are reproducible)."""

    z: torch.Tensor  # [N, *shape] generator input noise
    gen_sigma: torch.Tensor  # [N] noise level of the generator step
    gen_noise: torch.Tensor  # [N, *shape]
    gan_noise: torch.Tensor  # [N, *shape] independent noise for the GAN term
    fake_sigma: torch.Tensor  # [N] noise level of the fake-score DSM step
    fake_noise: torch.Tensor  # [N, *shape]
    disc_sigma: torch.Tensor  # [N] noise level of the discriminator step
    disc_noise_real: torch.Tensor  # [N, *shape]
    disc_noise_fake: torch.Tensor  # [N, *shape]
    cond: object = None  # condition c ~ D_c (labels, text embeddings), or None
    real_cond: object = None  # condition of the real side (x_gt, c) ~ D_d; None: the same as `cond`


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def _per_sample_mean(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).mean(1)


def karras_uniform_sigma(
    n: int, t_max: float, sigma_min: float, sigma_max: float, *, generator=None, origin: str = "sigma_max"
):
    """sigma = Karras(t), t ~ U[0, t_max]: the generator/discriminator sampler of SiD/SiDA.

    origin says which end t = 0 is: `sigma_max` (sigma in [Karras(t_max), sigma_max], the paper's Algorithm 1
    as we read it) or `sigma_min` (SiD/SiDA's code: sigma in [sigma_min, Karras(1 - t_max)], e.g. [0.002, 24.4]
    for t_max = 0.8)."""
    t = torch.rand(n, generator=generator) * t_max
    if origin == "sigma_min":
        t = 1 - t
    return karras_sigma_at(t, sigma_min, sigma_max)


def score_difference(
    teacher, fake, x_t, sigma, cond, weighting: str, x0: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """w(t) * sigma^2 (s_phi - s_psi) = w(t) (D_phi - D_psi) at x_t, for the chosen w(t); no gradient.

    weighting: `dmd` divides by mean|x0 - D_phi| per sample with x0 the clean generator sample (DMD's
    normalisation; x_t if x0 is not given), `unit` keeps D_phi - D_psi,
    `score` returns the raw score difference (D_phi - D_psi) / sigma^2. Also returns D_phi.
    """
    with torch.no_grad():
        d_p = teacher(x_t, sigma, cond).float()
        d_q = fake(x_t, sigma, cond).float()
        diff = d_p - d_q
        if weighting == "dmd":
            ref = x_t if x0 is None else x0
            diff = diff / _bcast(_per_sample_mean((ref - d_p).abs()).clamp_min(1e-5), diff)
        elif weighting == "score":
            diff = diff / _bcast(sigma.float().square(), diff)
        elif weighting != "unit":
            raise ValueError(f"unknown weighting {weighting!r}; valid: ['dmd', 'unit', 'score']")
    return diff, d_p


def bregman_weights(div, logits, sigma, stab, gather=None, local_slice=None):
    """Per-sample weight h''(r) r from the discriminator logits, stabilised over the (global) batch."""
    if gather is None:
        return divergences.stabilized_weight(div, logits, sigma=sigma, stab=stab)
    w = divergences.stabilized_weight(div, gather(logits), sigma=gather(sigma), stab=stab)
    return w[local_slice]


def generator_loss(
    x: torch.Tensor,  # [N, *shape] = G(z), with gradient
    b: Batch,
    *,
    teacher,
    fake,
    disc,
    div,
    stab,
    weighting: str = "dmd",
    gan_weight: float = 0.0,
    gan_logit_clamp: float = 10.0,
    norm: float = 1.0,  # divide the (summed) loss by this: the global micro-batch size
    gather=None,
    local_slice=None,
    reward=None,  # dibregman.reward.TargetRatio: Appendix G's target-ratio term of Eq. 14 (None = off)
) -> tuple[torch.Tensor, dict]:
    """Surrogate loss whose gradient is Theorem 1's (Eq. 4) plus the optional GAN term; returns (loss, stats)."""
    s = _bcast(b.gen_sigma, x)
    x_t = x.detach() + s * b.gen_noise  # forward process q_{t|0}(x_t | x_theta), line 6
    diff, d_p = score_difference(teacher, fake, x_t, b.gen_sigma, b.cond, weighting, x0=x.detach())  # line 7
    with torch.no_grad():
        logits = disc(x_t, b.gen_sigma, b.cond).float()  # line 8: r_t = e^{-l}
        if not (torch.isfinite(logits).all() and torch.isfinite(diff).all()):
            raise NonFiniteError("non-finite discriminator logits or score difference in the generator step")
        w = bregman_weights(div, logits, b.gen_sigma, stab, gather, local_slice)
    grad_x = -(_bcast(w, diff) * diff)  # d loss / d x (line 10), in the units of w(t)
    loss = (grad_x * x).flatten(1).mean(1).sum() / norm
    stats = {"weight": w, "logits": logits, "sigma": b.gen_sigma, "gap": _per_sample_mean(diff.square())}
    if reward is not None:  # Eq. 14: + w(t) h''(r*_t) grad r*_t, with Eq. 4's w(t) and weight normalisation
        extra, stats["reward"] = reward.loss(
            x,
            x_t,
            b.gen_sigma,
            b.cond,
            d_p=d_p,
            logits=logits,
            div=div,
            stab=stab,
            weighting=weighting,
            norm=norm,
            gather=gather,
            local_slice=local_slice,
            x0=x.detach(),
        )
        loss = loss + extra
    if gan_weight > 0:
        x_gan = x + s * b.gan_noise  # gradient flows through x into G, not into eta's parameters' optimiser
        l_gan = disc(x_gan, b.gen_sigma, b.cond).float().clamp(-gan_logit_clamp, gan_logit_clamp)
        gan = F.softplus(-l_gan)  # -log sigmoid(l): the non-saturating generator loss
        loss = loss + gan_weight * gan.sum() / norm
        stats["gan"] = gan.detach()
    return loss, stats


def fake_score_loss(fake, x_fake: torch.Tensor, b: Batch, sigma_data: float, norm: float) -> torch.Tensor:
    """EDM-weighted DSM of psi on generator samples: lambda(sigma) ||psi(x + sigma n) - x||^2 (lines 16-17)."""
    s = b.fake_sigma
    weight = (s.square() + sigma_data**2) / (s * sigma_data).square()
    x_t = x_fake + _bcast(s, x_fake) * b.fake_noise
    err = (fake(x_t, s, b.cond).float() - x_fake).square()
    return (weight * _per_sample_mean(err)).sum() / norm


def discriminator_loss(disc, x_real, x_fake, b: Batch, norm: float, real_cond=None) -> tuple[torch.Tensor, dict]:
    """Eq. 5 as BCE with logits: real/teacher -> 1, generator -> 0, at the same sigma (lines 18-22)."""
    s = _bcast(b.disc_sigma, x_fake)
    l_real = disc(x_real + s * b.disc_noise_real, b.disc_sigma, b.cond if real_cond is None else real_cond).float()
    l_fake = disc(x_fake + s * b.disc_noise_fake, b.disc_sigma, b.cond).float()
    loss = (F.softplus(-l_real) + F.softplus(l_fake)).sum() / norm
    with torch.no_grad():
        acc = 0.5 * ((l_real > 0).float().mean() + (l_fake < 0).float().mean())
    return loss, {"disc_acc": acc, "logit_real": l_real.detach().mean(), "logit_fake": l_fake.detach().mean()}
