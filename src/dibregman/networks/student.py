"""A K-step student: the one-step generator's network applied on a sigma ladder sigma_1 > ... > sigma_K
(`ladder.py` defines the ladder, its defaults and the sampling chain's randomness):

    x^(1) = sigma_1 z,   x0^(k) = D_theta(x^(k), sigma_k),   x^(k+1) = x0^(k) + sigma_{k+1} eps_{k+1},   sample = x0^(K)

(consistency-style multistep sampling, Song et al. 2023 Algorithm 1; DMD2's few-step students, Yin et al. 2024b).
`Student` subclasses `OneStepGenerator`: the same submodule (`denoiser`), hence the same state-dict keys, and the
same `forward(z, cond)` = step 1, so every one-step export loads as a Student with K = 1. The ladder is a plain
attribute, not a buffer: state dicts of every K have equal keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .generator import OneStepGenerator


class Student(OneStepGenerator):
    def __init__(self, denoiser: nn.Module, sigmas: Sequence[float]):  # sigmas: the ladder sigma_1 > ... > sigma_K
        s = tuple(float(v) for v in sigmas)
        if not s or any(v <= 0 for v in s) or any(a <= b for a, b in zip(s, s[1:], strict=False)):
            raise ValueError(f"a student's sigmas must be > 0 and strictly decreasing, got {list(s)}")
        super().__init__(denoiser, s[0])
        self.sigmas = s

    @property
    def num_steps(self) -> int:
        return len(self.sigmas)

    def forward(self, x: torch.Tensor, cond=None, sigma: torch.Tensor | float | None = None) -> torch.Tensor:
        """sigma None: step 1 from the latent x = z (`OneStepGenerator`); else one step D(x, sigma, cond) of a
        noisy input x at sigma (a float or [N]: each sample its own rung)."""
        if sigma is None:
            return super().forward(x, cond)
        return self.denoiser(x, sigma, cond)

    def sample(
        self,
        z: torch.Tensor,  # [N, *shape] standard normal latents
        cond=None,  # the condition of every step
        steps: int | None = None,  # steps taken, 1..K (None: all K); the first `steps` rungs of the ladder
        *,
        noise: Sequence[torch.Tensor] | None = None,  # eps_2..eps_steps, each [N, *shape]; None: drawn
        generator: torch.Generator | None = None,  # RNG of the drawn noise
    ) -> torch.Tensor:
        """x0 after `steps` steps of the chain (see the module docstring)."""
        return sample_chain(self, z, cond, steps, noise=noise, generator=generator)


def ladder_of(gen: nn.Module) -> tuple[float, ...]:
    """The ladder of a Student, or (sigma_init,) of a one-step generator (a teacher's sampler: one "step")."""
    if isinstance(gen, Student):
        return tuple(gen.sigmas)
    return (getattr(gen, "sigma_init", None),)


def check_steps(gen: nn.Module, steps: int | None) -> int:
    """`steps` (None or 0: all the student's steps) if 1 <= steps <= K; ValueError naming the valid range."""
    k = len(ladder_of(gen))
    if steps is None or steps == 0:
        return k
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= k:
        raise ValueError(f"steps={steps!r}: this student was trained with {k} step(s); valid: 1..{k}")
    return steps


def sample_chain(gen: nn.Module, z: torch.Tensor, cond=None, steps: int | None = None, *, noise=None, generator=None):
    """x0 after `steps` steps of a student's chain (a one-step generator: G(z)); `noise` gives eps_2..eps_steps."""
    k = check_steps(gen, steps)
    sigmas = ladder_of(gen)
    if noise is not None and len(noise) < k - 1:
        raise ValueError(f"{k} steps need {k - 1} noise tensors (eps_2..eps_{k}), got {len(noise)}")
    x0 = gen(z, cond)  # step 1: D(sigma_1 z, sigma_1)
    for j in range(1, k):  # step j + 1 (0-based j): re-noise to sigma_{j+1} with fresh noise, denoise
        if noise is not None:
            eps = noise[j - 1].to(device=x0.device, dtype=x0.dtype)
        else:
            eps = torch.randn(x0.shape, generator=generator, device=generator.device if generator else x0.device)
            eps = eps.to(device=x0.device, dtype=x0.dtype)
        x0 = gen(x0 + sigmas[j] * eps, cond, sigma=sigmas[j])
    return x0


__all__ = ["Student", "ladder_of", "check_steps", "sample_chain"]
