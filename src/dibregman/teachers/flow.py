"""Adapter: a rectified-flow (flow-matching) network as an EDM denoiser.

Rectified flow (Liu et al. 2023; Lipman et al. 2023; SD3, Esser et al. 2024, Sec. 2), t in [0, 1], t = 1 noise:
    x_t = (1 - t) x0 + t eps,        velocity v = dx_t / dt = eps - x0.
Dividing by (1 - t) gives EDM's x = x0 + sigma eps (Karras et al. 2022, Eq. 1) with
    sigma = t / (1 - t),  x = x_t / (1 - t);        inversely  t = sigma / (1 + sigma),  x_t = x / (1 + sigma).
A network output becomes x0_hat without dividing by t or 1 - t (float64 throughout):
    velocity:  D(x, sigma) = x_t - t v          epsilon:  D = x - sigma eps          sample:  D = output.
Time conventions of the wrapped network live here, nowhere else:
    time_scale   the network reads t * time_scale (1: t in [0, 1]; 1000: diffusers' SD3/FLUX timesteps);
    reverse      SiT (Ma et al. 2024): its time tau = 1 - t runs from noise (0) to data (1) and its velocity is
                 dx/dtau = x0 - eps = -v;
    shift s      the network reads the unshifted time u of t = s u / (1 + (s - 1) u) (SD3's shift, Esser et al.
                 2024, Sec. 5.3.2), i.e. u = t / (s - (s - 1) t). A sampler's shifted schedule is `shift_time`.
Euler on the flow ODE, x_t' = x_t + (t' - t) v, is exactly the EDM DDIM step x' = x0 + (sigma' / sigma)(x - x0) at
sigma = t / (1 - t), so `flow_euler_sigmas` reproduces diffusers' `FlowMatchEulerDiscreteScheduler` chain.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from .. import checkpoint as ckpt
from ..networks.unet import SongUNet, UNetConfig, label_input
from ..noise import T_MAX, shift_time, sigma_of_time, time_of_sigma, unshift_time  # the flow-time maps
from .base import as_sigma
from .edm import load_unet_weights

PREDICTIONS = ("velocity", "epsilon", "sample")


def flow_euler_sigmas(times: Sequence[float] | torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    """EDM sigmas (float64, descending, a final 0) of a flow Euler chain over `times` shifted by `shift`, as
    `FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(sigmas=times)` builds it."""
    t = shift_time(torch.as_tensor(times, dtype=torch.float64), shift).to(torch.float32).double()  # as diffusers
    return torch.cat([sigma_of_time(t), t.new_zeros(1)])


def x0_from_flow_output(
    out: torch.Tensor,  # network output in forward convention (velocity eps - x0, epsilon or x0) [N, ...]
    x: torch.Tensor,  # EDM input x = x0 + sigma eps [N, ...]
    x_t: torch.Tensor,  # flow input x_t = x / (1 + sigma) [N, ...]
    t: torch.Tensor,  # flow time, broadcastable [N, 1, ...]
    sigma: torch.Tensor,  # sigma = t / (1 - t), broadcastable [N, 1, ...]
    prediction: str,
) -> torch.Tensor:
    """x0_hat of a rectified-flow prediction (see module docstring); no division by t or 1 - t."""
    if prediction == "velocity":
        return x_t - t * out
    if prediction == "epsilon":
        return x - sigma * out
    if prediction == "sample":
        return out
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


class FlowDenoiser(nn.Module):
    """`D(x, sigma, cond=None) -> x0_hat` around a rectified-flow network `net(x_t, time, cond) -> prediction`."""

    def __init__(
        self,
        net: nn.Module,  # net(x_t [N, ...], time [N], cond) -> velocity / epsilon / x0 [N, ...]
        shape: Sequence[int],  # per-sample shape, e.g. (C, H, W)
        *,
        prediction: str = "velocity",  # "velocity" (eps - x0) | "epsilon" | "sample" (x0)
        time_scale: float = 1.0,  # the network reads t * time_scale (1000 for diffusers' timesteps)
        reverse: bool = False,  # SiT: time 1 - t and velocity x0 - eps
        shift: float = 1.0,  # the network reads the unshifted u of t = shift_time(u, shift)
        sigma_data: float = 0.5,  # data std (EDM); images in [-1, 1]
        sigma_min: float = 0.002,  # smallest noise level the samplers use (t ~ 0.002)
        sigma_max: float = 80.0,  # largest noise level the samplers use (t ~ 0.988)
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if time_scale <= 0 or shift <= 0:
            raise ValueError(f"time_scale and shift must be > 0, got {time_scale} and {shift}")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.net = net
        self.shape = tuple(int(s) for s in shape)
        self.prediction, self.time_scale, self.reverse, self.shift = prediction, float(time_scale), reverse, shift
        self.sigma_data, self.sigma_min, self.sigma_max = float(sigma_data), float(sigma_min), float(sigma_max)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time the network reads for flow time t (float64 [N]): unshift, reverse, scale."""
        u = unshift_time(t, self.shift) if self.shift != 1.0 else t
        return (1 - u if self.reverse else u) * self.time_scale

    def model_input(self, x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t float64, network time float64 [N], t and sigma as [N, 1, ...] float64) for an EDM-scaled x."""
        t = time_of_sigma(as_sigma(sigma, x).to(torch.float64))  # [N]
        view = (-1, *([1] * (x.ndim - 1)))
        x_t = x.to(torch.float64) * (1 - t).view(view)  # x / (1 + sigma), with the clamped t
        return x_t, self.model_time(t), t.view(view), sigma_of_time(t).view(view)

    def _dtypes(self, x: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
        """The network's input dtype (its weights', else x's) and the time's (float32 unless float64: 1000 t
        in bf16 would round to whole timesteps and worse)."""
        p = next(self.net.parameters(), None)
        dtype = p.dtype if p is not None and p.is_floating_point() else x.dtype
        return dtype, torch.float64 if dtype == torch.float64 else torch.float32

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond=None) -> torch.Tensor:
        x_t, time, t, s = self.model_input(x, sigma)
        dtype, time_dtype = self._dtypes(x)
        out = self.net(x_t.to(dtype), time.to(time_dtype), cond).to(torch.float64)
        if self.reverse and self.prediction == "velocity":
            out = -out  # SiT's dx/dtau = x0 - eps
        return x0_from_flow_output(out, x.to(torch.float64), x_t, t, s, self.prediction).to(x.dtype)

    def features(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        """The wrapped network's `features(x_t, time, cond)` (for a discriminator head), at the same inputs."""
        if not hasattr(self.net, "features"):
            raise ValueError(f"{type(self.net).__name__} has no features(x_t, time, cond) method")
        x_t, time, _, _ = self.model_input(x, sigma)
        dtype, time_dtype = self._dtypes(x)
        return self.net.features(x_t.to(dtype), time.to(time_dtype), cond)

    @property
    def feature_channels(self) -> int:
        return int(self.net.feature_channels)


