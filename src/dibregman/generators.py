"""Exported one-step generators: metadata to rebuild the network, and loading for `dibregman sample`/`eval`.

An export is `generator.safetensors` (EMA weights of `OneStepGenerator`) + `generator.json` (how to rebuild
it); text-to-image runs write a diffusers folder instead (`t2i.py`).
Loading never executes code from a file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint as ckpt
from .networks.generator import OneStepGenerator
from .networks.mlp import MLPConfig, MLPDenoiser
from .networks.unet import EDMDenoiser, UNetConfig, build_unet


def generator_meta(gen: OneStepGenerator, cfg, num_images: int) -> dict:
    net = gen.denoiser
    if isinstance(net, EDMDenoiser):
        network = {"type": "edm-unet", "config": net.cfg.to_dict()}
    elif isinstance(net, MLPDenoiser):
        network = {"type": "mlp", "config": net.cfg.to_dict()}
    else:  # foreign teachers (diffusers ...): rebuilt from the teacher spec, then the weights are loaded
        network = {"type": "teacher-copy", "teacher": cfg.model.teacher}
    return {
        "kind": "dibregman-one-step-generator",
        "sigma_init": gen.sigma_init,
        "network": network,
        "shape": list(getattr(net, "shape", ())),
        "num_images": num_images,
        "distill_config": cfg.to_dict(),
    }


def load_generator(path: str | Path, device="cpu") -> tuple[OneStepGenerator, dict]:
    """Rebuild an exported generator (a run folder or its `generator.safetensors`); returns (generator, metadata).

    Text-to-image runs export a diffusers folder (`<run_dir>/diffusers`, see `t2i.export_diffusers`) instead.
    """
    path = Path(path)
    if path.is_dir():
        from .t2i import find_export, load_t2i_generator

        folder = find_export(path)
        if folder is not None:
            return load_t2i_generator(folder, device)
        path = path / "generator.safetensors"
    if not path.exists():
        raise FileNotFoundError(
            f"no generator export at {path} (a finished run writes <run_dir>/generator.safetensors)"
        )
    state, meta = ckpt.load_safetensors(path)
    if meta.get("kind") != "dibregman-one-step-generator":
        raise ValueError(f"{path} is not a dibregman generator export (kind={meta.get('kind')!r})")
    net_meta = meta.get("network") or {}
    if net_meta.get("type") not in ("edm-unet", "mlp", "teacher-copy") or "sigma_init" not in meta:
        raise ValueError(f"{path}: its JSON lacks a valid network description (type edm-unet | mlp | teacher-copy)")
    if net_meta["type"] == "edm-unet":
        net = build_unet(UNetConfig.from_dict(net_meta["config"]))
    elif net_meta["type"] == "mlp":
        net = MLPDenoiser(MLPConfig(**net_meta["config"]))
    else:
        from .build import resolve_path
        from .teachers import load_teacher

        net = load_teacher(resolve_path(net_meta["teacher"]))
    gen = OneStepGenerator(net, meta["sigma_init"])
    problem = ckpt.describe_mismatch(state, gen.state_dict())
    if problem:
        raise ValueError(f"{path} and its JSON do not belong together ({problem})")
    gen.load_state_dict(state)
    return gen.to(device).eval().requires_grad_(False), meta


@torch.no_grad()
@torch.no_grad()
def generate(gen: OneStepGenerator, n: int, *, seed: int = 0, batch_size: int = 256, cond=None, device="cpu"):
    """n one-step samples G(z), z ~ N(0, I), deterministic in `seed`; [n, *shape] on CPU."""
    shape = tuple(gen.denoiser.shape)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, n, batch_size):
        m = min(batch_size, n - i)
        z = torch.randn((m, *shape), generator=g).to(device)
        c = None if cond is None else cond[i : i + m].to(device)
        out.append(gen(z, c).float().cpu())
    return torch.cat(out)
