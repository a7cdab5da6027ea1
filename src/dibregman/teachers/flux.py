"""Adapter: FLUX.1 (Black Forest Labs 2024) as an EDM denoiser: `flux:FOLDER`.

FLUX's conventions (diffusers' `FluxPipeline`), the flow maths being `mmdit.MMDiTTeacher`'s:
- tokens: the latent [N, C, h, w] is cut into 2x2 patches, packed row-major into [N, h/2 * w/2, 4 C] tokens
  (`pack_latents`; `unpack_latents` inverts it); image position ids (0, row, column), text ids zeros;
- time: the transformer reads t in [0, 1] (it multiplies by 1000 itself);
- shift: resolution dependent, mu linear in the number of image tokens between (base_image_seq_len, base_shift)
  and (max_image_seq_len, max_shift) of the scheduler config, s = e^mu (`sampling_shift`); it only places the sampling
  chain (`sampling_sigmas`: t_i = linspace(1, 1/N, N) shifted, as the pipeline);
- text: CLIP-L's pooled output [N, 768] and T5-XXL's tokens [N, max_sequence_length, 4096];
- guidance: a guidance-distilled transformer (`guidance_embeds`, FLUX.1-dev) reads the guidance scale as an input
  and is evaluated once (the copies G and psi keep that input: such a model has no unguided mode); otherwise the
  guidance scale is true classifier-free guidance against the empty prompt (the pipeline's `true_cfg_scale`).
FLUX has no native sample size: images are `resolution` pixels per side (default 1024, `model.resolution`).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .latent import PromptEmbeds, check_pipeline_folder
from .mmdit import MMDiTTeacher

SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
DEFAULT_RESOLUTION = 1024  # FluxPipeline's default_sample_size 128 x vae_scale_factor 8


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[N, C, h, w] -> [N, (h/2)(w/2), 4 C]: 2x2 patches, row-major (diffusers' `FluxPipeline._pack_latents`)."""
    n, c, h, w = x.shape
    return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[N, (h/2)(w/2), 4 C] -> [N, C, h, w], the inverse of `pack_latents`."""
    n, _, d = tokens.shape
    return tokens.view(n, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, d // 4, h, w)


def image_ids(rows: int, cols: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids [rows * cols, 3] of the image tokens: (0, row, column)."""
    ids = torch.zeros(rows, cols, 3, device=device, dtype=dtype)
    ids[..., 1] += torch.arange(rows, device=device, dtype=dtype)[:, None]
    ids[..., 2] += torch.arange(cols, device=device, dtype=dtype)[None, :]
    return ids.reshape(rows * cols, 3)


