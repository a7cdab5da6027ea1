"""Adapter: Stable Diffusion 3 / 3.5 (Esser et al. 2024) as an EDM denoiser: `sd3:FOLDER`.

SD3's conventions (diffusers' `StableDiffusion3Pipeline`), the flow maths being `mmdit.MMDiTTeacher`'s:
- time: the transformer reads the timestep 1000 t (t the flow time of x_t = (1 - t) x0 + t eps); the scheduler's
  `shift` (3.0 for SD3) only places the sampling chain (`sampling_sigmas`);
- text: CLIP-L and CLIP-G give the penultimate hidden states [N, 77, 768 + 1280] and their projected pooled
  outputs (concatenated: pooled [N, 2048]); T5-XXL gives [N, max_sequence_length, 4096] (zeros without T5);
  the CLIP states are zero-padded to T5's width and put before T5's tokens along the sequence;
- latents: AutoencoderKL with 16 channels, z = (latent - shift_factor) * scaling_factor; tokens are patch_size^2
  patches in row-major order (the feature map's grid is latent side / patch_size).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .latent import PromptEmbeds, check_pipeline_folder
from .mmdit import MMDiTTeacher

SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
T5_SUBFOLDERS = ("text_encoder_3", "tokenizer_3")  # optional: SD3 runs without T5 (zero T5 tokens)


class SD3Teacher(MMDiTTeacher):
    """`D(x, sigma, cond=None) -> z0_hat` of an SD3 transformer in its latent space, with classifier-free guidance."""

    family = "sd3"
    subfolders = SUBFOLDERS + T5_SUBFOLDERS
    max_shift_default = 1.16  # StableDiffusion3Pipeline's, used only with use_dynamic_shifting

    def __init__(
        self,
        transformer: nn.Module,  # diffusers SD3Transformer2DModel
        vae: nn.Module,  # diffusers AutoencoderKL
        text_encoder: nn.Module,  # CLIPTextModelWithProjection (CLIP-L)
        tokenizer,  # CLIPTokenizer; its model_max_length pads both CLIP inputs
        text_encoder_2: nn.Module,  # CLIPTextModelWithProjection (CLIP-G)
        tokenizer_2,
        text_encoder_3: nn.Module | None,  # T5EncoderModel, or None (zero T5 tokens)
        tokenizer_3,
        scheduler,  # FlowMatchEulerDiscreteScheduler (shift)
        *,
        max_sequence_length: int = 256,  # T5 tokens (the pipeline's default)
        guidance_scale: float = 7.0,  # classifier-free guidance w (the pipeline's default); 1 = none
        **kwargs,  # sigma_data, sigma_min, sigma_max, feature_depth
    ):
        c = transformer.config
        shape = (int(c.in_channels), int(c.sample_size), int(c.sample_size))
        super().__init__(transformer, vae, scheduler, shape, time_scale=1000.0, guidance_scale=guidance_scale, **kwargs)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.text_encoder_2 = text_encoder_2.eval().requires_grad_(False)
        self.text_encoder_3 = None if text_encoder_3 is None else text_encoder_3.eval().requires_grad_(False)
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3
        self.max_sequence_length = int(max_sequence_length)
        self.latent_multiple = int(c.patch_size)

    # ---- family hooks ------------------------------------------------------------------------------------
    def _clip(self, tokenizer, encoder, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate hidden states [N, L, D], projected pooled output [N, P]) of one CLIP encoder."""
        ids = tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids  # fmt: skip
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        return out.hidden_states[-2].float(), out[0].float()

    def _t5(self, prompts: list[str]) -> torch.Tensor:
        """T5 token embeddings [N, max_sequence_length, D_T5] (zeros of the transformer's width without T5)."""
        n, length = len(prompts), self.max_sequence_length
        if self.text_encoder_3 is None:
            device = self.text_encoder.device
            return torch.zeros(n, length, self.net.config.joint_attention_dim, device=device)
        ids = self.tokenizer_3(prompts, padding="max_length", max_length=length, truncation=True,
                               add_special_tokens=True, return_tensors="pt").input_ids  # fmt: skip
        return self.text_encoder_3(ids.to(self.text_encoder_3.device))[0].float()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str] | str) -> PromptEmbeds:
        """Token embeddings [N, 77 + max_sequence_length, D_T5] and pooled [N, P_L + P_G] of the prompts."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seq_l, pooled_l = self._clip(self.tokenizer, self.text_encoder, prompts)
        seq_g, pooled_g = self._clip(self.tokenizer_2, self.text_encoder_2, prompts)
        t5 = self._t5(prompts)
        clip = F.pad(torch.cat([seq_l, seq_g], dim=-1), (0, t5.shape[-1] - seq_l.shape[-1] - seq_g.shape[-1]))
        return PromptEmbeds(torch.cat([clip, t5.to(clip.device)], dim=-2), torch.cat([pooled_l, pooled_g], dim=-1))

    def velocity(self, net, x_t, time, emb: PromptEmbeds, guidance=None) -> torch.Tensor:
        out = net(hidden_states=x_t, timestep=time, encoder_hidden_states=emb.seq, pooled_projections=emb.pooled)
        return out.sample

    def blocks(self, net) -> list[nn.Module]:
        return list(net.transformer_blocks)

    @property
    def token_grid(self) -> tuple[int, int]:
        p = self.latent_multiple
        return self.shape[1] // p, self.shape[2] // p

    @classmethod
    def from_folder(
        cls,
        path: str | os.PathLike,
        *,
        torch_dtype: torch.dtype = torch.float32,
        resolution: int | None = None,  # image side in pixels (None: the transformer's sample_size)
        **kwargs,  # max_sequence_length, guidance_scale, sigma_data, sigma_min, sigma_max, feature_depth
    ) -> SD3Teacher:
        """Load the diffusers SD3 layout (transformer/, vae/, text_encoder[_2]/, tokenizer[_2]/, scheduler/, and
        text_encoder_3/ + tokenizer_3/ if present), offline."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

        root = check_pipeline_folder(path, "sd3", SUBFOLDERS, "transformer", ("SD3Transformer2DModel",))
        kw = dict(local_files_only=True)
        t5 = all((root / name).is_dir() for name in T5_SUBFOLDERS)
        teacher = cls(
            SD3Transformer2DModel.from_pretrained(root, subfolder="transformer", torch_dtype=torch_dtype, **kw),
            AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=torch_dtype, **kw),
            CLIPTextModelWithProjection.from_pretrained(root / "text_encoder", dtype=torch_dtype, **kw),
            CLIPTokenizer.from_pretrained(root / "tokenizer", **kw),
            CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2", dtype=torch_dtype, **kw),
            CLIPTokenizer.from_pretrained(root / "tokenizer_2", **kw),
            T5EncoderModel.from_pretrained(root / "text_encoder_3", dtype=torch_dtype, **kw) if t5 else None,
            AutoTokenizer.from_pretrained(root / "tokenizer_3", **kw) if t5 else None,
            FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler", **kw),
            **kwargs,
        )
        if resolution:
            teacher.set_resolution(resolution)
        return teacher


__all__ = ["SD3Teacher", "SUBFOLDERS"]
