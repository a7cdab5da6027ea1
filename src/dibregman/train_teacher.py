"""Train a native EDM teacher (Karras et al. 2022, Sec. 5: preconditioning, log-normal sigma, loss weight
lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2) on any local dataset, with EMA (half-life in
images, ramped up as in EDM), atomic checkpoints, automatic resume and a safetensors export of the EMA weights.
objective="flow" trains the same U-Net as a rectified-flow velocity network instead (`teachers.flow.flow_loss`,
logit-normal t), exported as kind "flow-unet" and loaded by `flow:PATH.safetensors`.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

import torch

from . import dist, optim, trainer_state
from .config import opt
from .data import load_dataset
from .methods.denoising import OBJECTIVES, edm_loss
from .networks.unet import UNET_PRESETS, build_unet
from .teachers.edm import load_edm_teacher as load_teacher  # re-export: moved to teachers/edm.py
from .teachers.flow import FlowUNet

DEVICES = ("cpu", "cuda", "auto")


@dataclass(frozen=True)
class TeacherConfig:
    data: str = opt("mnist:data/mnist", "dataset spec KIND:PATH (see dibregman.data.load_dataset)")
    unet: str = opt("mnist", "U-Net preset name")
    unet_overrides: dict = field(default_factory=dict, metadata={"help": "per-field overrides of the U-Net preset"})
    conditional: bool = opt(False, "train with class labels (label_dim = number of classes)")
    objective: str = opt("edm", "edm (EDM denoising loss) | flow (rectified flow: velocity loss, teachers/flow.py)")
    batch_size: int = opt(128, "images per step")
    lr: float = opt(2e-3, "peak Adam learning rate")
    lr_warmup_kimg: float = opt(10.0, "linear warm-up length, thousands of images")
    lr_final_ratio: float = opt(0.05, "cosine decay to lr * ratio at total_kimg")
    total_kimg: float = opt(1000.0, "training length, thousands of images")
    ema_halflife_kimg: float = opt(50.0, "EMA half-life, thousands of images")
    ema_rampup_ratio: float = opt(0.05, "EMA half-life <= this ratio * images seen (EDM)")
    p_mean: float = opt(-1.2, "ln(sigma) mean of the training noise")
    p_std: float = opt(1.2, "ln(sigma) std of the training noise")
    grad_clip: float = opt(1.0, "global gradient-norm clip (0 = off)")
    ckpt_every_kimg: float = opt(50.0, "checkpoint period, thousands of images")
    keep_ckpts: int = opt(2, "checkpoints kept on disk (>= 1)")
    export: str = opt("", "also write EMA weights to this .safetensors path at every checkpoint")
    seed: int = opt(0, "RNG seed")
    threads: int = opt(0, "torch CPU threads (0 = torch default)")
    device: str = opt("cpu", "where to train: cpu | cuda | auto (cuda when available); the export is on the CPU")
    parallel: str = opt("auto", "under torchrun: auto (ddp) | ddp | fsdp (parallel.py); none for one process")
    max_bad_steps: int = opt(20, "abort after this many consecutive NaN/Inf steps (each one is skipped and counted)")
    flow_t_mean: float = opt(0.0, 'objective="flow": logit(t) mean of the training times (SD3\'s logit-normal)')
    flow_t_std: float = opt(1.0, 'objective="flow": logit(t) std of the training times')


# Named starting points of `dibregman train-teacher --preset NAME` (then --data / --set key=value on top).
TEACHER_PRESETS: dict[str, TeacherConfig] = {
    # The shipped MNIST teacher's recipe (assets/mnist_teacher.json): full MNIST (make data), 28x28 EDM U-Net.
    "mnist": TeacherConfig(),
    # scikit-learn's 8x8 digits (no fetch) on the tiny U-Net: a seconds-long smoke run, not a usable teacher.
    "digits": TeacherConfig(
        data="digits:",
        unet="tiny",
        batch_size=32,
        total_kimg=2.0,
        lr_warmup_kimg=0.2,
        ema_halflife_kimg=0.5,
        ckpt_every_kimg=1.0,
    ),  # fmt: skip
    # A native MNIST rectified-flow teacher (velocity loss, SD3's logit-normal t): the 24-channel U-Net of
    # bench/tuning/teacher_v2.md (0.71 M parameters, a 2.8 MB export); run and measure it: bench/tuning/flow_teacher.md.
    "mnist-flow": TeacherConfig(
        objective="flow",
        unet_overrides={"model_channels": 24},
        lr=1.5e-3,
        total_kimg=1500.0,
        ckpt_every_kimg=25.0,
        keep_ckpts=3,
    ),
}


def lr_at(cfg: TeacherConfig, kimg: float) -> float:
    warm = min(1.0, kimg / cfg.lr_warmup_kimg) if cfg.lr_warmup_kimg > 0 else 1.0
    return cfg.lr * warm * optim.cosine_factor(kimg / cfg.total_kimg, cfg.lr_final_ratio)


def validate_teacher(cfg: TeacherConfig) -> TeacherConfig:
    """ValueError naming the field and what is allowed for a TeacherConfig that cannot run; returns it otherwise."""
    for f in fields(cfg):
        value, kind = getattr(cfg, f.name), type(f.default) if f.default is not MISSING else dict
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            continue  # an int where a float is expected is fine
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{f.name}={value!r} must be of type {kind.__name__}")
        if kind is float and not math.isfinite(value):
            raise ValueError(f"{f.name}={value!r} must be a finite number")
    positive = ("batch_size", "lr", "total_kimg", "p_std", "ckpt_every_kimg", "max_bad_steps", "flow_t_std",
                "keep_ckpts")  # fmt: skip
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise ValueError(f"{name}={getattr(cfg, name)!r} must be > 0")
    non_negative = ("lr_warmup_kimg", "ema_halflife_kimg", "ema_rampup_ratio", "grad_clip", "threads")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name}={getattr(cfg, name)!r} must be >= 0")
    if not 0 <= cfg.lr_final_ratio <= 1:
        raise ValueError(f"lr_final_ratio={cfg.lr_final_ratio!r} must lie in [0, 1]")
    if int(cfg.ckpt_every_kimg * 1000) < 1:
        raise ValueError(f"ckpt_every_kimg={cfg.ckpt_every_kimg!r} must be at least 0.001 (one image)")
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective={cfg.objective!r} is not valid; choose one of {list(OBJECTIVES)}")
    if cfg.unet not in UNET_PRESETS:
        raise ValueError(f"unet={cfg.unet!r} is not a U-Net preset; valid: {sorted(UNET_PRESETS)}")
    if cfg.device not in DEVICES:
        raise ValueError(f"device={cfg.device!r} is not valid; choose one of {list(DEVICES)}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available on this machine")
    return cfg


def teacher_device(cfg: TeacherConfig) -> torch.device:
    """The device of `cfg.device` ("auto": CUDA when available)."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def teacher_config(preset: str = "mnist", **options) -> TeacherConfig:
    """TeacherConfig: the named preset (`TEACHER_PRESETS`) with `field=value` options on top (strings from the
    command line converted), validated; ValueError naming an unknown preset or option."""
    if preset not in TEACHER_PRESETS:
        raise ValueError(f"unknown teacher preset {preset!r}; valid: {sorted(TEACHER_PRESETS)}")
    valid = {f.name: f for f in fields(TeacherConfig)}
    bad = sorted(set(options) - set(valid))
    if bad:
        raise ValueError(f"unknown teacher option(s) {bad}; valid: {sorted(valid)}")
    out = {}
    for name, value in options.items():
        default = valid[name].default
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif type(default) is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif isinstance(default, bool) and isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        out[name] = value
    return validate_teacher(replace(TEACHER_PRESETS[preset], **out))


