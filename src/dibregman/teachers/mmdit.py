"""Adapter: a text-to-image rectified-flow transformer (MMDiT: SD3, Esser et al. 2024; FLUX.1) as an EDM denoiser.

The flow maths is `teachers/flow.py`'s: with t = sigma / (1 + sigma) and x_t = x / (1 + sigma) (float64, t clamped
below 1),
    D(x, sigma, c) = x_t - t v(x_t, t, c),         v = eps - x0 the transformer's velocity,
in the VAE's scaled latent space (`latent.LatentVAE`, sigma_data = 1). What differs between families lives in
their subclass (`sd3.SD3Teacher`, `flux.FluxTeacher`): the text encoders (`encode_prompts` -> `PromptEmbeds`),
one transformer call (`velocity`: time convention, FLUX's 2x2 token packing and position ids, embedded
guidance), its block stack (`blocks`) and token grid.
Guidance (Ho & Salimans 2022, Eq. 6) is applied to the velocity, D affine in v at fixed (x, sigma):
    v_w = v(x_t, t, u) + w (v(x_t, t, c) - v(x_t, t, u)),      u = the empty prompt's embedding,
in one batched pass over [u, c]. A guidance-distilled FLUX reads its guidance as an input instead (`guidance()`).
The sampling shift s of the scheduler (SD3: `shift`; FLUX: e^mu, resolution dependent) only chooses where the
pipeline's Euler chain evaluates the network: t' = s t / (1 + (s - 1) t) is sigma' = s sigma in EDM terms, and
`sampling_sigmas` gives that chain; D itself does not depend on s.
Discriminator features: the image tokens after the block at `feature_depth` of the stack (`latent.block_at_depth`),
as a map [N, D, h, w]; the blocks after it are never run.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .flow import FlowDenoiser, sigma_of_time, time_of_sigma, x0_from_flow_output
from .latent import (
    LatentVAE,
    PromptEmbeds,
    Shared,
    block_at_depth,
    image_tokens,
    run_to_block,
    split_text_condition,
    tokens_to_map,
)


def dynamic_shift_mu(num_tokens: int, config, max_shift_default: float) -> float:
    """mu of the resolution-dependent shift: linear in the number of image tokens between (base_image_seq_len,
    base_shift) and (max_image_seq_len, max_shift) of the scheduler config (diffusers' `calculate_shift`)."""
    lo_n, hi_n = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    lo, hi = config.get("base_shift", 0.5), config.get("max_shift", max_shift_default)
    slope = (hi - lo) / (hi_n - lo_n)
    return num_tokens * slope + lo - slope * lo_n


class MMDiTTeacher(LatentVAE, FlowDenoiser):
    """D(x, sigma, cond=None) -> z0_hat of a text-to-image flow transformer, guided; the text-to-image teacher
    interface of `teachers/t2i.py`. Subclasses define the family's text encoders, transformer call and blocks."""

    network_folder = "transformer"
    family = "mmdit"  # the spec kind (subclasses: "sd3", "flux")
    subfolders: tuple[str, ...] = ()
    max_shift_default = 1.15  # the pipeline's max_shift when the scheduler config has none

    def __init__(
        self,
        transformer: nn.Module,  # diffusers SD3Transformer2DModel / FluxTransformer2DModel
        vae: nn.Module,  # diffusers AutoencoderKL
        scheduler,  # FlowMatchEulerDiscreteScheduler: its shift config and the pipeline's sampling chain
        shape: tuple[int, int, int],  # latent (C, h, w)
        *,
        time_scale: float,  # the transformer reads t * time_scale (SD3: 1000, FLUX: 1)
        guidance_scale: float = 1.0,  # classifier-free guidance w (FLUX with guidance embeds: the guidance input)
        sigma_data: float = 1.0,  # std of the scaled latents
        sigma_min: float = 0.002,  # smallest noise level the samplers use (t ~ 0.002)
        sigma_max: float = 80.0,  # largest noise level the samplers use (t ~ 0.988)
        feature_depth: float = 0.5,  # discriminator features: the image tokens after this fraction of the blocks
    ):
        super().__init__(transformer.eval().requires_grad_(False), shape, time_scale=time_scale,
                         sigma_data=sigma_data, sigma_min=sigma_min, sigma_max=sigma_max)  # fmt: skip
        self.vae = vae.eval().requires_grad_(False)
        self.init_vae(vae, shape[0])
        self.scheduler = scheduler
        self.guidance_scale = float(guidance_scale)
        self.feature_depth = float(feature_depth)
        block_at_depth(self.blocks(transformer), self.feature_depth)  # a bad depth fails here, in one line
        self._uncond: PromptEmbeds | None = None

    # ---- family hooks ------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str] | str) -> PromptEmbeds:
        raise NotImplementedError

    def velocity(self, net: nn.Module, x_t: torch.Tensor, time: torch.Tensor, emb: PromptEmbeds, guidance):
        """One transformer pass: velocity [N, C, h, w] at latents x_t [N, C, h, w] and network time [N]."""
        raise NotImplementedError

    def blocks(self, net: nn.Module) -> list[nn.Module]:
        """The transformer's blocks in the order they run (the feature tap's depth counts them)."""
        raise NotImplementedError

    @property
    def token_grid(self) -> tuple[int, int]:
        """(rows, columns) of the image tokens."""
        raise NotImplementedError

    latent_multiple = 2  # the latent side must be a multiple of this (patch size)

    def guidance(self) -> tuple[float, float | None]:
        """(classifier-free guidance scale, guidance input of the transformer or None) of the teacher."""
        return self.guidance_scale, None

    # ---- the text-to-image interface ------------------------------------------------------------------------
    @property
    def network(self) -> nn.Module:
        return self.net

    @property
    def feature_channels(self) -> int:
        c = self.net.config
        return int(c.num_attention_heads * c.attention_head_dim)

    def unguided(self, transformer: nn.Module) -> MMDiTDenoiser:
        """D(x, sigma, c) of `transformer` without classifier-free guidance (a guidance input keeps the teacher's
        value: a guidance-distilled model has no unguided mode), sharing this teacher's VAE and text encoders."""
        return MMDiTDenoiser(transformer, self, self.guidance()[1])

    def uncond_embedding(self) -> PromptEmbeds:
        """The empty prompt's embeddings (computed once, then cached)."""
        if self._uncond is None:
            self._uncond = self.encode_prompts([""])
        return self._uncond

    def embeddings(self, cond, n: int) -> tuple[PromptEmbeds, PromptEmbeds]:
        """(cond, uncond) for a batch of n from `PromptEmbeds`, a {"cond", "uncond"} dict, prompts or None."""
        cond, uncond = split_text_condition(cond, self.encode_prompts, self.uncond_embedding)
        if not isinstance(cond, PromptEmbeds):
            raise ValueError(f"cond must be prompts or PromptEmbeds (sequence + pooled), got {type(cond).__name__}")
        return cond.expand(n), uncond.expand(n)

    def set_resolution(self, pixels: int) -> None:
        """Generate square images of `pixels` per side (latent side pixels / vae_scale_factor)."""
        f = self.vae_scale_factor * self.latent_multiple
        if pixels < f or pixels % f:
            raise ValueError(f"resolution {pixels} must be a positive multiple of {f} for this {self.family} teacher")
        self.shape = (self.shape[0], pixels // self.vae_scale_factor, pixels // self.vae_scale_factor)

    # ---- the denoiser ------------------------------------------------------------------------------------
    def _inputs(self, net, x, sigma):
        x_t, time, t, s = self.model_input(x, sigma)  # float64
        dtype = net.dtype
        return x_t, x_t.to(dtype), time.to(torch.float64 if dtype == torch.float64 else torch.float32), t, s

    def denoise(self, net: nn.Module, x: torch.Tensor, sigma, cond, w: float, guidance) -> torch.Tensor:
        """D(x, sigma, cond) of `net` with guidance scale w (1: the conditional model, one pass)."""
        c, u = self.embeddings(cond, x.shape[0])
        x_t, x_in, time, t, s = self._inputs(net, x, sigma)
        if cond is None or w == 1.0:
            v = self.velocity(net, x_in, time, c.to(x.device, net.dtype), guidance).double()
        else:  # one batched pass over [uncond, cond], as diffusers' SD3 pipeline does
            emb = PromptEmbeds.cat([u, c]).to(x.device, net.dtype)
            v_u, v_c = self.velocity(net, torch.cat([x_in, x_in]), time.repeat(2), emb, guidance).double().chunk(2)
            v = v_u + w * (v_c - v_u)
        return x0_from_flow_output(v, x.to(torch.float64), x_t, t, s, "velocity").to(x.dtype)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond=None) -> torch.Tensor:
        w, guidance = self.guidance()
        return self.denoise(self.net, x, sigma, cond, w, guidance)

    def features(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        """The teacher's own image tokens at `feature_depth` (see `tap`)."""
        return self.tap(self.net, x, sigma, cond, self.guidance()[1])

    def tap(self, net: nn.Module, x: torch.Tensor, sigma, cond, guidance) -> torch.Tensor:
        """Image tokens after the block at `feature_depth`, as a map [N, D, rows, columns]; no guidance."""
        c, _ = self.embeddings(cond, x.shape[0])
        _, x_in, time, _, _ = self._inputs(net, x, sigma)
        block = block_at_depth(self.blocks(net), self.feature_depth)
        out = run_to_block(block, lambda: self.velocity(net, x_in, time, c.to(x.device, net.dtype), guidance))
        return tokens_to_map(image_tokens(out), *self.token_grid)

    # ---- sampling schedule and export ----------------------------------------------------------------------
    @property
    def dynamic_mu(self) -> float | None:
        """mu of the resolution-dependent shift at this resolution, or None when the scheduler has a fixed one."""
        config = self.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return None
        return dynamic_shift_mu(math.prod(self.token_grid), config, self.max_shift_default)

    @property
    def sampling_shift(self) -> float:
        """The effective shift s of the sampling schedule (sigma' = s sigma): the config's, or e^mu / mu."""
        mu, config = self.dynamic_mu, self.scheduler.config
        if mu is None:
            return float(config.get("shift", 1.0))
        return math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu

    def schedule_kwargs(self, num_steps: int) -> dict:
        """Keyword arguments of `scheduler.set_timesteps` for the pipeline's default chain of num_steps."""
        mu = self.dynamic_mu
        return {"num_inference_steps": num_steps, **({"mu": mu} if mu is not None else {})}

    def sampling_sigmas(self, num_steps: int) -> torch.Tensor:
        """EDM sigmas (float64, descending, final 0) of the pipeline's own Euler chain of num_steps steps: the
        EDM DDIM step over them reproduces the pipeline's `FlowMatchEulerDiscreteScheduler` loop."""
        self.scheduler.set_timesteps(**self.schedule_kwargs(num_steps))
        return sigma_of_time(self.scheduler.sigmas.double().cpu())  # t = 1 -> sigma 1e7 (clamped), t = 0 -> 0

    def export_meta(self, sigma_init: float) -> dict:
        """How one student step runs in plain diffusers (the export's dibregman.json)."""
        t = float(time_of_sigma(torch.tensor(float(sigma_init), dtype=torch.float64)))
        _, guidance = self.guidance()
        pixels = self.shape[1] * self.vae_scale_factor
        return {
            "flow_time": t,  # t = sigma_init / (1 + sigma_init)
            "timestep": t * self.time_scale,  # what the transformer reads
            "input_scale": t,  # x_t = t z
            "guidance": guidance,  # the transformer's guidance input, or None
            "resolution": pixels,
            "load_kwargs": {"guidance_scale": 1.0 if guidance is None else guidance, "resolution": pixels},
            "usage": self.usage,
        }

    pipeline_class = "StableDiffusion3Pipeline"  # the diffusers pipeline of the family

    def pipeline_recipe(self, sigma_init: float) -> dict:
        """How stock diffusers runs one student step (a LoRA export's dibregman.json): the family's pipeline with a
        flow Euler scheduler without shift whose one time is t = sigma_init / (1 + sigma_init), latents t z (the
        student's input x_t), no classifier-free guidance (a guidance-distilled FLUX keeps its guidance input);
        the step to t = 0 is x_t - t v, the student's output."""
        t = float(time_of_sigma(torch.tensor(float(sigma_init), dtype=torch.float64)))
        _, guidance = self.guidance()
        pixels = self.shape[1] * self.vae_scale_factor
        call = {"sigmas": [t], "guidance_scale": 1.0 if guidance is None else guidance, "height": pixels,
                "width": pixels, "max_sequence_length": getattr(self, "max_sequence_length", 256)}  # fmt: skip
        return {
            "pipeline": self.pipeline_class,
            "scheduler": {
                "class": "FlowMatchEulerDiscreteScheduler",
                "config": {"shift": 1.0, "use_dynamic_shifting": False},
            },
            "call": call,
            "latents_scale": t,  # the pipeline's latents: t * N(0, I) (it takes them as they are)
            "latents_packed": self.family == "flux",  # FLUX takes its latents packed in 2x2 tokens
        }

    usage = (
        "z = randn; v = transformer(input_scale * z, timestep, text) (no guidance); z0 = input_scale * (z - v); "
        "image = vae.decode(z0 / scaling_factor + shift_factor). Or: dibregman sample --checkpoint DIR --prompt TEXT"
    )


class MMDiTDenoiser(nn.Module):
    """D(x, sigma, c) of a trainable copy of the teacher's transformer, without classifier-free guidance."""

    def __init__(self, transformer: nn.Module, text: MMDiTTeacher, guidance: float | None):
        super().__init__()
        self.transformer = transformer
        self._text = Shared(text)  # the VAE, text encoders and family conventions, by reference
        self.guidance = guidance  # a guidance-distilled transformer's guidance input (None: none)
        self.shape = tuple(text.shape)
        self.sigma_data, self.sigma_min, self.sigma_max = text.sigma_data, text.sigma_min, text.sigma_max
        self.feature_channels = text.feature_channels

    @property
    def text(self) -> MMDiTTeacher:
        return self._text.obj

    @property
    def network(self) -> nn.Module:
        return self.transformer

    def forward(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        return self.text.denoise(self.transformer, x, sigma, cond, 1.0, self.guidance)

    def features(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        """The image tokens after the block at the teacher's `feature_depth`, [N, D, rows, columns]."""
        return self.text.tap(self.transformer, x, sigma, cond, self.guidance)


__all__ = ["MMDiTTeacher", "MMDiTDenoiser", "dynamic_shift_mu"]
