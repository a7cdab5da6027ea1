"""Adapter: a class-conditional DiT (Peebles & Xie 2023) as an EDM denoiser: `dit:FOLDER`.

diffusers' DiT (`DiTTransformer2DModel`; facebook/DiT-XL-2-* are published as `Transformer2DModel` with
norm_type "ada_norm_zero", which diffusers remaps to it) is a DDPM model, not a flow: epsilon prediction on a
discrete VP schedule (linear betas, 1000 steps, `DiTPipeline`'s DDIM scheduler) in the VAE's latent space
z = scaling_factor * latent, with learned variance (out_channels = 2 C: the second half is split off). It goes
through `diffusers.DiscreteVPDenoiser`: sigma_t = sqrt((1 - abar_t) / abar_t), x_vp = x / sqrt(1 + sigma^2),
fractional timesteps between grid points, x0 = x - sigma eps.
cond: class labels [N] int64 (a [1] label broadcasts); None is the null class `num_classes` (the unconditional
model). Classifier-free guidance with scale w against the null class, in one batched pass over [labels, null]
as `DiTPipeline` does (it guides the epsilon half; the variance half is dropped anyway).
Distillation uses the native recipe (`build.native_models`) with labels as conditions (`num_classes`): G and psi
are copies of this module made before guidance is set (w = 1, conditional), so only the teacher is guided; the
VAE is held by reference (never copied, never in a state dict) and follows the module's device. Discriminator
features: the image tokens after the block at `feature_depth` of the stack (`latent.block_at_depth`).
Flow-trained DiTs (SiT, Ma et al. 2024: reversed time, velocity x0 - eps) have no diffusers class; wrap such a
network in `flow.FlowDenoiser(reverse=True)` behind `python:MODULE:FUNCTION`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .diffusers import DiscreteVPDenoiser
from .latent import LatentVAE, Shared, block_at_depth, check_pipeline_folder, image_tokens, run_to_block, tokens_to_map

SUBFOLDERS = ("transformer", "vae", "scheduler")
CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")


class DiTTeacher(LatentVAE, DiscreteVPDenoiser):
    """`D(x, sigma, labels=None) -> z0_hat` of a class-conditional DiT in its latent space, with guidance."""

    def __init__(
        self,
        transformer: nn.Module,  # diffusers DiTTransformer2DModel (class-conditional, ada_norm_zero)
        vae: nn.Module,  # diffusers AutoencoderKL (shared by reference)
        scheduler_or_alphas_cumprod,  # DDPM/DDIM scheduler or abar_t [T]
        prediction_type: str | None = None,  # None: the scheduler's (DiT: epsilon)
        *,
        guidance_scale: float = 1.0,  # classifier-free guidance w against the null class; 1 = none
        sigma_data: float = 1.0,  # std of the scaled latents
        snap_tol: float = 1e-3,  # snap timesteps this close to an integer onto it
        feature_depth: float = 0.5,  # discriminator features: the image tokens after this fraction of the blocks
    ):
        super().__init__(scheduler_or_alphas_cumprod, prediction_type, sigma_data, snap_tol)
        c = transformer.config
        if not c.num_embeds_ada_norm or c.norm_type != "ada_norm_zero":
            classes = c.num_embeds_ada_norm
            raise ValueError(f"not a class-conditional DiT (norm_type={c.norm_type!r}, num_embeds_ada_norm={classes})")
        self.transformer = transformer.eval().requires_grad_(False)
        self._vae = Shared(vae.eval().requires_grad_(False))
        self.init_vae(vae, c.in_channels)
        self.num_classes = int(c.num_embeds_ada_norm)  # labels 0..K-1; K is the null class
        self.shape = (int(c.in_channels), int(c.sample_size), int(c.sample_size))
        self.feature_channels = int(c.num_attention_heads * c.attention_head_dim)
        self.guidance_scale = float(guidance_scale)
        self.feature_depth = float(feature_depth)
        block_at_depth(self.transformer.transformer_blocks, self.feature_depth)  # a bad depth fails here

    @property
    def network(self) -> nn.Module:
        return self.transformer

    @property
    def vae(self) -> nn.Module:
        return self._vae.obj

    def _apply(self, fn, recurse=True):  # .to(device) / .float() move the shared VAE along
        self.vae._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def labels(self, cond, n: int, device) -> torch.Tensor:
        """Class labels [n] int64 on device: the given ones (one broadcasts), or the null class for None."""
        if cond is None:
            return torch.full((n,), self.num_classes, dtype=torch.long, device=device)
        y = torch.as_tensor(cond, device=device).long().reshape(-1)
        if y.numel() not in (1, n) or bool(((y < 0) | (y >= self.num_classes)).any()):
            raise ValueError(f"cond must be {n} class labels in [0, {self.num_classes}), got {y.tolist()[:8]}")
        return y.expand(n)

    def _inputs(self, x, sigma, cond):
        x_vp, t, s = self.model_input(x, sigma)
        return x_vp.to(self.transformer.dtype), t, s, self.labels(cond, x.shape[0], x.device)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond=None) -> torch.Tensor:
        x_vp, t, s, y = self._inputs(x, sigma, cond)
        w = self.guidance_scale
        if cond is None or w == 1.0:
            out = self.transformer(x_vp, timestep=t, class_labels=y).sample
        else:  # one batched pass over [labels, null], as DiTPipeline
            null = torch.full_like(y, self.num_classes)
            out = self.transformer(torch.cat([x_vp, x_vp]), timestep=t.repeat(2), class_labels=torch.cat([y, null]))
            out_c, out_u = out.sample.float().chunk(2)
            out = out_u + w * (out_c - out_u)
        return self.to_x0(out, x, s)  # the epsilon half of a learned-variance output

    def features(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        """The image tokens after the block at `feature_depth`, [N, D, h / p, w / p]; unguided."""
        x_vp, t, _, y = self._inputs(x, sigma, cond)
        block = block_at_depth(self.transformer.transformer_blocks, self.feature_depth)
        out = run_to_block(block, lambda: self.transformer(x_vp, timestep=t, class_labels=y))
        p = self.transformer.config.patch_size
        return tokens_to_map(image_tokens(out), self.shape[1] // p, self.shape[2] // p)

    @classmethod
    def from_folder(
        cls,
        path: str | os.PathLike,
        *,
        torch_dtype: torch.dtype = torch.float32,
        **kwargs,  # prediction_type, guidance_scale, sigma_data, snap_tol, feature_depth
    ) -> DiTTeacher:
        """Load the diffusers DiT layout (transformer/, vae/, scheduler/), offline."""
        from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

        root = check_pipeline_folder(path, "dit", SUBFOLDERS, "transformer", CLASSES)
        kw = dict(local_files_only=True)
        return cls(
            DiTTransformer2DModel.from_pretrained(root, subfolder="transformer", torch_dtype=torch_dtype, **kw),
            AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=torch_dtype, **kw),
            DDPMScheduler.from_pretrained(root, subfolder="scheduler", **kw),
            **kwargs,
        )


__all__ = ["DiTTeacher", "SUBFOLDERS"]