def train_teacher(cfg: TeacherConfig, run_dir: str | Path) -> Path:
    """Train (or resume) a teacher in `run_dir`; returns the path of the exported EMA safetensors.

    The `methods.denoising.Denoising` method run by the engine: it holds the folder's lock; SIGINT/SIGTERM finish
    the step, checkpoint and raise `runguard.RunInterrupted`; a NaN/Inf loss, gradient or weight skips the step
    (counted; `max_bad_steps` in a row raise TooManyBadSteps)."""
    from .engine import Engine
    from .methods.denoising import Denoising

    cfg = validate_teacher(cfg)
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run folder {run_dir} is a file; give a folder")
    trainer_state.check_folder(run_dir, "teacher")  # before the data is loaded or a file written
    device = dist.init(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    images, labels = load_dataset(cfg.data)
    overrides = dict(cfg.unet_overrides)
    overrides.update(img_channels=images.shape[1], img_resolution=images.shape[-1])
    if cfg.conditional:
        if labels is None:
            raise ValueError(f"conditional=True but dataset {cfg.data!r} has no labels")
        overrides["label_dim"] = int(labels.max()) + 1
    net = build_unet(cfg.unet, **overrides)
    if cfg.objective == "flow":
        net = FlowUNet(net.cfg, model=net.model)  # the same network, read as a velocity v(x_t, t)
    engine = Engine(Denoising(cfg, net.to(device), images, labels, device), run_dir)
    engine.train()
    return run_dir / "teacher-ema.safetensors"


__all__ = ["TeacherConfig", "teacher_config", "validate_teacher", "train_teacher", "load_teacher", "edm_loss"]
