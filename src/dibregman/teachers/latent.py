"""Pieces shared by the latent-space teachers (`sd`, `sd3`, `flux`, `dit`): the VAE, frozen parts held by
reference, text-condition handling, and the discriminator's feature tap at one block.

- Latent space (Rombach et al. 2022): the denoiser sees z = (vae_latent - shift_factor) * scaling_factor, the
  VAE maps images in [-1, 1] to it and back (`LatentVAE`).
- Frozen parts (VAE, text encoders) are held by `Shared`: no submodule, so copies of a trainable network never
  copy them and state dicts never hold them.
- Conditions: `split_text_condition` reads what a text teacher accepts (embeddings, {"cond", "uncond"}, prompts,
  None); `PromptEmbeds` bundles a transformer's two text inputs (token sequence + pooled vector).
- Feature tap: `block_at_depth(blocks, depth)` picks the block at a fraction of the depth (FastGen taps 50, 75 and
  99 %), `run_to_block` runs a network only up to that block's output, `tokens_to_map` reshapes image tokens
  [N, h w, D] to the [N, D, h, w] map a discriminator head pools.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


class Shared:
    """Holds a frozen module by reference: no submodule (no parameters, no state dict); deepcopy keeps it."""

    def __init__(self, obj):
        self.obj = obj

    def __deepcopy__(self, memo):
        return self


class LatentVAE:
    """Mixin: `decode` / `encode` between images in [-1, 1] and the teacher's scaled latents; needs `self.vae`
    (diffusers AutoencoderKL) and `init_vae(vae)` called once."""

    def init_vae(self, vae: nn.Module, channels: int) -> None:
        """Read the VAE's scaling; `channels` is what the network takes (it must be the VAE's latent channels)."""
        if channels != vae.config.latent_channels:
            raise ValueError(f"the network takes {channels} latent channels, the VAE has {vae.config.latent_channels}")
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)  # image side / latent side

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Images [N, 3, H, W] in [-1, 1] (clamped unless clamp=False) from scaled latents [N, C, h, w]."""
        z = latents / self.scaling_factor + self.shift_factor
        images = self.vae.decode(z.to(self.vae.dtype)).sample.float()
        return images.clamp(-1, 1) if clamp else images

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents [N, C, h, w] of images in [-1, 1]: posterior mean, or a sample given a generator."""
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        z = dist.mode() if generator is None else dist.sample(generator)
        return ((z.float() - self.shift_factor) * self.scaling_factor).float()


def split_text_condition(cond, encode: Callable, uncond: Callable):
    """(cond, uncond) embeddings of what a text teacher accepts: an embedding, {"cond": c, "uncond": u}, prompts
    (a str or a list of str, encoded by `encode`) or None (the unconditional model: cond = uncond). `uncond()` gives
    the empty prompt's embedding when none is given."""
    u = None
    if isinstance(cond, dict):
        unknown = set(cond) - {"cond", "uncond"}
        if unknown or "cond" not in cond:
            raise ValueError(f"cond dict needs key 'cond' and optionally 'uncond', got {sorted(cond)}")
        cond, u = cond["cond"], cond.get("uncond")
    if isinstance(cond, str) or (isinstance(cond, list | tuple) and cond and isinstance(cond[0], str)):
        cond = encode(list(cond) if not isinstance(cond, str) else [cond])
    u = uncond() if u is None else u
    return (u if cond is None else cond), u


@dataclass(frozen=True)
class PromptEmbeds:
    """A transformer's text inputs for N prompts: token embeddings and one pooled vector per prompt."""

    seq: torch.Tensor  # [N, L, D] token embeddings (encoder_hidden_states)
    pooled: torch.Tensor  # [N, P] pooled embedding (pooled_projections)

    def __len__(self) -> int:
        return self.seq.shape[0]

    def __getitem__(self, index) -> PromptEmbeds:
        return PromptEmbeds(self.seq[index], self.pooled[index])

    def to(self, *args, **kwargs) -> PromptEmbeds:
        return PromptEmbeds(self.seq.to(*args, **kwargs), self.pooled.to(*args, **kwargs))

    def expand(self, n: int) -> PromptEmbeds:
        """n rows: a single prompt broadcast, or n given ones (ValueError otherwise)."""
        if len(self) not in (1, n):
            raise ValueError(f"{len(self)} prompt embeddings for a batch of {n}")
        return PromptEmbeds(self.seq.expand(n, -1, -1), self.pooled.expand(n, -1))

    @staticmethod
    def cat(parts: Sequence[PromptEmbeds]) -> PromptEmbeds:
        return PromptEmbeds(torch.cat([p.seq for p in parts]), torch.cat([p.pooled for p in parts]))


