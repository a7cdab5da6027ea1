"""Teacher samplers as pure functions of any denoiser D(x, sigma, cond) (Karras et al. 2022, "EDM").

Notation of EDM Sec. 3: noise levels t_0 > t_1 > ... > t_N = 0 (here `sigmas`; sigma(t) = t, s(t) = 1), the
probability-flow ODE dx/dt = (x - D(x; t)) / t (EDM Eq. 3 with Tweedie's score), and the sampler starts from
x_0 = t_0 * noise with noise ~ N(0, I) (Algorithm 1, line 1). Step counts: `num_steps` = N intervals; the
number of denoiser evaluations is `count_evaluations(N, sampler)` (Heun with 18 steps = 35 evaluations).

DDIM (Song et al. 2021, eta = 0) rewritten in the EDM parametrisation, x^VE = x^VP / sqrt(alpha_bar),
sigma = sqrt((1 - alpha_bar) / alpha_bar), is x_{i+1} = x0_hat + (t_{i+1} / t_i) (x_i - x0_hat): algebraically
the Euler step of the probability-flow ODE (EDM Sec. 4 and App. B.3 make the same point). Both are kept so
that each can be read in its own paper's form; `tests/test_sample.py` checks that they agree.

The state is kept in float64 as in EDM's `edm_sampler`; the denoiser sees the dtype of `noise`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from .noise import karras_sigmas

SAMPLERS = ("heun", "euler", "ddim")


def _state_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _steps(sigmas: torch.Tensor, progress: bool, desc: str):
    pairs = list(zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True))
    if progress:
        from tqdm import tqdm

        return tqdm(pairs, desc=desc, leave=False)
    return pairs


def _denoise(denoiser, x: torch.Tensor, t: float, cond, dtype: torch.dtype) -> torch.Tensor:
    """D(x; t) evaluated in the caller's dtype, returned in the state's dtype."""
    sigma = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
    return denoiser(x.to(dtype), sigma, cond).to(x.dtype)


def heun_sampler(
    denoiser: Callable,  # D(x, sigma, cond) -> x0_hat
    noise: torch.Tensor,  # [N, *shape] standard normal latents
    sigmas: torch.Tensor,  # [num_steps + 1] descending noise levels t_0 > ... > t_N (usually t_N = 0)
    cond=None,  # condition passed to the denoiser unchanged
    *,
    progress: bool = False,  # show a tqdm bar over the steps
) -> torch.Tensor:
    """EDM Algorithm 1: deterministic 2nd-order Heun sampler of the probability-flow ODE."""
    x_next = noise.to(_state_dtype(noise.device)) * float(sigmas[0])  # line 1: x_0 ~ N(0, t_0^2 I)
    for t_cur, t_next in _steps(sigmas, progress, "heun"):  # line 2
        x_cur = x_next
        d_cur = (x_cur - _denoise(denoiser, x_cur, t_cur, cond, noise.dtype)) / t_cur  # line 3
        x_next = x_cur + (t_next - t_cur) * d_cur  # line 4: Euler step from t_i to t_{i+1}
        if t_next != 0:  # line 5: apply the 2nd-order correction unless t_{i+1} = 0
            d_prime = (x_next - _denoise(denoiser, x_next, t_next, cond, noise.dtype)) / t_next  # line 6
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)  # line 7: trapezoidal rule
    return x_next.to(noise.dtype)  # line 8: return x_N


def euler_sampler(
    denoiser: Callable,  # D(x, sigma, cond) -> x0_hat
    noise: torch.Tensor,  # [N, *shape] standard normal latents
    sigmas: torch.Tensor,  # [num_steps + 1] descending noise levels
    cond=None,
    *,
    progress: bool = False,
) -> torch.Tensor:
    """EDM Algorithm 1 without its correction (lines 5-7): 1st-order Euler on the probability-flow ODE."""
    x = noise.to(_state_dtype(noise.device)) * float(sigmas[0])
    for t_cur, t_next in _steps(sigmas, progress, "euler"):
        d_cur = (x - _denoise(denoiser, x, t_cur, cond, noise.dtype)) / t_cur  # dx/dt = (x - D(x; t)) / t
        x = x + (t_next - t_cur) * d_cur
    return x.to(noise.dtype)


def ddim_sampler(
    denoiser: Callable,  # D(x, sigma, cond) -> x0_hat
    noise: torch.Tensor,  # [N, *shape] standard normal latents
    sigmas: torch.Tensor,  # [num_steps + 1] descending noise levels
    cond=None,
    *,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM (eta = 0) in EDM form: keep x0_hat, rescale the noise: x_{i+1} = x0_hat + t_{i+1} eps_hat."""
    x = noise.to(_state_dtype(noise.device)) * float(sigmas[0])
    for t_cur, t_next in _steps(sigmas, progress, "ddim"):
        x0_hat = _denoise(denoiser, x, t_cur, cond, noise.dtype)
        x = x0_hat + (t_next / t_cur) * (x - x0_hat)  # eps_hat = (x_i - x0_hat) / t_i
    return x.to(noise.dtype)


