"""Noise levels in the EDM parametrisation x_t = x0 + sigma * eps (Karras et al. 2022).

Samplers of training noise levels return `(sigma, weight)` so that the loss weighting stays separate from the
loss itself (as in improved-diffusion's `resample.py`). Symbols: sigma_data = data std, rho = schedule curvature.

Rectified-flow time (Liu et al. 2023; SD3, Esser et al. 2024), t in [0, 1], t = 1 noise: x_t = (1 - t) x0 + t eps
is EDM's x = x_t / (1 - t) at sigma = t / (1 - t), inversely t = sigma / (1 + sigma). SD3's timestep shift
(Sec. 5.3.2) maps t to s t / (1 + (s - 1) t). These maps live here (float64, t clamped below 1) and are used by
the flow teacher adapter (`teachers/flow.py`) and by the flow schedules of the distillation's noise levels.

Distillation noise levels (`SigmaSchedule`): a schedule maps a position p in [0, 1] (0: its largest sigma, 1: its
smallest) monotonically onto [sigma_min, sigma_max]; the generator step and the discriminator draw p ~ U[0, t_max]
(Algorithm 1's t), so t_max < 1 drops the least noisy (1 - t_max) share of the schedule's draws, whatever the
schedule. `karras`: sigma = Karras(p) (EDM Eq. 5, rho 7). `flow_uniform`: flow time t uniform between the flow
times of sigma_max and sigma_min. `flow_logit_normal`: logit(t) ~ N(mean, std^2) (SD3 Eq. 19) restricted to the
same interval, drawn by its inverse CDF. A shift s != 1 applies SD3's shift to either flow draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

T_MAX = 1 - 1e-7  # flow time is clamped below 1 (sigma <= 1e7): x_t = x (1 - t) stays finite and consistent


def shift_time(t: torch.Tensor | float, shift: float) -> torch.Tensor:
    """SD3's timestep shift s t / (1 + (s - 1) t) (s > 1 moves time towards noise), float64."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def unshift_time(t: torch.Tensor | float, shift: float) -> torch.Tensor:
    """The inverse of `shift_time`: u = t / (s - (s - 1) t), float64."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return t / (shift - (shift - 1) * t)


def sigma_of_time(t: torch.Tensor | float) -> torch.Tensor:
    """EDM sigma = t / (1 - t) of flow times (t clamped to T_MAX), float64."""
    t = torch.as_tensor(t, dtype=torch.float64).clamp(0, T_MAX)
    return t / (1 - t)


def time_of_sigma(sigma: torch.Tensor | float) -> torch.Tensor:
    """Flow time t = sigma / (1 + sigma) (clamped to T_MAX), float64."""
    s = torch.as_tensor(sigma, dtype=torch.float64).clamp(0, 1e8)  # also inf
    return (s / (1 + s)).clamp(max=T_MAX)


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


SigmaScheduleName = Literal["karras", "flow_uniform", "flow_logit_normal"]
SIGMA_SCHEDULES = ("karras", "flow_uniform", "flow_logit_normal")


@dataclass(frozen=True)
class SigmaSchedule:
    """Distillation noise levels as a monotone map of a position p in [0, 1] (0: sigma_max, 1: sigma_min) onto
    [sigma_min, sigma_max]; `draw` takes p ~ U[0, t_max] as Algorithm 1 does (see the module docstring)."""

    name: SigmaScheduleName = "karras"  # karras | flow_uniform | flow_logit_normal
    shift: float = 1.0  # flow schedules: SD3's timestep shift of the flow time (1 = none, > 1 towards noise)
    t_mean: float = 0.0  # flow_logit_normal: mean of logit(t) (SD3: 0)
    t_std: float = 1.0  # flow_logit_normal: standard deviation of logit(t) (SD3: 1)

    def __post_init__(self):
        if self.name not in SIGMA_SCHEDULES:
            raise ValueError(f"sigma schedule {self.name!r} is not valid; choose one of {list(SIGMA_SCHEDULES)}")
        if not (self.shift > 0 and self.t_std > 0):
            raise ValueError(f"shift={self.shift} and t_std={self.t_std} must be > 0")

    def _cdf(self, u: torch.Tensor) -> torch.Tensor:
        """Logit-normal CDF Phi((logit u - mean) / std), float64."""
        return torch.special.ndtr((u.log() - torch.log1p(-u) - self.t_mean) / self.t_std)

    def _quantile(self, q: torch.Tensor) -> torch.Tensor:
        """Its inverse: sigmoid(mean + std Phi^-1(q)), float64."""
        return torch.sigmoid(self.t_mean + self.t_std * torch.special.ndtri(q))

    def sigma_at(self, p: torch.Tensor, sigma_min: float, sigma_max: float) -> torch.Tensor:
        """sigma at positions p (0 = sigma_max, 1 = sigma_min), in p's dtype; flow times in float64."""
        if self.name == "karras":
            return karras_sigma_at(p, sigma_min, sigma_max)
        dtype = p.dtype if torch.is_tensor(p) and p.is_floating_point() else torch.float32
        p = torch.as_tensor(p, dtype=torch.float64)
        u_lo, u_hi = (unshift_time(time_of_sigma(s), self.shift) for s in (sigma_min, sigma_max))  # unshifted
        if self.name == "flow_uniform":
            u = u_hi - p * (u_hi - u_lo)
        else:  # inverse CDF of the logit-normal restricted to [u_lo, u_hi]: one uniform number per draw
            c_lo, c_hi = self._cdf(u_lo), self._cdf(u_hi)
            u = self._quantile(c_hi - p * (c_hi - c_lo)).clamp(u_lo, u_hi)
        return sigma_of_time(shift_time(u, self.shift)).to(dtype)

    def draw(
        self,
        n: int,  # batch size
        t_max: float,  # p ~ U[0, t_max]
        sigma_min: float,
        sigma_max: float,
        *,
        generator: torch.Generator | None = None,
        origin: str = "sigma_max",  # p = 0 is: sigma_max | sigma_min (p in [1 - t_max, 1], SiD/SiDA's code)
    ) -> torch.Tensor:
        """[n] noise levels at p ~ U[0, t_max]: one uniform number per draw, whatever the schedule."""
        p = torch.rand(n, generator=generator) * t_max
        if origin == "sigma_min":
            p = 1 - p
        return self.sigma_at(p, sigma_min, sigma_max)