# ---- the discriminator's feature tap ------------------------------------------------------------------------
class _Stop(Exception):
    def __init__(self, output):
        super().__init__()
        self.output = output


def block_at_depth(blocks: Sequence[nn.Module], depth: float) -> nn.Module:
    """The block whose output lies at fraction `depth` of the stack: block ceil(depth * L) of L (1-based), so
    0.5 of 24 blocks is the 12th, 1.0 the last; a depth in (0, 1] always names a block."""
    if not 0 < depth <= 1:
        raise ValueError(f"feature depth must lie in (0, 1], got {depth}")
    return blocks[min(len(blocks), max(1, math.ceil(depth * len(blocks) - 1e-9))) - 1]


def run_to_block(block: nn.Module, run: Callable[[], object]):
    """The output of `block` during `run()`, which stops there: the layers after it are never evaluated."""

    def stop(module, args, out):
        raise _Stop(out)

    handle = block.register_forward_hook(stop)
    try:
        run()
    except _Stop as e:
        return e.output
    finally:
        handle.remove()
    raise AssertionError(f"the network finished without running {type(block).__name__}")


def tokens_to_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Image tokens [N, height * width, D] in row-major order -> feature map [N, D, height, width]."""
    n, seq, dim = tokens.shape
    assert seq == height * width, (tokens.shape, height, width)
    return tokens.transpose(1, 2).reshape(n, dim, height, width)


def image_tokens(out) -> torch.Tensor:
    """The image tokens of a transformer block's output: the tensor itself, or the second of an MMDiT block's
    (text tokens, image tokens) pair."""
    return out[1] if isinstance(out, tuple) else out


# ---- diffusers folders ------------------------------------------------------------------------------------
FAMILY_OF_CLASS = {  # the network class of a diffusers folder -> the teacher spec that loads it
    "UNet2DConditionModel": "sd",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "DiTTransformer2DModel": "dit",
    "Transformer2DModel": "dit",
    "UNet2DModel": "diffusers",
}


def class_name(folder: Path) -> str | None:
    """`_class_name` of a diffusers model folder's config.json (None when there is none)."""
    config = folder / "config.json"
    return json.loads(config.read_text()).get("_class_name") if config.is_file() else None


def _hint(root: Path, kind: str) -> str:
    for sub in ("transformer", "unet", "."):
        other = FAMILY_OF_CLASS.get(class_name(root / sub) or "")
        if other and other != kind:
            return f" (it looks like a {other}:DIR folder)"
    return ""


def check_pipeline_folder(root, kind: str, subfolders: Sequence[str], network: str, classes: Sequence[str]) -> Path:
    """`root` as a Path if it is a diffusers pipeline folder for a `kind:` teacher: every subfolder present and the
    network subfolder holding one of `classes`; else a one-line FileNotFoundError / ValueError saying what was
    expected (and which spec the folder looks like, if another)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{kind}: folder not found: {root}")
    missing = [name for name in subfolders if not (root / name).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{root} lacks subfolder(s) {missing}; a {kind}: teacher needs all of {list(subfolders)}{_hint(root, kind)}"
        )
    found = class_name(root / network)
    if found not in classes:
        raise ValueError(
            f"{root / network} holds a {found or 'folder without config.json'}; a {kind}: teacher needs "
            f"{' or '.join(classes)}{_hint(root, kind)}"
        )
    return root


__all__ = [
    "FAMILY_OF_CLASS",
    "check_pipeline_folder",
    "class_name",
    "Shared",
    "LatentVAE",
    "split_text_condition",
    "PromptEmbeds",
    "block_at_depth",
    "run_to_block",
    "tokens_to_map",
    "image_tokens",
]
