"""Tiny, randomly initialised transformer pipelines for CPU tests (never downloaded): SD3 (MMDiT, three text
encoders), FLUX (packed tokens, two text encoders, optional guidance input) and DiT (class labels, learned
sigma). Each builder returns the pipeline's components as a dict and, given a folder, saves them in the diffusers
layout there (with a model_index.json naming each component, as `save_pretrained` of a pipeline does).
Seeds make every builder deterministic; images are 16x16 (latents 4x8x8).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
)
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from tiny_hf import tiny_clip_tokenizer  # noqa: E402

TEXT_LENGTH = 16  # CLIP and T5 tokens (the pipelines' max_sequence_length must be given the same)
LATENT = 8  # latent side; images are 2x larger


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A unigram T5 tokenizer over lower-case letters and a few words (pad 0, eos 1, unk 2)."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab += [("\u2581" + w, -1.0) for w in ("a", "cat", "dog", "on", "mat", "red", "house")]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def _clip_config(tokenizer, hidden: int, **kw) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=TEXT_LENGTH, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kw,
    )  # fmt: skip


def tiny_t5(tokenizer, d_model: int = 32) -> T5EncoderModel:
    cfg = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    return T5EncoderModel(cfg).eval()


def tiny_vae(scaling_factor: float, shift_factor: float | None = None) -> AutoencoderKL:
    return AutoencoderKL(
        sample_size=2 * LATENT, in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    ).eval()  # fmt: skip


def save_components(parts: dict, folder: str | os.PathLike, pipeline: str) -> None:
    """save_pretrained of each component into folder/NAME, and a model_index.json listing them."""
    folder = Path(folder)
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.1"}
    for name, part in parts.items():
        part.save_pretrained(folder / name)
        library = "transformers" if type(part).__module__.startswith("transformers") else "diffusers"
        index[name] = [library, type(part).__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def tiny_sd3_components(folder=None, *, seed: int = 0, t5: bool = True) -> dict:
    """{transformer, vae, text_encoder(_2, _3), tokenizer(_2, _3), scheduler} of a tiny SD3 pipeline (4 blocks)."""
    tok = tiny_clip_tokenizer(model_max_length=TEXT_LENGTH)
    torch.manual_seed(seed)
    parts = dict(
        transformer=SD3Transformer2DModel(
            sample_size=LATENT, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
            pos_embed_max_size=16,
        ).eval(),
        vae=tiny_vae(1.5, 0.1),
        text_encoder=CLIPTextModelWithProjection(_clip_config(tok, 16, projection_dim=16)).eval(),
        tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(tok, 16, projection_dim=16)).eval(),
        tokenizer_2=tiny_clip_tokenizer(model_max_length=TEXT_LENGTH),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )  # fmt: skip
    if t5:
        parts["tokenizer_3"] = tiny_t5_tokenizer()
        parts["text_encoder_3"] = tiny_t5(parts["tokenizer_3"])
    if folder is not None:
        save_components(parts, folder, "StableDiffusion3Pipeline")
    return parts


def tiny_flux_components(folder=None, *, seed: int = 0, guidance_embeds: bool = False) -> dict:
    """{transformer, vae, text_encoder(_2), tokenizer(_2), scheduler} of a tiny FLUX pipeline (1 + 2 blocks)."""
    tok, tok2 = tiny_clip_tokenizer(model_max_length=TEXT_LENGTH), tiny_t5_tokenizer()
    torch.manual_seed(seed)
    parts = dict(
        transformer=FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance_embeds,
            axes_dims_rope=(2, 2, 4),
        ).eval(),
        vae=tiny_vae(0.4, 0.1),
        text_encoder=CLIPTextModel(_clip_config(tok, 16)).eval(),
        tokenizer=tok,
        text_encoder_2=tiny_t5(tok2),
        tokenizer_2=tok2,
        scheduler=FlowMatchEulerDiscreteScheduler(  # FLUX's config, with token counts scaled to 16 image tokens
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=4,
            max_image_seq_len=64,
        ),
    )  # fmt: skip
    if folder is not None:
        save_components(parts, folder, "FluxPipeline")
    return parts


def tiny_dit_components(folder=None, *, seed: int = 0, learned_sigma: bool = True) -> dict:
    """{transformer, vae, scheduler} of a tiny class-conditional DiT (1000 classes + the null class, 4 blocks)."""
    torch.manual_seed(seed)
    parts = dict(
        transformer=DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8 if learned_sigma else 4,
            num_layers=4, sample_size=LATENT, patch_size=2, num_embeds_ada_norm=1000,
        ).eval(),
        vae=tiny_vae(0.18215),
        scheduler=DDIMScheduler(  # DiT's: linear betas, epsilon prediction
            num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False,
        ),
    )  # fmt: skip
    if folder is not None:
        save_components(parts, folder, "DiTPipeline")
    return parts
