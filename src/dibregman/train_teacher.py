"""Train a native EDM teacher (Karras et al. 2022, Sec. 5: preconditioning, log-normal sigma, loss weight
lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2) on any local dataset, with EMA (half-life in
images, ramped up as in EDM), atomic checkpoints, automatic resume and a safetensors export of the EMA weights.
objective="flow" trains the same U-Net as a rectified-flow velocity network instead (`teachers.flow.flow_loss`,
logit-normal t), exported as kind "flow-unet" and loaded by `flow:PATH.safetensors`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import optim, runguard
from .config import opt
from .data import load_dataset
from .networks.unet import UNET_PRESETS, build_unet
from .noise import edm_training_sigma
from .teachers.edm import load_edm_teacher as load_teacher  # re-export: moved to teachers/edm.py
from .teachers.flow import FlowUNet, flow_loss

OBJECTIVES = {"edm": "edm-unet", "flow": "flow-unet"}  # training objective -> the export's kind
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


def edm_loss(net, x0: torch.Tensor, cond, cfg: TeacherConfig, generator=None) -> torch.Tensor:
    """EDM denoising loss: lambda(sigma) * ||D(x0 + sigma n, sigma) - x0||^2, mean over pixels and batch."""
    sigma, weight = edm_training_sigma(x0.shape[0], cfg.p_mean, cfg.p_std, net.sigma_data, device=x0.device)
    s = sigma.view(-1, 1, 1, 1)
    denoised = net(x0 + s * torch.randn_like(x0), sigma, cond)
    return (weight.view(-1, 1, 1, 1) * (denoised - x0).square()).mean()


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

    Holds the folder's lock; SIGINT/SIGTERM finish the step, checkpoint and raise `runguard.RunInterrupted`; a
    NaN/Inf loss, gradient or weight skips the step (counted; `max_bad_steps` in a row raise TooManyBadSteps)."""
    cfg = validate_teacher(cfg)
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run folder {run_dir} is a file; give a folder")
    runguard.RunLock(run_dir).probe()  # every refusal before the data is loaded or a file written
    runguard.check_writable(run_dir)
    previous = _previous_run(run_dir)
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
    _refuse_other_teacher(previous, net.cfg.to_dict(), cfg, run_dir)
    if cfg.objective == "flow":
        net = FlowUNet(net.cfg, model=net.model)  # the same network, read as a velocity v(x_t, t)
    net = net.to(teacher_device(cfg))
    run_dir.mkdir(parents=True, exist_ok=True)
    with runguard.RunLock(run_dir), runguard.StopSignals() as stop:
        runguard.clean_stale_tmp(run_dir)
        return _train(cfg, run_dir, net, images, labels, stop)


def _previous_run(run_dir: Path) -> dict | None:
    """The config of the teacher run in `run_dir` (its newest readable checkpoint's; None if there is none);
    ValueError for another kind of run's folder (a distillation's config.json or checkpoint)."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):  # none, or unreadable: rewritten on start
        config = None
    if isinstance(config, dict) and "teacher" not in config:
        kind = " (a distill run's)" if "model" in config else ""
        raise ValueError(
            f"{run_dir} is not a train-teacher run folder: its config.json{kind} has no 'teacher' section; "
            "give train-teacher a run folder of its own"
        )
    for path in reversed(ckpt.list_checkpoints(run_dir)):
        state = ckpt.peek(path)  # unverified: only its kind and config are read here
        if isinstance(state, dict):
            if "net" not in state:
                by = " (distill wrote it)" if "generator" in state else ""
                raise ValueError(f"{path} is not a teacher checkpoint{by}; give train-teacher a run folder of its own")
            return state.get("config")
    return None


def _refuse_other_teacher(previous: dict | None, unet: dict, cfg: TeacherConfig, run_dir: Path) -> None:
    """ValueError, before config.json is rewritten, if run_dir's checkpoints hold another U-Net or objective."""
    if not previous:
        return
    if previous.get("unet") != unet:
        raise ValueError(f"{run_dir} holds a teacher of another U-Net config: {previous.get('unet')}")
    objective = previous.get("teacher", {}).get("objective", "edm")  # absent before flow teachers
    if objective != cfg.objective:
        raise ValueError(
            f"{run_dir} holds a teacher trained with objective={objective!r}; resume it with that objective"
        )


