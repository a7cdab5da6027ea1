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
    t_max: float,  # t ~ U[0, t_max]
    sigma_min: float,
    sigma_max: float,
    *,
    generator: torch.Generator | None = None,
    origin: str = "sigma_max",  # the end t = 0 is: sigma_max (t = 1 is sigma_min) | sigma_min (SiD/SiDA's code)
) -> torch.Tensor:
    """sigma = Karras(t), t ~ U[0, t_max]: the generator/discriminator noise sampler of SiD/SiDA, [n].

    origin `sigma_max`: sigma in [Karras(t_max), sigma_max] (Algorithm 1 as we read it); `sigma_min`: sigma in
    [sigma_min, Karras(1 - t_max)], e.g. [0.002, 24.4] for t_max = 0.8 (SiD's `tmax=800`)."""
    t = torch.rand(n, generator=generator) * t_max
    if origin == "sigma_min":
        t = 1 - t
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
    return sigma, edm_loss_weight(sigma, sigma_data)


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM's loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_preconditioning(sigma: torch.Tensor, sigma_data: float):
    """EDM Table 1: (c_skip, c_out, c_in, c_noise) so that D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma_data**2 + sigma**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def check_sigma_cover(loss, teacher_sigma_min: float = 0.002, teacher_sigma_max: float = 80.0) -> None:
    """ValueError unless the discriminator's sigma range covers the generator step's (no ratio is learnt outside).

    `loss` is a LossConfig. draws.draw_batch: both sigma = Karras(t) on [gen_sigma_min, gen_sigma_max], t ~ U[0, t_max],
    t = 0 the top for the discriminator and for the generator unless gen_t_origin = sigma_min (t in [1 - t_max, 1])."""
    gen_t = (0.0, loss.gen_t_max) if loss.gen_t_origin == "sigma_max" else (1.0 - loss.gen_t_max, 1.0)
    if loss.disc_t_max >= gen_t[1]:
        return
    lo, hi = loss.gen_sigma_min or teacher_sigma_min, loss.gen_sigma_max or teacher_sigma_max

    def span(t0, t1):
        a, b = (float(karras_sigma_at(torch.tensor(t), lo, hi)) for t in (t1, t0))
        return f"[{a:.3g}, {b:.3g}]"

    raise ValueError(
        f"loss.disc_t_max={loss.disc_t_max} does not reach loss.gen_t_max={loss.gen_t_max} (gen_t_origin="
        f"{loss.gen_t_origin}): the discriminator's sigma range {span(0.0, loss.disc_t_max)} does not cover the "
        f"generator step's {span(*gen_t)}; set loss.disc_t_max to {gen_t[1]:g}"
    )
