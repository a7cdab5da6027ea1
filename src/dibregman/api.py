"""The Python API, mirroring the command line one function per command.

from dibregman import api
cfg = api.preset("mnist", **{"divergence.name": "sba", "divergence.lam": 5})
summary = api.distill(cfg, "runs/mnist-sba")          # dibregman distill
images = api.sample("runs/mnist-sba", 64)              # dibregman sample
teacher = api.sample_teacher("edm:assets/mnist_teacher.safetensors", 64, nfe=35)  # sample --teacher ... --nfe 35
scores = api.evaluate(images, "mnist:data/mnist:test") # dibregman eval
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import DistillConfig
from .loop import distill as _distill
from .presets import from_preset


def preset(name: str, **overrides) -> DistillConfig:
    """A named preset with `section.key=value` overrides applied and validated (ValueError on a typo); a reward
    drops the preset's GAN term, as on the command line (`presets.from_preset`)."""
    return from_preset(name, overrides)


def distill(cfg: DistillConfig, run_dir: str | Path, *, hooks=None, max_steps: int | None = None, teacher=None) -> dict:
    """Run (or resume) Di-Bregman distillation (Algorithm 1) in `run_dir`; returns a summary dict.

    teacher: a `torch.nn.Module` implementing D(x, sigma, cond) (see `teachers/custom.py`) instead of
    `cfg.model.teacher`; it is recorded as `object:NAME`, so its exports load only in this process (a
    `python:MODULE:FUNCTION` spec loads anywhere).

    hooks: callables `hook(trainer, num_images) -> dict` run at every log interval; what they return is logged.
    Raises `runguard.RunLocked` if another process holds `run_dir`, `runguard.TooManyBadSteps` after
    `run.max_bad_steps` NaN/Inf steps in a row, `runguard.RunInterrupted` after SIGINT/SIGTERM (checkpoint written).
    """
    if teacher is not None:
        from .config import override
        from .teachers.custom import register_object

        cfg = override(cfg, {"model.teacher": register_object(teacher)})
    return _distill(cfg, run_dir, hooks=hooks, max_steps=max_steps)


def sample(
    checkpoint: str | Path, num: int, *, seed: int = 0, device: str = "cpu", steps: int | None = None
) -> torch.Tensor:
    """`num` samples [num, *shape] from a run folder or a `generator.safetensors`, in `steps` steps (None: all the
    student was trained with; 1..K; `ladder.py` gives the chain and its seeding)."""
    from .generators import generate, load_generator

    gen, _ = load_generator(checkpoint, device=device)
    return generate(gen, num, seed=seed, device=device, steps=steps)


def sample_teacher(
    teacher: str,  # teacher spec KIND:ARG
    num: int,
    *,
    nfe: int = 35,  # denoiser evaluations (Heun: odd, 2N - 1 for N steps)
    sampler: str = "heun",  # heun | euler | ddim | flow_euler (`teacher_samples.SAMPLERS`)
    prompts: list[str] | None = None,  # text-to-image teachers: the prompts (cycled, a grid column each)
    guidance_scale: float | None = None,  # classifier-free guidance (None: the teacher's own)
    seed: int = 0,  # the z of `sample(run, num, seed=seed)`: student and teacher samples side by side
    device: str = "cpu",
) -> torch.Tensor:
    """`num` samples of the teacher's ODE chain with `nfe` evaluations (decoded images for a latent teacher); the
    same as `dibregman sample --teacher SPEC --nfe N`."""
    from .teacher_samples import sample_teacher_spec

    x, _ = sample_teacher_spec(teacher, num, nfe=nfe, sampler=sampler, prompts=prompts, seed=seed,
                               guidance_scale=guidance_scale, device=device)  # fmt: skip
    return x


def evaluate(samples: torch.Tensor, reference="mnist:data/mnist:test", **kwargs) -> dict:
    """FID / KID / precision-recall (see `dibregman.evaluate.evaluate_samples` for the options)."""
    from .evaluate import evaluate_samples

    return evaluate_samples(samples, reference, **kwargs)


def train_teacher(run_dir: str | Path, preset: str = "mnist", **options) -> Path:
    """Train a native EDM teacher (a `TEACHER_PRESETS` name, options: fields of `TeacherConfig`); returns the
    EMA safetensors path."""
    from .train_teacher import teacher_config
    from .train_teacher import train_teacher as _train

    return _train(teacher_config(preset, **options), run_dir)  # ValueError naming an unknown or invalid option


__all__ = ["preset", "distill", "sample", "sample_teacher", "evaluate", "train_teacher"]
