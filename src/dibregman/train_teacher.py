"""Train a native EDM teacher (Karras et al. 2022, Sec. 5: preconditioning, log-normal sigma, loss weight
lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2) on any local dataset, with EMA (half-life in
images, ramped up as in EDM), atomic checkpoints, automatic resume and a safetensors export of the EMA weights.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import optim
from .data import load_dataset
from .networks.unet import build_unet
from .noise import edm_training_sigma
from .teachers.edm import load_edm_teacher as load_teacher  # re-export: moved to teachers/edm.py


@dataclass(frozen=True)
class TeacherConfig:
    data: str = "mnist:data/mnist"  # dataset spec KIND:PATH (see dibregman.data.load_dataset)
    unet: str = "mnist"  # U-Net preset name
    unet_overrides: dict = field(default_factory=dict)  # per-field overrides of the U-Net preset
    conditional: bool = False  # train with class labels (label_dim = number of classes)
    batch_size: int = 128  # images per step
    lr: float = 2e-3  # peak Adam learning rate
    lr_warmup_kimg: float = 10.0  # linear warm-up length, thousands of images
    lr_final_ratio: float = 0.05  # cosine decay to lr * ratio at total_kimg
    total_kimg: float = 1000.0  # training length, thousands of images
    ema_halflife_kimg: float = 50.0  # EMA half-life, thousands of images
    ema_rampup_ratio: float = 0.05  # EMA half-life <= this ratio * images seen (EDM)
    p_mean: float = -1.2  # ln(sigma) mean of the training noise
    p_std: float = 1.2  # ln(sigma) std of the training noise
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)
    ckpt_every_kimg: float = 50.0  # checkpoint period, thousands of images
    keep_ckpts: int = 2  # checkpoints kept on disk
    export: str = ""  # also write EMA weights to this .safetensors path at every checkpoint
    seed: int = 0  # RNG seed
    threads: int = 0  # torch CPU threads (0 = torch default)


def lr_at(cfg: TeacherConfig, kimg: float) -> float:
    warm = min(1.0, kimg / cfg.lr_warmup_kimg) if cfg.lr_warmup_kimg > 0 else 1.0
    return cfg.lr * warm * optim.cosine_factor(kimg / cfg.total_kimg, cfg.lr_final_ratio)


def edm_loss(net, x0: torch.Tensor, cond, cfg: TeacherConfig, generator=None) -> torch.Tensor:
    """EDM denoising loss: lambda(sigma) * ||D(x0 + sigma n, sigma) - x0||^2, mean over pixels and batch."""
    sigma, weight = edm_training_sigma(x0.shape[0], cfg.p_mean, cfg.p_std, net.sigma_data, device=x0.device)
    s = sigma.view(-1, 1, 1, 1)
    denoised = net(x0 + s * torch.randn_like(x0), sigma, cond)
    return (weight.view(-1, 1, 1, 1) * (denoised - x0).square()).mean()


def train_teacher(cfg: TeacherConfig, run_dir: str | Path) -> Path:
    """Train (or resume) a teacher in `run_dir`; returns the path of the exported EMA safetensors."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
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
    ema = build_unet(net.cfg)
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    num_images, step, data_rng = 0, 0, None
    resolved = {"teacher": asdict(cfg), "unet": net.cfg.to_dict()}
    (run_dir / "config.json").write_text(json.dumps(resolved, indent=2))

    found = ckpt.load_latest(run_dir)
    if found is not None:
        state, path = found
        if state["config"]["unet"] != resolved["unet"]:
            raise ValueError(f"{path} was written for another U-Net config: {state['config']['unet']}")
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        num_images, step = state["num_images"], state["step"]
        torch.set_rng_state(state["rng_cpu"])
        data_rng = state.get("rng_data")  # absent in checkpoints written before exact resume
        print(f"resumed from {path} at {num_images / 1000:.1f} kimg")

    g = torch.Generator().manual_seed(cfg.seed + step)
    if found is not None and data_rng is not None:
        g.set_state(data_rng)
    total = int(cfg.total_kimg * 1000)
    next_ckpt = (num_images // int(cfg.ckpt_every_kimg * 1000) + 1) * int(cfg.ckpt_every_kimg * 1000)
    log = open(run_dir / "log.jsonl", "a")
    from tqdm import tqdm

    bar = tqdm(total=total, initial=num_images, unit="img", unit_scale=True, desc="teacher", smoothing=0.05)
    t0, loss_acc, n_acc = time.time(), 0.0, 0
    while num_images < total:
        idx = torch.randint(len(images), (cfg.batch_size,), generator=g)
        x0 = images[idx]
        cond = labels[idx] if cfg.conditional else None
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, num_images / 1000)
        loss = edm_loss(net, x0, cond, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        if torch.isfinite(loss):
            opt.step()
        num_images += cfg.batch_size
        step += 1
        halflife = min(cfg.ema_halflife_kimg * 1000, num_images * cfg.ema_rampup_ratio)
        optim.update_ema(ema, net, optim.ema_beta(cfg.batch_size, halflife))
        loss_acc, n_acc = loss_acc + float(loss.detach()), n_acc + 1
        bar.update(cfg.batch_size)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss_acc / n_acc:.4f}")
            rec = {
                "kimg": num_images / 1000,
                "loss": loss_acc / n_acc,
                "lr": lr_at(cfg, num_images / 1000),
                "sec": time.time() - t0,
            }
            log.write(json.dumps(rec) + "\n")
            log.flush()
            loss_acc, n_acc = 0.0, 0
        if num_images >= next_ckpt or num_images >= total:
            _save(run_dir, cfg, resolved, net, ema, opt, num_images, step, g)
            next_ckpt += int(cfg.ckpt_every_kimg * 1000)
    bar.close()
    log.close()
    return _export(run_dir, cfg, resolved, ema, num_images)


def _export(run_dir: Path, cfg: TeacherConfig, resolved: dict, ema, num_images: int) -> Path:
    meta = {
        "kind": "edm-unet",
        "unet": ema.cfg.to_dict(),
        "num_images": num_images,
        "teacher_config": resolved,
    }
    out = ckpt.export_safetensors(ema.state_dict(), meta, run_dir / "teacher-ema")
    if cfg.export:
        ckpt.export_safetensors(ema.state_dict(), meta, cfg.export)
    return out


def _save(run_dir, cfg, resolved, net, ema, opt, num_images, step, data_rng) -> None:
    state = {
        "net": net.state_dict(),
        "ema": ema.state_dict(),
        "opt": opt.state_dict(),
        "config": resolved,
        "num_images": num_images,
        "step": step,
        "rng_cpu": torch.get_rng_state(),
        "rng_data": data_rng.get_state(),
    }
    ckpt.save_atomic(state, ckpt.checkpoint_path(run_dir, num_images))
    ckpt.prune(run_dir, cfg.keep_ckpts)
    _export(run_dir, cfg, resolved, ema, num_images)


__all__ = ["TeacherConfig", "train_teacher", "load_teacher", "edm_loss"]
