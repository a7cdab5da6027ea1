"""The random draws of one micro-batch of Algorithm 1 (noise, noise levels, real samples, conditions), and the
one seeding rule of the package: every random stream is seeded by `seed_for(run seed, stream name, counters)`.

Every draw of step k comes from one generator seeded by (seed, "batch", k, round) and is taken for the *global*
micro-batch; each rank keeps its slice, so W processes draw exactly what one process draws. Both phases of a
step (critic and generator) see the same draws: Algorithm 1 shares z between them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from . import dist
from .noise import edm_loss_weight, edm_training_sigma, schedule_of


def seed_for(seed: int, stream: str, *counters: int) -> int:
    """A 63-bit seed from (run seed, stream name, counters) by BLAKE2: distinct streams and counters never share
    a seed (unlike offsets such as seed + 777 or (seed * M + step) * 64 + round, which collide)."""
    key = ":".join(str(v) for v in (seed, stream, *counters)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def generator_for(seed: int, stream: str, *counters: int) -> torch.Generator:
    """A CPU generator seeded by `seed_for`."""
    return torch.Generator().manual_seed(seed_for(seed, stream, *counters))


@dataclass
class Batch:
    """Random draws of one micro-batch (all taken from one seeded generator, so runs are reproducible)."""

    z: torch.Tensor  # [N, *shape] generator input noise
    gen_sigma: torch.Tensor  # [N] noise level of the generator step
    gen_noise: torch.Tensor  # [N, *shape]
    gan_noise: torch.Tensor  # [N, *shape] independent noise for the GAN term
    fake_sigma: torch.Tensor  # [N] noise level of the fake-score DSM step
    fake_weight: torch.Tensor  # [N] EDM loss weight lambda(fake_sigma)
    fake_noise: torch.Tensor  # [N, *shape]
    disc_sigma: torch.Tensor  # [N] noise level of the discriminator step
    disc_noise_real: torch.Tensor  # [N, *shape]
    disc_noise_fake: torch.Tensor  # [N, *shape]
    cond: object = None  # condition c ~ D_c (labels, text embeddings), or None
    real_cond: object = None  # condition of the real side (x_gt, c) ~ D_d; None: the same as `cond`


def local_slice(n: int) -> slice:
    """This rank's slice of a global micro-batch of n samples."""
    w, r = dist.world_size(), dist.rank()
    if n % w:
        raise ValueError(f"global micro-batch {n} is not divisible by the world size {w}")
    per = n // w
    return slice(r * per, (r + 1) * per)


def draw_batch(
    cfg, m, step: int, rnd: int, n: int, device, sigma_range, *, real: bool = True
) -> tuple[Batch, torch.Tensor | None]:
    """All random draws of micro-batch `rnd` of step `step` for the global micro-batch of size n; returns this
    rank's (Batch, real samples). real=False (the generator phase) skips drawing and embedding the real side,
    which is drawn last, so the other draws are the same in both phases."""
    g = generator_for(cfg.run.seed, "batch", step, rnd)
    shape = (n, *m.shape)
    lo, hi = sigma_range
    L = cfg.loss
    schedule = schedule_of(L)  # loss.sigma_schedule: Karras (default) or a flow-time schedule

    def noise():
        return torch.randn(shape, generator=g)

    z = noise()
    gen_sigma = schedule.draw(n, L.gen_t_max, lo, hi, generator=g, origin=L.gen_t_origin)
    gen_noise, gan_noise = noise(), noise()
    fake_sigma, fake_weight = edm_training_sigma(n, L.fake_p_mean, L.fake_p_std, m.sigma_data, generator=g)
    b = Batch(
        z=z,
        gen_sigma=gen_sigma,
        gen_noise=gen_noise,
        gan_noise=gan_noise,
        fake_sigma=fake_sigma,
        fake_weight=fake_weight,
        fake_noise=noise(),
        disc_sigma=schedule.draw(n, L.disc_t_max, lo, hi, generator=g),
        disc_noise_real=noise(),
        disc_noise_fake=noise(),
    )
    cond_index = m.conditions.draw(g, n) if m.conditions is not None else None  # c ~ D_c (line 4)
    if L.fake_sigma == "generator":  # the fake score learns where the generator step reads it; drawn after the
        # default's draws, so that those stay the same
        b.fake_sigma = schedule.draw(n, L.gen_t_max, lo, hi, generator=g, origin=L.gen_t_origin)
        b.fake_weight = edm_loss_weight(b.fake_sigma, m.sigma_data)
    x_real, real_index = m.real(g, n) if real else (None, None)  # (x_gt, c) ~ D_d (line 21): critic phase only
    sl = local_slice(n)
    for k, v in vars(b).items():
        if isinstance(v, torch.Tensor):
            setattr(b, k, v[sl].to(device))
    if cond_index is not None:  # only this rank's slice is embedded
        b.cond = m.conditions.embed(cond_index[sl], device)
    if real_index is not None:
        b.real_cond = m.real_conditions.embed(real_index[sl], device)
    return b, (x_real[sl].to(device) if real else None)
