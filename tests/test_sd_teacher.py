"""StableDiffusionTeacher: guided DDIM parity with diffusers, guidance linearity, VAE round trip, loading."""

from __future__ import annotations

import shutil

import pytest
import torch

from dibregman.teachers.base import Denoiser
from dibregman.teachers.diffusers import ddim_sigmas
from dibregman.teachers.sd import StableDiffusionTeacher
from tiny_hf import tiny_sd_components

NUM_STEPS = 8
PROMPTS = ["a cat", "dog on a mat"]


def make_teacher(parts: dict, **kw) -> StableDiffusionTeacher:
    names = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    return StableDiffusionTeacher(*(parts[k] for k in names), **kw)


def clip_embed(parts: dict, prompts: list[str]) -> torch.Tensor:
    """Text embeddings the way diffusers' StableDiffusionPipeline computes them."""
    tok = parts["tokenizer"]
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
    return parts["text_encoder"](ids.input_ids)[0]


def diffusers_guided_ddim(parts, z_T, cond, uncond, guidance_scale: float) -> torch.Tensor:
    """diffusers' own classifier-free-guided DDIM loop (eta = 0) in VP scaling."""
    unet, scheduler = parts["unet"], parts["scheduler"]
    scheduler.set_timesteps(NUM_STEPS)
    z = z_T
    for t in scheduler.timesteps:
        out = unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        out_u, out_c = out.chunk(2)
        z = scheduler.step(out_u + guidance_scale * (out_c - out_u), t, z).prev_sample
    return z


def edm_ddim(denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond=None) -> torch.Tensor:
    """Deterministic DDIM in EDM form: x_{i+1} = x0_hat + (sigma_{i+1} / sigma_i)(x_i - x0_hat)."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        x0 = denoiser(x, s, cond)
        x = x0 + (s_next / s) * (x - x0)
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@torch.no_grad()
def test_guided_ddim_parity_with_diffusers(prediction_type):
    parts = tiny_sd_components(seed=0, prediction_type=prediction_type)
    teacher = make_teacher(parts, guidance_scale=4.0)
    cond, uncond = clip_embed(parts, PROMPTS), clip_embed(parts, ["", ""])
    assert torch.allclose(teacher.encode_prompts(PROMPTS), cond)
    z_T = torch.randn(2, *teacher.shape, generator=torch.Generator().manual_seed(1))
    ref = diffusers_guided_ddim(parts, z_T, cond, uncond, guidance_scale=4.0)

    sigmas = ddim_sigmas(parts["scheduler"], NUM_STEPS)
    z = edm_ddim(teacher, z_T * (1 + sigmas[0] ** 2).sqrt(), sigmas, cond)  # uncond: cached "" embedding
    ours = z / (1 + sigmas[-1] ** 2).sqrt()
    err = float((ours - ref).norm() / ref.norm())
    print(f"guided DDIM parity {prediction_type}: relative error {err:.2e}")
    assert err < 1e-4


@torch.no_grad()
def test_guidance_is_linear_in_scale_and_scale_one_is_conditional():
    parts = tiny_sd_components(seed=1)
    teacher = make_teacher(parts, guidance_scale=1.0)
    assert isinstance(teacher, Denoiser) and teacher.shape == (4, 8, 8)
    cond, uncond = clip_embed(parts, PROMPTS), clip_embed(parts, [""])
    x = 3.0 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([3.0, 0.7])

    calls = []
    hook = parts["unet"].register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    d_cond = teacher(x, sigma, cond)
    hook.remove()
    assert calls == [2]  # guidance scale 1: one conditional pass, no unconditional one
    x_vp, t, s = teacher.model_input(x, sigma)
    eps = parts["unet"](x_vp, t, encoder_hidden_states=cond).sample
    assert torch.allclose(d_cond, x - s * eps, atol=1e-5)

    d_uncond = teacher(x, sigma)  # cond=None: the unconditional model
    assert torch.allclose(d_uncond, teacher(x, sigma, {"cond": uncond, "uncond": uncond}), atol=1e-5)
    assert not torch.allclose(d_cond, d_uncond, atol=1e-4)
    for w in (0.0, 2.5, 7.5):  # the guided pass batches [uncond, cond]: ~2e-6 float noise, amplified by w
        teacher.guidance_scale = w
        d_w = teacher(x, sigma, {"cond": cond, "uncond": uncond})
        assert torch.allclose(d_w, d_uncond + w * (d_cond - d_uncond), atol=1e-5 * (1 + w)), w


@torch.no_grad()
def test_vae_encode_decode_shapes():
    teacher = make_teacher(tiny_sd_components(seed=2))
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = teacher.encode(images)
    assert z.shape == (2, *teacher.shape) and teacher.vae_scale_factor == 2
    assert torch.equal(z, teacher.encode(images))  # posterior mean is deterministic
    z_sample = teacher.encode(images, generator=torch.Generator().manual_seed(0))
    assert z_sample.shape == z.shape and not torch.equal(z_sample, z)
    out = teacher.decode(z)
    assert out.shape == images.shape and out.abs().max() <= 1


@torch.no_grad()
def test_from_folder_roundtrip_and_missing_subfolder(tmp_path):
    parts = tiny_sd_components(tmp_path, seed=3, prediction_type="v_prediction")
    built = make_teacher(parts, guidance_scale=2.0)
    loaded = StableDiffusionTeacher.from_folder(tmp_path, guidance_scale=2.0)
    assert loaded.prediction_type == "v_prediction" and loaded.shape == built.shape
    assert loaded.sigma_max == built.sigma_max
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(loaded(x, 1.3, PROMPTS), built(x, 1.3, PROMPTS), atol=1e-6)

    with pytest.raises(FileNotFoundError, match="not found"):
        StableDiffusionTeacher.from_folder(tmp_path / "nowhere")
    shutil.rmtree(tmp_path / "vae")
    with pytest.raises(FileNotFoundError, match=r"\['vae'\]"):
        StableDiffusionTeacher.from_folder(tmp_path)


def test_importing_the_library_leaves_hf_hub_offline_alone():
    """Only the CLI entry point may set HF_HUB_OFFLINE; importing the library must not change the environment."""
    import os
    import subprocess
    import sys

    code = (
        "import os; import dibregman.teachers.sd, dibregman.teachers.diffusers, dibregman.teachers.t2i; "
        "import dibregman.loop; "
        "print(os.environ.get('HF_HUB_OFFLINE'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