def _resume(run_dir: Path, resolved: dict, net, ema, opt) -> tuple[dict, dict | None]:
    """Counters {num_images, step, bad_steps, bad_in_row} and the data sampler state from the newest good checkpoint."""
    counters = dict(num_images=0, step=0, bad_steps=0, bad_in_row=0)
    found = ckpt.load_latest(
        run_dir, check=lambda st: None if ckpt.all_finite(st["net"], st["ema"]) else "has non-finite weights"
    )
    if found is None:
        return counters, None
    state, path = found
    if state["config"]["unet"] != resolved["unet"]:
        raise ValueError(f"{path} was written for another U-Net config: {state['config']['unet']}")
    objective = state["config"]["teacher"].get("objective", "edm")  # absent in checkpoints before flow teachers
    if objective != resolved["teacher"]["objective"]:
        raise ValueError(f"{path} was trained with objective={objective!r}; resume it with that objective")
    net.load_state_dict(state["net"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["opt"])
    counters.update({k: state.get(k, 0) for k in counters})  # bad_* absent in checkpoints before they were kept
    torch.set_rng_state(state["rng_cpu"])
    device = _device(ema)
    if "rng_cuda" in state and device.type == "cuda":  # edm_loss draws its noise on the GPU: exact resume there too
        torch.cuda.set_rng_state(state["rng_cuda"], device)
    print(f"resumed from {path} at {counters['num_images'] / 1000:.1f} kimg")
    return counters, state.get("rng_data")  # rng_data absent in checkpoints written before exact resume


def _train(cfg: TeacherConfig, run_dir: Path, net, images, labels, stop) -> Path:
    device = _device(net)
    ema = type(net)(net.cfg).to(device)  # EDMDenoiser or FlowUNet
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    resolved = {"teacher": asdict(cfg), "unet": net.cfg.to_dict()}
    (run_dir / "config.json").write_text(json.dumps(resolved, indent=2))
    c, data_rng = _resume(run_dir, resolved, net, ema, opt)
    g = torch.Generator().manual_seed(cfg.seed + c["step"])
    if data_rng is not None:
        g.set_state(data_rng)
    runguard.truncate_log(run_dir / "log.jsonl", c["num_images"])
    total, every = int(cfg.total_kimg * 1000), int(cfg.ckpt_every_kimg * 1000)
    next_ckpt = (c["num_images"] // every + 1) * every
    from tqdm import tqdm

    bar = tqdm(total=total, initial=c["num_images"], unit="img", unit_scale=True, desc="teacher", smoothing=0.05)
    t0, loss_acc, n_acc = time.time(), 0.0, 0
    save = partial(_save, run_dir, cfg, resolved, net, ema, opt)
    with open(run_dir / "log.jsonl", "a") as log:
        while c["num_images"] < total:
            idx = torch.randint(len(images), (cfg.batch_size,), generator=g)
            x0, cond = images[idx].to(device), labels[idx].to(device) if cfg.conditional else None
            loss = _step(cfg, net, ema, opt, x0, cond, c)
            if loss is not None:
                loss_acc, n_acc = loss_acc + loss, n_acc + 1
            bar.update(cfg.batch_size)
            if c["step"] % 50 == 0 and n_acc:
                kimg = c["num_images"] / 1000
                rec = {"kimg": kimg, "loss": loss_acc / n_acc, "lr": lr_at(cfg, kimg), "sec": time.time() - t0}
                log.write(json.dumps({**rec, "bad_steps": c["bad_steps"]}) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{loss_acc / n_acc:.4f}")
                loss_acc, n_acc = 0.0, 0
            if c["num_images"] >= next_ckpt or c["num_images"] >= total or stop.requested:
                path = save(c, g)
                next_ckpt += every * (c["num_images"] >= next_ckpt)
                if stop.requested and c["num_images"] < total:
                    bar.close()
                    raise runguard.interrupted(stop.signum, f"{c['num_images'] / 1000:g} kimg", path)
    bar.close()
    return _export(run_dir, cfg, resolved, ema, c["num_images"])


def _step(cfg: TeacherConfig, net, ema, opt, x0, cond, c: dict) -> float | None:
    """One Adam step and EMA update; a NaN/Inf loss, gradient or resulting weight skips both (counted in `c`).
    Returns the loss, or None for a skipped step."""
    for group in opt.param_groups:
        group["lr"] = lr_at(cfg, c["num_images"] / 1000)
    if cfg.objective == "flow":
        loss = flow_loss(net, x0, cond, cfg.flow_t_mean, cfg.flow_t_std)
    else:
        loss = edm_loss(net, x0, cond, cfg)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = list(net.parameters())
    ok = bool(torch.isfinite(loss)) and _finite(p.grad for p in params if p.grad is not None)
    if ok:
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        ok = _finite(params)  # a corrupt optimiser state: the weights are not saved (see _save)
    c["num_images"] += cfg.batch_size
    c["step"] += 1
    if not ok:
        opt.zero_grad(set_to_none=True)
        c["bad_steps"] += 1
        c["bad_in_row"] += 1
        print(f"warning: non-finite loss/gradient/weights at step {c['step'] - 1}: skipped ({c['bad_in_row']} in a "
              f"row, {c['bad_steps']} in total)")  # fmt: skip
        if c["bad_in_row"] >= cfg.max_bad_steps:
            raise runguard.TooManyBadSteps(
                f"aborting: {c['bad_in_row']} consecutive non-finite steps (max_bad_steps={cfg.max_bad_steps}); "
                "lower lr or check the data; a resume starts from the newest healthy checkpoint"
            )
        return None
    c["bad_in_row"] = 0
    halflife = min(cfg.ema_halflife_kimg * 1000, c["num_images"] * cfg.ema_rampup_ratio)
    optim.update_ema(ema, net, optim.ema_beta(cfg.batch_size, halflife))
    return float(loss.detach())


def _device(net) -> torch.device:
    return next(net.parameters()).device


def _finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _export(run_dir: Path, cfg: TeacherConfig, resolved: dict, ema, num_images: int) -> Path:
    meta = {
        "kind": OBJECTIVES[cfg.objective],
        "unet": ema.cfg.to_dict(),
        "num_images": num_images,
        "teacher_config": resolved,
    }
    out = ckpt.export_safetensors(ema.state_dict(), meta, run_dir / "teacher-ema")
    if cfg.export:
        ckpt.export_safetensors(ema.state_dict(), meta, cfg.export)
    return out


def _save(run_dir, cfg, resolved, net, ema, opt, c: dict, data_rng) -> Path | None:
    """Checkpoint + export, unless the weights are non-finite (a bad state never replaces a good one)."""
    if not ckpt.all_finite(net.state_dict(), ema.state_dict()):
        print(f"warning: no checkpoint at {c['num_images'] / 1000:g} kimg: the weights are non-finite")
        return None
    state = {
        "net": net.state_dict(),
        "ema": ema.state_dict(),
        "opt": opt.state_dict(),
        "config": resolved,
        "num_images": c["num_images"],
        "step": c["step"],
        "bad_steps": c["bad_steps"],
        "bad_in_row": c["bad_in_row"],
        ckpt.HEALTHY_KEY: c["bad_in_row"] == 0,
        "rng_cpu": torch.get_rng_state(),
        "rng_data": data_rng.get_state(),
        **({"rng_cuda": torch.cuda.get_rng_state(_device(ema))} if _device(ema).type == "cuda" else {}),
    }
    path = ckpt.save_atomic(state, ckpt.checkpoint_path(run_dir, c["num_images"]))
    ckpt.prune(run_dir, cfg.keep_ckpts)
    _export(run_dir, cfg, resolved, ema, c["num_images"])
    return path


__all__ = ["TeacherConfig", "teacher_config", "validate_teacher", "train_teacher", "load_teacher", "edm_loss"]
