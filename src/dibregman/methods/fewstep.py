"""Training inputs of a K-step student (`model.student_steps = K > 1`, ladder sigma_1 > ... > sigma_K: `ladder.py`).

Each sample of a micro-batch trains one step k ~ U{1, ..., K} of the student; its input x^(k) at sigma_k comes from
`loss.student_inputs`:
- backward_sim (DMD2's backward simulation, Yin et al. 2024b, Sec. 4.5): the student's own chain from noise,
      x^(1) = sigma_1 z,   x^(j+1) = G(x^(j), sigma_j) + sigma_{j+1} eps_{j+1}   (j < k, without gradient),
  so step k sees what it sees at sampling time;
- noised_data (FastGen's default for multistep students): x^(k) = x_real + sigma_k eps_k for k >= 2, with x_real
  from the real side of Eq. 5 (`model.real`: data or teacher samples); step 1 reads sigma_1 z, as when sampling.
The output x = G(x^(k), sigma_k) carries the gradient and is Algorithm 1's x for everything that follows, exactly as
G(z) for K = 1: Eq. 4's weight, the fake score's DSM and the discriminator (the critic phase takes the same x without
gradient), the GAN term and a reward's Eq. 14. DMD's regression term keeps training step 1, G(z) (its pairs
(z, ODE(z)) map a latent alone; a later step's input also holds fresh noise).

Draws: one generator per micro-batch seeded ("student", step, round) -- a stream a K = 1 run never opens, so its draws
("batch", step, round: `draws.draw_batch`) and every other stream stay as they were, and resume stays exact -- taken
for the global micro-batch in this order: k [n], eps_2..eps_K [K - 1, n, *shape], then (noised_data) the real
samples; each rank keeps its slice. Both phases of a step draw the same. Cost of backward_sim: up to K - 1 forward
passes without gradient on the whole micro-batch (a sample's chain stops at its k: `torch.where`), as many on every
rank (the largest k of the global micro-batch: DDP and FSDP2 forwards hold collectives).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distill import bcast
from ..draws import Batch, generator_for, local_slice

STREAM = "student"  # draws.seed_for stream of the few-step draws
INPUTS = ("backward_sim", "noised_data")


@dataclass
class StudentDraw:
    k: torch.Tensor  # [n] long: the trained step of each sample, 1..K
    noise: torch.Tensor  # [K - 1, n, *shape]: eps_2..eps_K
    real: torch.Tensor | None = None  # [n, *shape] real samples (noised_data only)
    top: int | None = None  # the largest k of the GLOBAL micro-batch (None: of this slice)


class FewStepInputs:
    """The inputs and the output of the trained step of a K-step student for one micro-batch."""

    def __init__(self, sigmas: tuple[float, ...], mode: str, seed: int, shape: tuple, real=None):
        if mode not in INPUTS:
            raise ValueError(f"loss.student_inputs={mode!r} is not valid; choose one of {list(INPUTS)}")
        assert len(sigmas) > 1, "one step needs no few-step inputs"
        self.sigmas, self.mode, self.seed, self.shape, self.real = tuple(sigmas), mode, seed, tuple(shape), real

    @property
    def num_steps(self) -> int:
        return len(self.sigmas)

    def draw(self, step: int, rnd: int, n: int, device) -> StudentDraw:
        """This rank's slice of the few-step draws of micro-batch `rnd` of step `step` (global size n)."""
        g = generator_for(self.seed, STREAM, step, rnd)
        k = torch.randint(1, self.num_steps + 1, (n,), generator=g)
        noise = torch.randn((self.num_steps - 1, n, *self.shape), generator=g)
        real = self.real(g, n)[0].cpu() if self.mode == "noised_data" else None
        sl, top = local_slice(n), int(k.max())  # every rank runs the same number of chain steps (collectives)
        real = None if real is None else real[sl].to(device)
        return StudentDraw(k[sl].to(device), noise[:, sl].to(device), real, top)

    def trained_input(self, gen, b: Batch, d: StudentDraw) -> torch.Tensor:
        """x^(k) of every sample, without gradient (see the module docstring)."""
        sig, k = self.sigmas, d.k
        with torch.no_grad():
            x = sig[0] * b.z  # step 1's input
            if self.mode == "noised_data":
                idx = (k - 2).clamp(min=0)
                eps = d.noise[idx, torch.arange(len(k), device=k.device)]  # eps_k of each sample
                s_k = torch.tensor(sig, dtype=b.z.dtype, device=k.device)[k - 1]
                return torch.where(bcast(k > 1, x), d.real.to(x.dtype) + bcast(s_k, x) * eps, x)
            top = d.top if d.top is not None else int(k.max())
            for j in range(1, top):  # step j's output, re-noised to sigma_{j+1}, for samples with k > j
                x0 = gen(x, b.cond, sigma=sig[j - 1]).to(x.dtype)
                x = torch.where(bcast(k > j, x), x0 + sig[j] * d.noise[j - 1], x)
        return x

    def output(self, gen, b: Batch, d: StudentDraw) -> torch.Tensor:
        """x = G(x^(k), sigma_k): the trained step's output (with gradient when grad mode is on)."""
        x_in = self.trained_input(gen, b, d)
        sigma = torch.tensor(self.sigmas, dtype=torch.float32, device=d.k.device)[d.k - 1]  # [n]
        return gen(x_in, b.cond, sigma=sigma)


def build_fewstep(cfg, models) -> FewStepInputs | None:
    """The few-step inputs of `cfg` (None for K = 1: the one-step generator's code path is untouched)."""
    from ..networks.student import ladder_of

    sigmas = ladder_of(models.generator)
    if len(sigmas) == 1:
        return None
    mode = cfg.loss.student_inputs
    if mode == "noised_data" and models.conditions is not None:
        raise ValueError(
            "loss.student_inputs=noised_data needs an unconditional teacher (a real sample's condition would have "
            "to replace the drawn one); use backward_sim for conditional teachers"
        )
    return FewStepInputs(sigmas, mode, cfg.run.seed, models.shape, models.real)


__all__ = ["FewStepInputs", "StudentDraw", "build_fewstep", "INPUTS", "STREAM"]
