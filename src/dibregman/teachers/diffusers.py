"""Adapter: a diffusers `UNet2DModel` trained on a discrete DDPM/DDIM schedule as an EDM denoiser.

A discrete variance-preserving (VP) schedule with abar_t = alphas_cumprod[t], t = 0..T-1, has
    x_vp = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps                       (DDPM, Ho et al. 2020, Eq. 4).
Dividing by sqrt(abar_t) gives the EDM form x = x0 + sigma_t eps (Karras et al. 2022, Table 1, "VP") with
    sigma_t = sqrt((1 - abar_t) / abar_t),   x_vp = alpha x,   alpha = 1 / sqrt(1 + sigma^2) = sqrt(abar_t),
    s = sigma / sqrt(1 + sigma^2) = sqrt(1 - abar_t).
Model outputs are turned into x0_hat:  epsilon: x0 = x - sigma eps;  v_prediction (v = alpha eps - s x0):
x0 = alpha x_vp - s v;  sample: x0 = output.  A noise level between two grid points is mapped to a
fractional timestep by linear interpolation in log(sigma) (as k-diffusion's `DiscreteSchedule.sigma_to_t`);
a sigma on the grid (up to `snap_tol` timesteps) gets the exact integer timestep, so the native DDIM chain
is reproduced exactly: with the sigmas of `ddim_sigmas`, the EDM DDIM step
    x' = x0_hat + (sigma' / sigma) (x - x0_hat)
equals `DDIMScheduler.step` (eta = 0) after the VP -> VE scaling x = x_vp / alpha (Song et al. 2021, Eq. 12).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .base import as_sigma

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
ZERO_SNR_ABAR = 2.0**-24  # floor for abar_T = 0 (zero terminal SNR), as diffusers' Euler scheduler does


def alphas_cumprod_of(scheduler_or_alphas_cumprod) -> torch.Tensor:
    """abar_t as a float64 [T] tensor, from a diffusers scheduler (`.alphas_cumprod`) or a sequence/tensor."""
    a = getattr(scheduler_or_alphas_cumprod, "alphas_cumprod", scheduler_or_alphas_cumprod)
    a = torch.as_tensor(a, dtype=torch.float64).reshape(-1).cpu()
    if a.numel() < 2 or not bool((a[:-1] > 0).all() and (a >= 0).all() and (a <= 1).all()):
        raise ValueError(f"alphas_cumprod needs >= 2 values in (0, 1] (the last may be 0), got {a[:4]}...")
    if not bool((a[1:] <= a[:-1]).all()):
        raise ValueError("alphas_cumprod must be non-increasing in t")
    return a.clamp(min=ZERO_SNR_ABAR)


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) on the discrete grid, float64 [T], increasing in t."""
    a = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    return ((1 - a) / a).sqrt()


def _sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor, snap_tol: float) -> torch.Tensor:
    """Fractional timestep of sigma: linear in log(sigma) between grid neighbours, clamped to [0, T-1]."""
    log_sigma = sigma.to(torch.float64).clamp(min=1e-30).log()
    log_sigmas = log_sigmas.to(log_sigma.device)
    hi = torch.searchsorted(log_sigmas, log_sigma).clamp(1, log_sigmas.numel() - 1)  # first >= sigma
    lo = hi - 1
    w = ((log_sigma - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])).clamp(0, 1)
    t = lo.to(torch.float64) + w
    return torch.where((t - t.round()).abs() <= snap_tol, t.round(), t)


