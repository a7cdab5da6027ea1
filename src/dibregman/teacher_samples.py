"""Teacher samples at any number of function evaluations (NFE), to put a student beside its teacher:
`dibregman sample --teacher SPEC --nfe N [--sampler ...]`, `dibregman eval --teacher SPEC --nfe N`,
`api.sample_teacher`.

NFE counts denoiser evaluations (`sample.count_evaluations`): Heun with N intervals takes 2N - 1 (so an odd NFE),
Euler and DDIM take N. Their noise levels are the Karras schedule (EDM Eq. 5, rho = 7) on the teacher's range within
[0.002, 80], as `sample.sample_teacher`. `flow_euler` is the flow Euler chain of N steps, t = 1, 1 - 1/N, ..., 1/N
(for sd3/flux the pipeline's own shifted chain, `sampling_sigmas`), as EDM sigmas stepped by DDIM, which is Euler
in t. A `TeacherSampler` is a generator G(z) like a student's: the sample of z is the chain's solution from
x_0 = sigma_0 z, and z is drawn as for the student (same seed, same z), so the two can be compared sample by sample.
"""

from __future__ import annotations

import torch
from torch import nn

from .sample import count_evaluations, ddim_sampler, euler_sampler, heun_sampler

SAMPLERS = {"heun": heun_sampler, "euler": euler_sampler, "ddim": ddim_sampler, "flow_euler": ddim_sampler}


def num_steps_for(nfe: int, sampler: str) -> int:
    """Intervals N of a chain with `nfe` denoiser evaluations; ValueError for an NFE the sampler cannot take."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {list(SAMPLERS)}")
    if nfe < 1:
        raise ValueError(f"--nfe must be >= 1, got {nfe}")
    if sampler == "heun" and nfe % 2 == 0:
        raise ValueError(
            f"--nfe {nfe}: Heun takes 2N - 1 evaluations for N steps, so an odd NFE (e.g. {nfe - 1} or {nfe + 1})"
        )
    steps = (nfe + 1) // 2 if sampler == "heun" else nfe
    assert count_evaluations(steps, "euler" if sampler == "flow_euler" else sampler) == nfe
    return steps


def teacher_sigmas(teacher, nfe: int, sampler: str) -> torch.Tensor:
    """Descending noise levels (float64, final 0) of the teacher's chain with `nfe` evaluations."""
    steps = num_steps_for(nfe, sampler)
    if sampler == "flow_euler":
        if hasattr(teacher, "sampling_sigmas"):  # sd3 / flux: the pipeline's chain, with its shift
            return teacher.sampling_sigmas(steps).double()
        from .teachers.flow import flow_euler_sigmas

        return flow_euler_sigmas(torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:-1])
    from .noise import karras_sigmas

    lo = max(0.002, float(getattr(teacher, "sigma_min", 0.0)))
    hi = min(80.0, float(getattr(teacher, "sigma_max", float("inf"))))
    return karras_sigmas(steps, lo, hi, 7.0)


class TeacherSampler(nn.Module):
    """x = the teacher's ODE chain from x_0 = sigma_0 z (`sample.py`): G(z, cond) for a teacher, as for a student."""

    def __init__(self, teacher: nn.Module, nfe: int, sampler: str = "heun"):
        super().__init__()
        self.denoiser = teacher  # `generators.generate` / `sample_export` read .denoiser (shape, classes, decode)
        self.sampler, self.nfe = sampler, nfe
        self.register_buffer("sigmas", teacher_sigmas(teacher, nfe, sampler), persistent=False)

    def forward(self, z: torch.Tensor, cond=None) -> torch.Tensor:
        if isinstance(cond, list | tuple) and cond and isinstance(cond[0], str):  # prompts: encoded once, not per step
            cond = self.denoiser.encode_prompts(list(cond))
        return SAMPLERS[self.sampler](self.denoiser, z, self.sigmas.to(z.device), cond).float()


def load_teacher_sampler(spec: str, nfe: int, sampler: str = "heun", *, guidance_scale: float | None = None,
                         device="cpu") -> TeacherSampler:  # fmt: skip
    """The teacher of a spec as a `TeacherSampler` on device; guidance_scale: classifier-free guidance of a
    text-to-image or class-conditional teacher (None: the teacher's own default)."""
    from .teachers import load_teacher

    num_steps_for(nfe, sampler)  # a bad NFE fails before a large teacher loads
    teacher = load_teacher(spec).eval().requires_grad_(False)
    if guidance_scale is not None:
        if not hasattr(teacher, "guidance_scale"):
            raise ValueError(f"--guidance-scale: teacher {spec!r} has no classifier-free guidance")
        teacher.guidance_scale = float(guidance_scale)
    return TeacherSampler(teacher, nfe, sampler).to(device)


def teacher_generator(spec: str, nfe: int, sampler: str = "heun", guidance_scale: float | None = None, device="cpu"):
    """(`TeacherSampler`, metadata) as `generators.load_generator` returns a student's (`dibregman sample / eval`)."""
    chain = load_teacher_sampler(spec, nfe, sampler, guidance_scale=guidance_scale, device=device)
    kind = "dibregman-one-step-text-to-image" if hasattr(chain.denoiser, "encode_prompts") else "teacher"
    return chain, {"kind": kind, "teacher": spec, "sampler": sampler, "nfe": nfe}


@torch.no_grad()
def sample_teacher_spec(spec: str, num: int, *, nfe: int, sampler: str = "heun", prompts: list[str] | None = None,
                        seed: int = 0, batch_size: int = 256, guidance_scale: float | None = None,
                        device="cpu") -> tuple[torch.Tensor, int]:  # fmt: skip
    """`num` teacher samples (decoded images for a latent teacher, a class per column for a class-conditional one,
    a prompt per column for a text-to-image one) and their grid's columns, on the CPU."""
    from .generators import sample_export

    chain, meta = teacher_generator(spec, nfe, sampler, guidance_scale, device)
    return sample_export(chain, meta, num, list(prompts or []), seed=seed, batch_size=batch_size)


def add_teacher_flags(p) -> None:
    """--teacher SPEC --nfe N --sampler S --guidance-scale W: a teacher's samples instead of a student's."""
    p.add_argument("--teacher", default="", help="teacher spec KIND:ARG: sample the teacher's ODE chain instead")
    p.add_argument("--nfe", type=int, default=35, help="with --teacher: denoiser evaluations (Heun: odd, 2N - 1)")
    p.add_argument("--sampler", default="heun", choices=["heun", "euler", "ddim", "flow_euler"], help="with --teacher")
    p.add_argument("--guidance-scale", type=float, default=None, help="with --teacher: its CFG (default: its own)")


def load_sampler(args, device):
    """(generator, metadata) of --checkpoint, or of --teacher's ODE chain at --nfe evaluations (the same z)."""
    from .generators import load_generator

    if args.teacher:
        return teacher_generator(args.teacher, args.nfe, args.sampler, args.guidance_scale, device)
    return load_generator(args.checkpoint, device)


__all__ = [
    "add_teacher_flags",
    "load_sampler",
    "SAMPLERS",
    "num_steps_for",
    "teacher_sigmas",
    "TeacherSampler",
    "load_teacher_sampler",
    "sample_teacher_spec",
]