# ---- the native rectified-flow U-Net: `train-teacher` with objective="flow", loaded by `flow:PATH.safetensors` ----


class FlowUNet(nn.Module):
    """The native U-Net (`networks.unet.SongUNet`, EDM's module names) predicting the velocity v = eps - x0 from
    (x_t, 1000 t, cond) with no preconditioning: x_t and v both have unit-order scale for t in [0, 1]."""

    time_scale = 1000.0  # c_noise = 1000 t, as diffusers' flow-matching timesteps

    def __init__(self, cfg: UNetConfig, model: SongUNet | None = None):
        super().__init__()
        self.cfg = cfg
        self.label_dim = cfg.label_dim
        self.model = model if model is not None else SongUNet(cfg)
        self.feature_channels = self.model.feature_channels

    def _labels(self, cond: torch.Tensor | None, n: int, device) -> torch.Tensor | None:
        return label_input(cond, self.label_dim, n, device)

    def forward(self, x_t: torch.Tensor, time: torch.Tensor, cond=None) -> torch.Tensor:
        time = torch.as_tensor(time, dtype=torch.float32, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        return self.model(x_t.float(), time, self._labels(cond, x_t.shape[0], x_t.device)).float()

    def features(self, x_t: torch.Tensor, time: torch.Tensor, cond=None) -> torch.Tensor:
        """Bottleneck feature map of the encoder, [N, C_feat, H_min, W_min] (for a discriminator head)."""
        emb = self.model.embed(time.float().flatten(), self._labels(cond, x_t.shape[0], x_t.device))
        return self.model.encode(x_t.float(), emb)[0]


def logit_normal_time(n: int, mean: float, std: float, *, device=None, generator=None) -> torch.Tensor:
    """Training times t = sigmoid(mean + std n), n ~ N(0, 1) (SD3's logit-normal, Esser et al. 2024, Eq. 19), [n]."""
    return torch.sigmoid(mean + std * torch.randn(n, device=device, generator=generator))


def flow_loss(net: FlowUNet, x0: torch.Tensor, cond, t_mean: float, t_std: float) -> torch.Tensor:
    """Rectified-flow loss ||v(x_t, t) - (eps - x0)||^2 at x_t = (1 - t) x0 + t eps, mean over pixels and batch."""
    t = logit_normal_time(x0.shape[0], t_mean, t_std, device=x0.device)
    eps = torch.randn_like(x0)
    tv = t.view(-1, *([1] * (x0.ndim - 1)))
    v = net((1 - tv) * x0 + tv * eps, t * net.time_scale, cond)
    return (v - (eps - x0)).square().mean()


def flow_unet_teacher(net: FlowUNet) -> FlowDenoiser:
    """D(x, sigma, cond) of a native flow U-Net (sigma range and sigma_data from its config)."""
    c = net.cfg
    shape = (c.img_channels, c.img_resolution, c.img_resolution)
    kw = dict(sigma_data=c.sigma_data, sigma_min=c.sigma_min, sigma_max=c.sigma_max)
    return FlowDenoiser(net, shape, time_scale=net.time_scale, **kw)


def load_flow_teacher(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> FlowDenoiser:
    """Load a native flow teacher export (`train-teacher` with objective=flow) as a `FlowDenoiser` in eval mode."""
    state, meta = ckpt.load_safetensors(path)
    if meta.get("kind") != "flow-unet" or "unet" not in meta:
        raise ValueError(f"{path} is not a flow teacher export (kind={meta.get('kind')!r}; edm-unet loads as edm:)")
    net = load_unet_weights(FlowUNet(UNetConfig.from_dict(meta["unet"])), state, path)
    return flow_unet_teacher(net).eval().requires_grad_(False).to(device)


__all__ = [
    "FlowUNet",
    "flow_loss",
    "logit_normal_time",
    "flow_unet_teacher",
    "load_flow_teacher",
    "FlowDenoiser",
    "PREDICTIONS",
    "T_MAX",
    "shift_time",
    "unshift_time",
    "sigma_of_time",
    "time_of_sigma",
    "flow_euler_sigmas",
    "x0_from_flow_output",
]