def _t_to_sigma(t: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Sigma of a fractional timestep, linear in log(sigma) between grid points (inverse of `_sigma_to_t`)."""
    t = t.to(torch.float64).clamp(0, log_sigmas.numel() - 1)
    log_sigmas = log_sigmas.to(t.device)
    lo = t.floor().long().clamp(max=log_sigmas.numel() - 2)
    w = t - lo
    return ((1 - w) * log_sigmas[lo] + w * log_sigmas[lo + 1]).exp()


def timesteps_for_sigmas(
    sigmas: torch.Tensor | Sequence[float],
    scheduler_or_alphas_cumprod,  # diffusers scheduler or abar_t [T]
    *,
    snap_tol: float = 1e-3,  # sigmas within this many timesteps of a grid point map to the integer step
) -> torch.Tensor:
    """Continuous timesteps (float64) of EDM noise levels; grid sigmas give exact integer steps."""
    log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod_of(scheduler_or_alphas_cumprod)).log()
    return _sigma_to_t(torch.as_tensor(sigmas, dtype=torch.float64), log_sigmas, snap_tol)


def sigmas_for_timesteps(
    timesteps: torch.Tensor | Sequence[float],  # integer or fractional timesteps in [0, T-1]
    scheduler_or_alphas_cumprod,  # diffusers scheduler or abar_t [T]
) -> torch.Tensor:
    """EDM noise levels (float64) of timesteps: the inverse of `timesteps_for_sigmas`."""
    log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod_of(scheduler_or_alphas_cumprod)).log()
    return _t_to_sigma(torch.as_tensor(timesteps, dtype=torch.float64), log_sigmas)


def ddim_sigmas(scheduler, num_inference_steps: int) -> torch.Tensor:
    """Sigmas of a `DDIMScheduler`'s own chain: its timesteps, then the final abar's sigma (0 if it is 1).

    Float32 [num_inference_steps + 1], descending. With "leading"/"trailing" spacing DDIM's previous timestep
    is the next listed one, so the EDM DDIM step over these sigmas reproduces `scheduler.step` (eta = 0).
    """
    scheduler.set_timesteps(num_inference_steps)
    a = alphas_cumprod_of(scheduler)
    final = torch.as_tensor(getattr(scheduler, "final_alpha_cumprod", 1.0), dtype=torch.float64)
    sig = sigmas_from_alphas_cumprod(a)[scheduler.timesteps.long().cpu()]
    return torch.cat([sig, sigmas_from_alphas_cumprod(final).reshape(1)]).float()


def x0_from_model_output(
    out: torch.Tensor,  # network output [N, C, H, W]
    x: torch.Tensor,  # noisy input in EDM scaling x = x0 + sigma eps [N, C, H, W]
    sigma: torch.Tensor,  # [N, 1, 1, 1]
    prediction_type: str,
) -> torch.Tensor:
    """x0_hat from an epsilon / v / sample prediction of a VP model (see module docstring)."""
    if prediction_type == "epsilon":
        return x - sigma * out
    if prediction_type == "v_prediction":  # alpha x_vp - s v with x_vp = alpha x
        return x / (1 + sigma.square()) - sigma * (1 + sigma.square()).rsqrt() * out
    if prediction_type == "sample":
        return out
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


class DiscreteVPDenoiser(nn.Module):
    """Shared machinery of VP discrete-time adapters: schedule, sigma -> timestep, input scaling, x0_hat."""

    def __init__(
        self,
        scheduler_or_alphas_cumprod,  # diffusers scheduler or abar_t [T]
        prediction_type: str | None,  # "epsilon" | "v_prediction" | "sample"; None: the scheduler's own
        sigma_data: float,  # data standard deviation (EDM)
        snap_tol: float,  # timesteps within this distance of an integer are snapped to it
    ):
        super().__init__()
        if prediction_type is None:
            config = getattr(scheduler_or_alphas_cumprod, "config", None)
            prediction_type = getattr(config, "prediction_type", None) or "epsilon"
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.prediction_type = prediction_type
        self.sigma_data = float(sigma_data)
        self.snap_tol = float(snap_tol)
        sigmas = sigmas_from_alphas_cumprod(alphas_cumprod_of(scheduler_or_alphas_cumprod))
        self.log_sigmas = sigmas.log()  # float64 [T], increasing; no buffer, so .half() cannot round it
        self.sigma_min = float(sigmas[0])
        self.sigma_max = float(sigmas[-1])

    @property
    def num_train_timesteps(self) -> int:
        return self.log_sigmas.numel()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep (float32) for each sigma; exact integers on the training grid."""
        if self.log_sigmas.device != sigma.device:
            self.log_sigmas = self.log_sigmas.to(sigma.device)
        return _sigma_to_t(sigma, self.log_sigmas, self.snap_tol).float()

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma of a (fractional) timestep, log-linear between grid points."""
        return _t_to_sigma(t, self.log_sigmas).float()

    def model_input(self, x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_vp = x / sqrt(1 + sigma^2), timestep [N], sigma [N, 1, 1, 1]) for an EDM-scaled x."""
        s = as_sigma(sigma, x)
        t = self.sigma_to_t(s)
        s = s.view(-1, *([1] * (x.ndim - 1)))
        return x * (1 + s.square()).rsqrt(), t, s

    def to_x0(self, out: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x0_hat (float32) from the network output (the mean half of a learned-variance 2C output)."""
        out = out.float()
        if out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]
        return x0_from_model_output(out, x.float(), sigma, self.prediction_type)


class DiffusersTeacher(DiscreteVPDenoiser):
    """`D(x, sigma, cond=None) -> x0_hat` around a frozen diffusers `UNet2DModel`; cond = class labels [N]."""

    def __init__(
        self,
        unet: nn.Module,  # diffusers UNet2DModel (positional time embedding)
        scheduler_or_alphas_cumprod,  # DDPMScheduler / DDIMScheduler or abar_t [T]
        prediction_type: str | None = None,  # "epsilon" | "v_prediction" | "sample"; None: the scheduler's
        *,
        sigma_data: float = 0.5,  # data std of images in [-1, 1]
        snap_tol: float = 1e-3,  # snap timesteps this close to an integer onto it
    ):
        super().__init__(scheduler_or_alphas_cumprod, prediction_type, sigma_data, snap_tol)
        config = unet.config
        if getattr(config, "time_embedding_type", "positional") != "positional":
            raise ValueError(
                f"only discrete-time UNet2DModels (time_embedding_type='positional') are supported, "
                f"got {config.time_embedding_type!r}"
            )
        self.unet = unet.eval().requires_grad_(False)
        size = config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.shape = (int(config.in_channels), int(h), int(w))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond=None) -> torch.Tensor:
        x_vp, t, s = self.model_input(x, sigma)
        dtype = self.unet.dtype
        out = self.unet(x_vp.to(dtype), t, class_labels=cond).sample
        return self.to_x0(out, x, s)

    @classmethod
    def from_folder(
        cls,
        path: str | os.PathLike,
        subfolder: str | None = None,  # the U-Net's folder inside path; None: "unet" if present, else path
        *,
        torch_dtype: torch.dtype = torch.float32,
        **kwargs,  # prediction_type, sigma_data, snap_tol
    ) -> DiffusersTeacher:
        """Load a saved UNet2DModel and its scheduler config (scheduler/ or the folder), offline."""
        from diffusers import DDPMScheduler, UNet2DModel

        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"diffusers model folder not found: {root}")
        if subfolder is None and not (root / "config.json").is_file() and (root / "unet").is_dir():
            subfolder = "unet"
        unet_dir = root / subfolder if subfolder else root
        if not (unet_dir / "config.json").is_file():
            raise FileNotFoundError(f"no UNet2DModel config.json in {unet_dir}")
        candidates = [root / "scheduler", root, unet_dir]
        sched_dir = next((d for d in candidates if (d / "scheduler_config.json").is_file()), None)
        if sched_dir is None:
            raise FileNotFoundError(
                f"no scheduler_config.json (the noise schedule) in any of {[str(d) for d in candidates]}"
            )
        unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True, torch_dtype=torch_dtype)
        scheduler = DDPMScheduler.from_pretrained(sched_dir, local_files_only=True)
        return cls(unet, scheduler, **kwargs)
