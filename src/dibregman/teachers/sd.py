"""Adapter: a Stable-Diffusion-style latent text-to-image model as an EDM denoiser, with CFG.

The denoiser lives in the VAE's latent space: x = z + sigma eps with z = (vae_latent - shift) * scaling_factor
(Rombach et al. 2022), and a discrete VP schedule mapped to EDM sigmas as in `teachers/diffusers.py`.
`cond` is a text embedding c = CLIP(prompt) [N, L, D] ([1, L, D] broadcasts), a dict {"cond": c, "uncond": u}
or a list of prompts; the unconditional embedding u defaults to that of the empty prompt "".
Classifier-free guidance (Ho & Salimans 2022, Eq. 6) with scale w:
    D_w(x, sigma, c) = D(x, sigma, u) + w (D(x, sigma, c) - D(x, sigma, u)),
applied to the network output; x0_hat is affine in the output at fixed (x, sigma) for every prediction type,
so guiding eps, v or x0 is the same thing. w = 1 is the plain conditional model (no unconditional pass).
The trainable copies (`unguided(unet)`, a `TextUNetDenoiser`) are the plain conditional model of their UNet, and
their discriminator features are the UNet's bottleneck (mid-block output); see `teachers/t2i.py` for the
text-to-image teacher interface this class implements.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .diffusers import DiscreteVPDenoiser
from .latent import LatentVAE, Shared, check_pipeline_folder, run_to_block, split_text_condition

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class StableDiffusionTeacher(LatentVAE, DiscreteVPDenoiser):
    """`D(x, sigma, cond=None) -> z0_hat` in SD's scaled latent space, with classifier-free guidance."""

    family = "sd"  # the spec kind an export reloads with
    network_folder = "unet"  # the trainable network's subfolder of a diffusers folder
    subfolders = SUBFOLDERS

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
        self.init_vae(vae, unet.config.in_channels)
        size = unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.shape = (int(unet.config.in_channels), int(h), int(w))
        self._uncond: torch.Tensor | None = None  # cached empty-prompt embedding [1, L, D]

    @property
    def network(self) -> nn.Module:
        """The network the copies G and psi are made of."""
        return self.unet

    def unguided(self, unet: nn.Module) -> TextUNetDenoiser:
        """D(x, sigma, c) of `unet` in this teacher's latent space, without guidance, sharing VAE and text encoder."""
        return TextUNetDenoiser(unet, self)

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
        cond, uncond = split_text_condition(cond, self.encode_prompts, self.uncond_embedding)
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

    # ---- export ------------------------------------------------------------------------------------------
    def export_meta(self, sigma_init: float) -> dict:
        """How one step of a student UNet runs in plain diffusers (written into the export's dibregman.json)."""
        sigma = torch.tensor([float(sigma_init)])
        return {
            "timestep": float(self.sigma_to_t(sigma)[0]),  # the UNet's (fractional) timestep of sigma_init
            "input_scale": float(sigma[0] * (1 + sigma[0] ** 2).rsqrt()),  # VP scaling of sigma_init * z
            "prediction_type": self.prediction_type,
            "load_kwargs": {"prediction_type": self.prediction_type, "guidance_scale": 1.0},
            "usage": "z = randn; out = unet(input_scale * z, timestep, text_embeddings).sample (no guidance); "
            "epsilon: z0 = sigma_init * (z - out) (v/sample: dibregman.teachers.diffusers.x0_from_model_output "
            "with x = sigma_init * z); image = vae.decode(z0 / scaling_factor). "
            "Or: dibregman sample --checkpoint DIR --prompt TEXT",
        }

    def pipeline_recipe(self, sigma_init: float) -> dict:
        """How stock diffusers runs one student step (a LoRA export's dibregman.json): `StableDiffusionPipeline`
        with an Euler scheduler whose one sigma is sigma_init ("trailing": latents = sigma_init z, the UNet reads
        them / sqrt(1 + sigma_init^2) at the timestep of sigma_init), no guidance; Euler's step to sigma = 0 is
        x0 = x - sigma_init eps, the student's output."""
        return {
            "pipeline": "StableDiffusionPipeline",
            "scheduler": {"class": "EulerDiscreteScheduler",
                          "config": {"timestep_spacing": "trailing", "prediction_type": self.prediction_type}},
            "call": {"sigmas": [float(sigma_init), 0.0], "guidance_scale": 1.0},
            "latents_scale": 1.0,  # the pipeline's latents: latents_scale * N(0, I) (it multiplies by sigma_init)
        }  # fmt: skip

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

        root = check_pipeline_folder(path, "sd", SUBFOLDERS, "unet", ("UNet2DConditionModel",))
        kw = dict(local_files_only=True)
        return cls(
            UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=torch_dtype, **kw),
            AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=torch_dtype, **kw),
            CLIPTextModel.from_pretrained(root / "text_encoder", dtype=torch_dtype, **kw),
            CLIPTokenizer.from_pretrained(root / "tokenizer", **kw),
            DDPMScheduler.from_pretrained(root, subfolder="scheduler", **kw),
            **kwargs,
        )


class TextUNetDenoiser(DiscreteVPDenoiser):
    """D(x, sigma, c) of a trainable UNet2DConditionModel in the teacher's latent space, without guidance."""

    def __init__(self, unet: nn.Module, text: StableDiffusionTeacher):  # text: shared VAE/encoder/schedule
        abar = (1 + (2 * text.log_sigmas).exp()).reciprocal()
        super().__init__(abar, text.prediction_type, text.sigma_data, text.snap_tol)
        self.log_sigmas, self.sigma_min, self.sigma_max = text.log_sigmas, text.sigma_min, text.sigma_max
        self.unet = unet
        self.shape = tuple(text.shape)
        self.feature_channels = int(unet.config.block_out_channels[-1])  # channels of the mid block
        self._text = Shared(text)

    @property
    def text(self) -> StableDiffusionTeacher:
        return self._text.obj

    @property
    def network(self) -> nn.Module:
        return self.unet

    def _inputs(self, x, sigma, cond):
        x_vp, t, s = self.model_input(x, sigma)
        c, _ = self.text.embeddings(cond, x.shape[0])  # None: the empty prompt (unconditional)
        dtype = self.unet.dtype
        return x_vp.to(dtype), t, s, c.to(x.device, dtype)

    def forward(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        x_vp, t, s, c = self._inputs(x, sigma, cond)
        return self.to_x0(self.unet(x_vp, t, encoder_hidden_states=c).sample, x, s)

    def features(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        """Bottleneck features [N, C, h, w]: the mid block's output; the up-sampling half is never run."""
        x_vp, t, _, c = self._inputs(x, sigma, cond)
        block = self.unet.mid_block if self.unet.mid_block is not None else self.unet.down_blocks[-1]
        out = run_to_block(block, lambda: self.unet(x_vp, t, encoder_hidden_states=c))
        return out[0] if isinstance(out, tuple) else out