_SAMPLER_FNS = {"heun": heun_sampler, "euler": euler_sampler, "ddim": ddim_sampler}


def count_evaluations(num_steps: int, sampler: str = "heun") -> int:
    """Denoiser evaluations for `num_steps` intervals ending at sigma = 0 (Heun: 2 N - 1, others: N)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {list(SAMPLERS)}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return 2 * num_steps - 1 if sampler == "heun" else num_steps


def _device_of(denoiser) -> torch.device:
    if isinstance(denoiser, torch.nn.Module):
        for t in list(denoiser.parameters()) + list(denoiser.buffers()):
            return t.device
    return torch.device(getattr(denoiser, "device", "cpu"))


@torch.no_grad()
def sample_teacher(
    denoiser,  # any Denoiser with sigma_min / sigma_max and (unless `shape` is given) `shape`
    n: int,  # number of samples
    *,
    num_steps: int = 18,  # sampler intervals (Heun 18 = 35 evaluations, EDM's CIFAR-10 setting)
    sampler: str = "heun",  # one of SAMPLERS
    cond=None,  # condition for all n samples ([n] labels / [n, ...] embeddings), sliced per batch
    generator: torch.Generator | None = None,  # RNG for the latents
    batch_size: int = 256,  # samples per denoiser call
    shape: tuple[int, ...] | None = None,  # per-sample shape; default `denoiser.shape`
    sigma_min: float = 0.002,  # Karras schedule end (raised to denoiser.sigma_min if larger)
    sigma_max: float = 80.0,  # Karras schedule start (lowered to denoiser.sigma_max if smaller)
    rho: float = 7.0,  # Karras schedule curvature
    progress: bool = False,  # tqdm bar over batches
    sigmas: torch.Tensor | None = None,  # explicit descending noise levels ending at 0 (e.g. a flow teacher's
    # Euler chain, `teachers.flow.flow_euler_sigmas`); None: the Karras schedule of num_steps/sigma_*/rho
    noise: torch.Tensor | None = None,  # the unit-variance latents [n, *shape] to start from; None: drawn
    # from `generator` batch by batch
) -> torch.Tensor:
    """Draw n teacher samples [n, *shape] on the Karras schedule (or on `sigmas`) with the chosen ODE sampler,
    from the latents `noise` when given (the ODE map of those latents: the regression term's pairs)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {list(SAMPLERS)}")
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    shape = tuple(shape if shape is not None else denoiser.shape)
    if noise is not None and tuple(noise.shape) != (n, *shape):
        raise ValueError(f"noise must have shape {(n, *shape)}, got {tuple(noise.shape)}")
    device = _device_of(denoiser)
    sigma_min = max(sigma_min, float(getattr(denoiser, "sigma_min", 0.0)))  # as EDM's generate.py
    sigma_max = min(sigma_max, float(getattr(denoiser, "sigma_max", float("inf"))))
    if sigmas is None:
        sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho, device=device)
    elif sigmas.ndim != 1 or len(sigmas) < 2 or not bool((sigmas[:-1] > sigmas[1:]).all()):
        raise ValueError(f"sigmas must be a descending 1-D sequence of >= 2 noise levels, got {sigmas}")
    num_steps = len(sigmas) - 1
    fn = _SAMPLER_FNS[sampler]
    gen_device = generator.device if generator is not None else device
    out = []
    starts = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=f"{sampler}-{count_evaluations(num_steps, sampler)}", unit="batch")
    for start in starts:
        b = min(batch_size, n - start)
        if noise is None:
            z = torch.randn(b, *shape, generator=generator, device=gen_device).to(device)
        else:
            z = noise[start : start + b].to(device)
        c = cond[start : start + b] if cond is not None else None
        out.append(fn(denoiser, z, sigmas, c))
    x = torch.cat(out)
    bad = int((~torch.isfinite(x.reshape(n, -1))).any(dim=1).sum())
    if bad:
        warnings.warn(f"sample_teacher: {bad} of {n} samples contain NaN/inf", stacklevel=2)
    return x


__all__ = ["SAMPLERS", "heun_sampler", "euler_sampler", "ddim_sampler", "count_evaluations", "sample_teacher"]
