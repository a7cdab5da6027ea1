"""The sigma ladder of a K-step student and the randomness of its sampling chain (few-step students, issue 34).

A K-step student (`networks.student.Student`, `model.student_steps = K`) maps a noisy input at sigma_k to x0_hat,
k = 1..K, on a ladder sigma_1 > sigma_2 > ... > sigma_K > 0 (EDM's sigma, Karras et al. 2022); between steps the
x0_hat is re-noised to the next rung with FRESH noise, as consistency models sample in several steps (Song et al.
2023, Algorithm 1) and DMD2's few-step students do (Yin et al. 2024b, Sec. 4.5):

    x^(1) = sigma_1 z,   x0^(k) = G(x^(k), sigma_k),   x^(k+1) = x0^(k) + sigma_{k+1} eps_{k+1},   sample = x0^(K)

with z, eps_2, ..., eps_K ~ N(0, I) independent. sigma_1 is `model.sigma_init`, so step 1 is the one-step generator
G(z) = D(sigma_init z, sigma_init) (SiD) and K = 1 is exactly today's `OneStepGenerator`.

Default ladders (`model.student_sigmas = None`), by the teacher's own time:
- EDM-sigma teachers (edm, gmm, diffusers, sd, dit, python): log-even from sigma_1 = sigma_init down to
  sigma_init * 0.32^log2(K) (every doubling of K reaches a factor 0.32 lower). With sigma_init = 2.5:
  K = 2: [2.5, 0.8] (0.8 ~ consistency models' two-step intermediate 0.821 on CIFAR-10, sigma_data 0.5);
  K = 4: [2.5, 1.17, 0.55, 0.26]; K = 8: [2.5, ..., 0.082]. GMM preset (sigma_init 1): K = 2: [1, 0.32].
- flow teachers (flow, sd3, flux, and any `teachers.flow.FlowDenoiser`): even in the flow's own time t (t = 1 is
  noise; x_t = (1 - t) x0 + t eps, sigma = t / (1 - t)), from t_1 = sigma_init / (1 + sigma_init):
  t_k = t_1 (K - k + 1) / K, as a flow's Euler chain spaces its times. With sigma_init = 2.5 (t_1 = 0.714):
  K = 2: t [0.714, 0.357], sigma [2.5, 0.556]; K = 4: t [0.714, 0.536, 0.357, 0.179], sigma [2.5, 1.15, 0.556, 0.217].
  The re-noising x0 + sigma eps at sigma = t / (1 - t) is (1 - t) x0 + t eps divided by 1 - t: the flow's own
  interpolation in EDM scaling, so the chain is the same in either form.

Sampling randomness (the rule `generators.generate` and `dibregman sample --seed S` follow): z comes from
`torch.Generator().manual_seed(S)` batch by batch exactly as a one-step student's (so a K-step student's step-1
output and every one-step sample of seed S are unchanged); the fresh noise eps_k of step k = 2..K comes from its own
stream `draws.generator_for(S, "student-noise", k)`, drawn batch by batch in the order of z. A sample's eps_k does not
depend on how many steps are taken, so `--steps 2` and `--steps 4` share z and eps_2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .draws import generator_for

EDM_FACTOR_PER_DOUBLING = 0.32  # the EDM default ladder falls by this factor per doubling of K (K = 2: 2.5 -> 0.8)
NOISE_STREAM = "student-noise"  # draws.seed_for stream of the sampling chain's fresh noise eps_k (k >= 2)


def parse_sigmas(text: str | Sequence[float] | None) -> tuple[float, ...] | None:
    """`model.student_sigmas` as a tuple of floats: "2.5,0.8", "[2.5, 0.8]" or a sequence; None stays None."""
    if text is None:
        return None
    if isinstance(text, str):
        parts = [p.strip() for p in text.strip().strip("[]()").split(",") if p.strip()]
    else:
        parts = list(text)
    try:
        values = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        msg = f"model.student_sigmas={text!r} is not a comma-separated list of numbers, e.g. 2.5,0.8"
        raise ValueError(msg) from None
    if not values:
        raise ValueError(f"model.student_sigmas={text!r} is empty; give sigma_1,...,sigma_K or leave it unset")
    return values


def edm_ladder(steps: int, sigma_init: float) -> tuple[float, ...]:
    """The default ladder of an EDM-sigma teacher: log-even from sigma_init to sigma_init * 0.32^log2(K)."""
    if steps == 1:
        return (float(sigma_init),)
    end = math.log(EDM_FACTOR_PER_DOUBLING) * math.log2(steps)  # log(sigma_K / sigma_1)
    return tuple(float(sigma_init) * math.exp(end * k / (steps - 1)) for k in range(steps))


def flow_ladder(steps: int, sigma_init: float) -> tuple[float, ...]:
    """The default ladder of a flow teacher: t_k = t_1 (K - k + 1) / K from t_1 = sigma_init / (1 + sigma_init),
    mapped by sigma = t / (1 - t) (float64: t_1 maps back to sigma_init up to rounding)."""
    t1 = sigma_init / (1.0 + sigma_init)
    times = [t1 * (steps - k) / steps for k in range(steps)]
    return (float(sigma_init), *(t / (1.0 - t) for t in times[1:]))


def flow_times(sigmas: Sequence[float]) -> list[float]:
    """The flow times t = sigma / (1 + sigma) of a ladder (what a flow network reads, before its shift)."""
    return [s / (1.0 + s) for s in sigmas]


def check_ladder(sigmas: Sequence[float], what: str = "model.student_sigmas") -> tuple[float, ...]:
    """`sigmas` as a tuple if it is a ladder: finite, > 0, strictly decreasing; ValueError naming it otherwise."""
    s = tuple(float(v) for v in sigmas)
    if not s or not all(math.isfinite(v) and v > 0 for v in s):
        raise ValueError(f"{what}={list(s)} must be finite noise levels > 0")
    if any(a <= b for a, b in zip(s, s[1:], strict=False)):
        raise ValueError(f"{what}={list(s)} must decrease strictly (sigma_1 > ... > sigma_K)")
    return s


def resolve_ladder(steps: int, sigma_init: float, sigmas=None, *, flow: bool = False) -> tuple[float, ...]:
    """The ladder of a K-step student: `sigmas` (`model.student_sigmas`) checked, or the family default (flow time
    for a flow teacher, EDM sigma otherwise). ValueError in one line for a bad K or ladder."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"model.student_steps={steps!r} must be an integer >= 1 (1 = the one-step generator)")
    given = parse_sigmas(sigmas)
    if given is None:
        return check_ladder((flow_ladder if flow else edm_ladder)(steps, sigma_init), "the default ladder")
    if len(given) != steps:
        raise ValueError(
            f"model.student_sigmas={list(given)} has {len(given)} values but model.student_steps={steps}: "
            "give one sigma per step"
        )
    if not math.isclose(given[0], sigma_init, rel_tol=1e-6):
        raise ValueError(
            f"model.student_sigmas starts at {given[0]:g} but model.sigma_init={sigma_init:g}: "
            "step 1 reads sigma_init * z, so sigma_1 must equal sigma_init"
        )
    return check_ladder(given)