class FluxTeacher(MMDiTTeacher):
    """`D(x, sigma, cond=None) -> z0_hat` of a FLUX transformer in its (unpacked) latent space, guided."""

    family = "flux"
    subfolders = SUBFOLDERS
    pipeline_class = "FluxPipeline"
    max_shift_default = 1.15  # FluxPipeline's

    def __init__(
        self,
        transformer: nn.Module,  # diffusers FluxTransformer2DModel
        vae: nn.Module,  # diffusers AutoencoderKL
        text_encoder: nn.Module,  # CLIPTextModel (pooled output)
        tokenizer,  # CLIPTokenizer
        text_encoder_2: nn.Module,  # T5EncoderModel
        tokenizer_2,
        scheduler,  # FlowMatchEulerDiscreteScheduler (dynamic shift)
        *,
        resolution: int = DEFAULT_RESOLUTION,  # image side in pixels
        max_sequence_length: int = 512,  # T5 tokens (the pipeline's default; 256 for FLUX.1-schnell)
        guidance_scale: float = 3.5,  # embedded guidance (guidance_embeds) or true CFG scale; 1 = none
        **kwargs,  # sigma_data, sigma_min, sigma_max, feature_depth
    ):
        c = transformer.config
        channels = int(c.in_channels) // 4  # a token holds a 2x2 patch
        super().__init__(transformer, vae, scheduler, (channels, 2, 2), time_scale=1.0, guidance_scale=guidance_scale,
                         **kwargs)  # fmt: skip
        self.set_resolution(resolution)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.text_encoder_2 = text_encoder_2.eval().requires_grad_(False)
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.max_sequence_length = int(max_sequence_length)
        self.guidance_embeds = bool(c.guidance_embeds)

    def guidance(self) -> tuple[float, float | None]:
        """Guidance-distilled: no CFG, the scale is the transformer's guidance input; else true CFG."""
        return (1.0, self.guidance_scale) if self.guidance_embeds else (self.guidance_scale, None)

    # ---- family hooks ------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str] | str) -> PromptEmbeds:
        """T5 token embeddings [N, max_sequence_length, D] and CLIP's pooled output [N, P] of the prompts."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids  # fmt: skip
        pooled = self.text_encoder(ids.to(self.text_encoder.device), output_hidden_states=False).pooler_output
        ids = self.tokenizer_2(prompts, padding="max_length", max_length=self.max_sequence_length,
                               truncation=True, return_tensors="pt").input_ids  # fmt: skip
        seq = self.text_encoder_2(ids.to(self.text_encoder_2.device), output_hidden_states=False)[0]
        return PromptEmbeds(seq.float(), pooled.float().to(seq.device))

    def velocity(self, net, x_t, time, emb: PromptEmbeds, guidance=None) -> torch.Tensor:
        n, _, h, w = x_t.shape
        g = None if guidance is None else torch.full((n,), float(guidance), device=x_t.device)
        out = net(
            hidden_states=pack_latents(x_t),
            timestep=time,  # t in [0, 1]
            guidance=g,
            pooled_projections=emb.pooled,
            encoder_hidden_states=emb.seq,
            txt_ids=torch.zeros(emb.seq.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
            img_ids=image_ids(h // 2, w // 2, x_t.device, x_t.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)

    def blocks(self, net) -> list[nn.Module]:
        return [*net.transformer_blocks, *net.single_transformer_blocks]  # double-stream, then single-stream

    @property
    def token_grid(self) -> tuple[int, int]:
        return self.shape[1] // 2, self.shape[2] // 2

    def schedule_kwargs(self, num_steps: int) -> dict:
        """The pipeline's chain: t_i = linspace(1, 1/N, N), shifted by the scheduler (mu at this resolution)."""
        import numpy as np

        return {**super().schedule_kwargs(num_steps), "sigmas": np.linspace(1.0, 1 / num_steps, num_steps)}

    @classmethod
    def from_folder(
        cls,
        path: str | os.PathLike,
        *,
        torch_dtype: torch.dtype = torch.float32,
        resolution: int | None = None,  # image side in pixels (None: 1024)
        **kwargs,  # max_sequence_length, guidance_scale, sigma_data, sigma_min, sigma_max, feature_depth
    ) -> FluxTeacher:
        """Load the diffusers FLUX layout (transformer/, vae/, text_encoder[_2]/, tokenizer[_2]/, scheduler/)."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

        root = check_pipeline_folder(path, "flux", SUBFOLDERS, "transformer", ("FluxTransformer2DModel",))
        kw = dict(local_files_only=True)
        return cls(
            FluxTransformer2DModel.from_pretrained(root, subfolder="transformer", torch_dtype=torch_dtype, **kw),
            AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=torch_dtype, **kw),
            CLIPTextModel.from_pretrained(root / "text_encoder", dtype=torch_dtype, **kw),
            CLIPTokenizer.from_pretrained(root / "tokenizer", **kw),
            T5EncoderModel.from_pretrained(root / "text_encoder_2", dtype=torch_dtype, **kw),
            AutoTokenizer.from_pretrained(root / "tokenizer_2", **kw),
            FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler", **kw),
            resolution=resolution or DEFAULT_RESOLUTION,
            **kwargs,
        )


__all__ = ["FluxTeacher", "pack_latents", "unpack_latents", "image_ids", "SUBFOLDERS", "DEFAULT_RESOLUTION"]
