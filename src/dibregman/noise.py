"""Noise levels in the EDM parametrisation x_t = x0 + sigma * eps (Karras et al. 2022).

Samplers of training noise levels return `(sigma, weight)` so that the loss weighting stays separate from the
loss itself (as in improved-diffusion's `resample.py`). Symbols: sigma_data = data std, rho = schedule curvature.
"""

from __future__ import annotations

import torch


def karras_sigmas(
    num_steps: int,  # number of noise levels (excluding the final 0)
    sigma_min: float = 0.002,  # smallest noise level
    sigma_max: float = 80.0,  # largest noise level
    rho: float = 7.0,  # schedule curvature (EDM Eq. 5)
    *,
    device=None,
) -> torch.Tensor:
    """Karras et al. (2022) Eq. 5 schedule, descending, with a trailing 0: shape [num_steps + 1]."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    step = i / max(num_steps - 1, 1)
    s = (sigma_max ** (1 / rho) + step * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64, device=device)]).float()


def karras_sigma_at(
    t: torch.Tensor,  # position in [0, 1]: 0 = sigma_max, 1 = sigma_min
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
) -> torch.Tensor:
    """The continuous Karras schedule evaluated at t (used for the generator's t ~ U[0, t_max])."""
    return (sigma_max ** (1 / rho) + t * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def karras_uniform_sigma(
    n: int,  # batch size
    t_max: float,  # t ~ U[0, t_max]; t = 0 is sigma_max, t = 1 is sigma_min
    sigma_min: float,
    sigma_max: float,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """sigma = Karras(t), t ~ U[0, t_max]: the generator/discriminator noise sampler of SiD/SiDA, [n]."""
    t = torch.rand(n, generator=generator) * t_max
    return karras_sigma_at(t, sigma_min, sigma_max)


def edm_training_sigma(
    n: int,  # batch size
    p_mean: float = -1.2,  # mean of ln(sigma)
    p_std: float = 1.2,  # standard deviation of ln(sigma)
    sigma_data: float = 0.5,  # data standard deviation
    *,
    device=None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EDM training noise: ln(sigma) ~ N(P_mean, P_std^2); weight lambda(sigma) = (s^2 + sd^2) / (s sd)^2."""
    z = torch.randn(n, device=device, generator=generator)
    sigma = (z * p_std + p_mean).exp()
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return sigma, weight


def edm_preconditioning(sigma: torch.Tensor, sigma_data: float):
    """EDM Table 1: (c_skip, c_out, c_in, c_noise) so that D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma_data**2 + sigma**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise
