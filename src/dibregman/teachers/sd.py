"""Adapter: a Stable-Diffusion-style latent text-to-image model as an EDM denoiser, with CFG.

The denoiser lives in the VAE's latent space: x = z + sigma eps with z = (vae_latent - shift) * scaling_factor
(Rombach et al. 2022), and a discrete VP schedule mapped to EDM sigmas as in `teachers/diffusers.py`.
`cond` is a text embedding c = CLIP(prompt) [N, L, D] ([1, L, D] broadcasts), a dict {"cond": c, "uncond": u}
or a list of prompts; the unconditional embedding u defaults to that of the empty prompt "".
Classifier-free guidance (Ho & Salimans 2022, Eq. 6) with scale w:
    D_w(x, sigma, c) = D(x, sigma, u) + w (D(x, sigma, c) - D(x, sigma, u)),
applied to the network output; x0_hat is affine in the output at fixed (x, sigma) for every prediction type,
so guiding eps, v or x0 is the same thing. w = 1 is the plain conditional model (no unconditional pass).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .diffusers import DiscreteVPDenoiser

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class StableDiffusionTeacher(DiscreteVPDenoiser):
    """`D(x, sigma, cond=None) -> z0_hat` in SD's scaled latent space, with classifier-free guidance."""

    def __init__(
        self,
        unet: nn.Module,  # diffusers UNet2DConditionModel
        vae: nn.Module,  # diffusers AutoencoderKL
        text_encoder: nn.Module,  # transformers CLIPTextModel (output[0] = last hidden state [N, L, D])
        tokenizer,  # CLIPTokenizer; prompts are padded to tokenizer.model_max_length
        scheduler_or_alphas_cumprod,  # DDPM/DDIM/PNDM scheduler or abar_t [T]
        prediction_type: str | None = None,  # "epsilon" | "v_prediction" | "sample"; None: the scheduler's
        *,
        guidance_scale: float = 7.5,  # classifier-free guidance w; 1.0 = none (diffusers' default is 7.5)
        sigma_data: float = 1.0,  # std of the scaled latents (scaling_factor makes them ~unit variance)
        snap_tol: float = 1e-3,  # snap timesteps this close to an integer onto it
    ):
        super().__init__(scheduler_or_alphas_cumprod, prediction_type, sigma_data, snap_tol)
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.guidance_scale = float(guidance_scale)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)  # image side / latent side
        size = unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.shape = (int(unet.config.in_channels), int(h), int(w))
        if unet.config.in_channels != vae.config.latent_channels:
            c_unet, c_vae = unet.config.in_channels, vae.config.latent_channels
            raise ValueError(f"unet in_channels {c_unet} != vae latent_channels {c_vae}")
        self._uncond: torch.Tensor | None = None  # cached empty-prompt embedding [1, L, D]

    # ---- text -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str] | str) -> torch.Tensor:
        """CLIP text embeddings [N, L, D] of prompts padded/truncated to the tokenizer's max length."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(ids.to(device))[0].float()

    def uncond_embedding(self) -> torch.Tensor:
        """The empty prompt's embedding [1, L, D] (computed once, then cached)."""
        if self._uncond is None:
            self._uncond = self.encode_prompts([""])
        return self._uncond

    def embeddings(self, cond, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond [N, L, D], uncond [N, L, D]) from a tensor, a {"cond", "uncond"} dict, prompts or None."""
        uncond = None
        if isinstance(cond, dict):
            unknown = set(cond) - {"cond", "uncond"}
            if unknown or "cond" not in cond:
                raise ValueError(f"cond dict needs key 'cond' and optionally 'uncond', got {sorted(cond)}")
            cond, uncond = cond["cond"], cond.get("uncond")
        if isinstance(cond, str) or (isinstance(cond, (list, tuple)) and cond and isinstance(cond[0], str)):
            cond = self.encode_prompts(cond)
        uncond = self.uncond_embedding() if uncond is None else uncond
        cond = uncond if cond is None else cond
        if not (torch.is_tensor(cond) and cond.ndim == 3):
            raise ValueError(f"cond must be a [N, L, D] text embedding, got {type(cond).__name__}")
        return cond.expand(n, -1, -1), uncond.expand(n, -1, -1)

    # ---- denoiser ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond=None) -> torch.Tensor:
        x_vp, t, s = self.model_input(x, sigma)
        c, u = self.embeddings(cond, x.shape[0])
        dtype, w = self.unet.dtype, self.guidance_scale
        if cond is None or w == 1.0:
            out = self.unet(x_vp.to(dtype), t, encoder_hidden_states=c.to(x.device, dtype)).sample.float()
        else:  # one batched pass over [uncond, cond], as diffusers' pipelines do
            emb = torch.cat([u, c]).to(x.device, dtype)
            out = self.unet(x_vp.repeat(2, 1, 1, 1).to(dtype), t.repeat(2), encoder_hidden_states=emb).sample
            out_u, out_c = out.float().chunk(2)
            out = out_u + w * (out_c - out_u)
        return self.to_x0(out, x, s)

    # ---- VAE ----------------------------------------------------------------------------------------------
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

    @classmethod
    def from_folder(
        cls,
        path: str | os.PathLike,
        *,
        torch_dtype: torch.dtype = torch.float32,
        **kwargs,  # prediction_type, guidance_scale, sigma_data, snap_tol
    ) -> StableDiffusionTeacher:
        """Load the diffusers layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/), offline."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"Stable Diffusion folder not found: {root}")
        missing = [name for name in SUBFOLDERS if not (root / name).is_dir()]
        if missing:
            raise FileNotFoundError(f"{root} lacks subfolder(s) {missing}; expected all of {list(SUBFOLDERS)}")
        kw = dict(local_files_only=True)
        return cls(
            UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=torch_dtype, **kw),
            AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=torch_dtype, **kw),
            CLIPTextModel.from_pretrained(root / "text_encoder", dtype=torch_dtype, **kw),
            CLIPTokenizer.from_pretrained(root / "tokenizer", **kw),
            DDPMScheduler.from_pretrained(root, subfolder="scheduler", **kw),
            **kwargs,
        )
