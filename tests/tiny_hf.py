"""Tiny, randomly initialised diffusers / transformers components for CPU tests (never downloaded).

`tiny_unet2d` and `tiny_ddim_scheduler` build a pixel-space DDPM teacher; `tiny_sd_components` builds the
five pieces of a Stable-Diffusion-style pipeline (unet, vae, text_encoder, tokenizer, scheduler) and can save
them in the standard diffusers folder layout. Seeds make every builder deterministic.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, UNet2DModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def tiny_unet2d(
    in_channels: int = 3,  # image channels (out_channels = in_channels unless given)
    sample_size: int = 8,  # image side
    *,
    seed: int = 0,
    **config,  # overrides of the UNet2DModel config (e.g. num_class_embeds, out_channels)
) -> UNet2DModel:
    """A ~20k-parameter UNet2DModel with two resolutions and positional time embedding."""
    kw = dict(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    kw.update(config)
    torch.manual_seed(seed)
    return UNet2DModel(**kw).eval()


def tiny_ddim_scheduler(prediction_type: str = "epsilon", **config) -> DDIMScheduler:
    """A 1000-step DDIMScheduler like SD's: scaled_linear betas, final abar = abar_0, "leading" + offset 1."""
    kw = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )
    kw.update(config)
    return DDIMScheduler(**kw)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (so every byte is one base token of the byte-level BPE)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    num_extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + num_extra)
            num_extra += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def tiny_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with 514 tokens (bytes, bytes + '</w>', BOS, EOS) and a few merges."""
    chars = sorted(set(_bytes_to_unicode().values()))
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tiny_sd_components(
    tmp_path: str | os.PathLike | None = None,  # if given: save_pretrained into the diffusers SD layout there
    *,
    seed: int = 0,
    prediction_type: str = "epsilon",
    latent_size: int = 8,  # latent side; images are 2x larger (two VAE resolutions)
) -> dict:
    """{unet, vae, text_encoder, tokenizer, scheduler} of a tiny SD-style text-to-latent pipeline."""
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    ).eval()
    vae = AutoencoderKL(
        sample_size=2 * latent_size,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    ).eval()
    scheduler = tiny_ddim_scheduler(prediction_type)
    parts = dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
    if tmp_path is not None:
        for name, part in parts.items():
            part.save_pretrained(Path(tmp_path) / name)
    return parts