def schedule_of(loss) -> SigmaSchedule:
    """The SigmaSchedule of a LossConfig; ValueError for a flow option that the chosen schedule would ignore."""
    name = loss.sigma_schedule
    for key in ("flow_shift", "flow_t_std"):
        if not getattr(loss, key) > 0:
            raise ValueError(f"loss.{key}={getattr(loss, key)} must be > 0")
    used = {"flow_uniform": ("flow_shift",), "flow_logit_normal": ("flow_shift", "flow_t_mean", "flow_t_std")}
    for key, default in (("flow_shift", 1.0), ("flow_t_mean", 0.0), ("flow_t_std", 1.0)):
        if getattr(loss, key) != default and key not in used.get(name, ()):
            raise ValueError(f"loss.{key}={getattr(loss, key)} has no effect with loss.sigma_schedule={name}")
    return SigmaSchedule(name, loss.flow_shift, loss.flow_t_mean, loss.flow_t_std)


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
    return SigmaSchedule("karras").draw(n, t_max, sigma_min, sigma_max, generator=generator, origin=origin)


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

    `loss` is a LossConfig. draws.draw_batch: both sigma = S(p) on [gen_sigma_min, gen_sigma_max] with S the
    loss.sigma_schedule, p ~ U[0, t_max], p = 0 the top for the discriminator and for the generator unless
    gen_t_origin = sigma_min (p in [1 - t_max, 1]). S is monotone, so the ranges nest as the positions do."""
    gen_t = (0.0, loss.gen_t_max) if loss.gen_t_origin == "sigma_max" else (1.0 - loss.gen_t_max, 1.0)
    schedule = schedule_of(loss)
    if loss.disc_t_max >= gen_t[1]:
        return
    lo, hi = loss.gen_sigma_min or teacher_sigma_min, loss.gen_sigma_max or teacher_sigma_max

    def span(t0, t1):
        a, b = (float(schedule.sigma_at(torch.tensor(t), lo, hi)) for t in (t1, t0))
        return f"[{a:.3g}, {b:.3g}]"

    raise ValueError(
        f"loss.disc_t_max={loss.disc_t_max} does not reach loss.gen_t_max={loss.gen_t_max} (gen_t_origin="
        f"{loss.gen_t_origin}, sigma_schedule={loss.sigma_schedule}): the discriminator's sigma range "
        f"{span(0.0, loss.disc_t_max)} does not cover the generator step's {span(*gen_t)}; set loss.disc_t_max "
        f"to {gen_t[1]:g}"
    )