def check_config(cfg) -> None:
    """`config.validate`'s check of the student keys (the family default is checked when the teacher is known)."""
    m = cfg.model
    resolve_ladder(m.student_steps, m.sigma_init, m.student_sigmas)


def is_flow_teacher(teacher) -> bool:
    """A teacher whose own time is the flow time t (its default ladder is even in t)."""
    from .teachers.flow import FlowDenoiser

    return isinstance(teacher, FlowDenoiser)


def ladder_for(cfg, teacher) -> tuple[float, ...]:
    """The ladder of `cfg`'s student for `teacher`, checked against the teacher's noise range."""
    m = cfg.model
    s = resolve_ladder(m.student_steps, m.sigma_init, m.student_sigmas, flow=is_flow_teacher(teacher))
    lo = float(getattr(teacher, "sigma_min", 0.0))
    if len(s) > 1 and s[-1] < lo:
        raise ValueError(f"the student's last sigma {s[-1]:g} lies below the teacher's sigma_min {lo:g}")
    return s


def make_student(denoiser, cfg, teacher):
    """G_theta of `cfg`: a `OneStepGenerator` for K = 1 (today's, unchanged), a `Student` on `ladder_for` for K > 1."""
    from .networks.generator import OneStepGenerator
    from .networks.student import Student

    if cfg.model.student_steps == 1:
        return OneStepGenerator(denoiser, cfg.model.sigma_init)
    return Student(denoiser, ladder_for(cfg, teacher))


def chain_generators(seed: int, steps: int) -> list[torch.Generator]:
    """The generators of eps_2..eps_K for sampling seed `seed` (see the module docstring); [] for one step."""
    return [generator_for(seed, NOISE_STREAM, k) for k in range(2, steps + 1)]


def chain_noise(gens: list[torch.Generator], n: int, shape: Sequence[int]) -> list[torch.Tensor]:
    """The next n draws of each step's noise (CPU, float32): eps_2..eps_K of one batch."""
    return [torch.randn((n, *shape), generator=g) for g in gens]


def student_meta(gen, teacher=None) -> dict:
    """What an export records of its student: the ladder, and its flow times when `teacher` (default: the
    student's own network, a copy of the teacher's) is a flow."""
    from .networks.student import ladder_of

    sigmas = list(ladder_of(gen))
    out = {"student_steps": len(sigmas), "student_sigmas": sigmas}
    if is_flow_teacher(teacher if teacher is not None else gen.denoiser):
        out["student_times"] = flow_times(sigmas)
    return out


def t2i_student_meta(gen, text) -> dict:
    """A text-to-image export's student (`teachers/t2i.py`): the ladder, `one_step`, and for K > 1 each step's
    recipe (the family's `export_meta` at sigma_k: timestep and input scale, or flow time) and the chain in words."""
    out = student_meta(gen, text)
    sigmas = out["student_sigmas"]
    out["one_step"] = len(sigmas) == 1
    if len(sigmas) > 1:
        drop = ("load_kwargs", "usage")
        out["steps"] = [{k: v for k, v in text.export_meta(s).items() if k not in drop} for s in sigmas]
        out["usage_steps"] = (
            "K-step chain: x = student_sigmas[0] * z; for k = 1..K: x0 = D(x, sigma_k), one student call run as "
            "`usage` with steps[k-1]'s timestep / flow time and with x in place of sigma_init * z (sd: "
            "eps = unet(x / sqrt(1 + sigma_k^2), timestep_k, text), x0 = x - sigma_k * eps; flow: x_t = x / (1 + "
            "sigma_k), x0 = x_t - t_k * v); then x = x0 + sigma_{k+1} * randn (fresh noise) until the last step, "
            "whose x0 is decoded. Or: dibregman sample --checkpoint DIR --prompt TEXT --steps K"
        )
    return out


__all__ = [
    "parse_sigmas",
    "edm_ladder",
    "flow_ladder",
    "flow_times",
    "check_ladder",
    "resolve_ladder",
    "check_config",
    "is_flow_teacher",
    "ladder_for",
    "make_student",
    "chain_generators",
    "chain_noise",
    "student_meta",
    "t2i_student_meta",
]
