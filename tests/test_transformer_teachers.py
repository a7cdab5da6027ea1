"""Transformer teachers (sd3, flux, dit): parity with diffusers' own pipelines (their Euler / DDIM loop and
guidance against our D(x, sigma) stepped in EDM sigmas), the discriminator's feature tap at a chosen depth, and
one-line errors for folders of the wrong kind."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import DiTPipeline, FluxPipeline, StableDiffusion3Pipeline, Transformer2DModel

from dibregman.networks.discriminator import Critic
from dibregman.teachers import load_teacher
from dibregman.teachers.diffusers import ddim_sigmas
from dibregman.teachers.dit import DiTTeacher
from dibregman.teachers.flux import FluxTeacher, pack_latents, unpack_latents
from dibregman.teachers.latent import block_at_depth
from dibregman.teachers.sd3 import SD3Teacher
from tiny_flow_hf import TEXT_LENGTH, tiny_dit_components, tiny_flux_components, tiny_sd3_components

PROMPTS = ["a cat", "dog on a mat"]
STEPS = 4
TOL = 1e-5  # relative error of a whole chain; the float paths differ by ~2e-7


def sd3_teacher(parts, **kw) -> SD3Teacher:
    names = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    t5 = (parts.get("text_encoder_3"), parts.get("tokenizer_3"))
    return SD3Teacher(*(parts[k] for k in names), *t5, parts["scheduler"], max_sequence_length=TEXT_LENGTH, **kw)


def flux_teacher(parts, **kw) -> FluxTeacher:
    names = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
    return FluxTeacher(*(parts[k] for k in names), max_sequence_length=TEXT_LENGTH, resolution=16, **kw)


def edm_ddim(denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond) -> torch.Tensor:
    """Euler on the probability-flow ODE in EDM form: x_{i+1} = x0_hat + (sigma_{i+1} / sigma_i)(x_i - x0_hat)."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        x0 = denoiser(x, s, cond).double()
        x = x0 + (s_next / s) * (x - x0)
    return x


def flow_chain(teacher, z: torch.Tensor, prompts) -> torch.Tensor:
    """Our chain over the pipeline's sigmas, from x_T = z (t = 1) to the final latents x_0."""
    sigmas = teacher.sampling_sigmas(STEPS)
    return edm_ddim(teacher, z.double() * (1 + sigmas[0]), sigmas, prompts).float()  # x_edm = x_t / (1 - t)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---- parity with the pipelines ---------------------------------------------------------------------------
@pytest.mark.parametrize("t5", [True, False], ids=["t5", "no-t5"])
@torch.no_grad()
def test_sd3_guided_euler_parity_with_the_pipeline(t5):
    parts = tiny_sd3_components(seed=0, t5=t5)
    pipe = StableDiffusion3Pipeline(**{"text_encoder_3": None, "tokenizer_3": None, **parts})
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    kw = dict(num_inference_steps=STEPS, latents=z, output_type="latent", max_sequence_length=TEXT_LENGTH)
    ref = pipe(PROMPTS, guidance_scale=3.0, **kw).images
    teacher = sd3_teacher(parts, guidance_scale=3.0)
    seq, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, max_sequence_length=TEXT_LENGTH)
    emb = teacher.encode_prompts(PROMPTS)
    assert torch.equal(emb.seq, seq) and torch.equal(emb.pooled, pooled)
    assert teacher.sampling_shift == 3.0 and teacher.sampling_sigmas(STEPS)[0] > 1e6  # t = 1 clamped
    err = rel(flow_chain(teacher, z, PROMPTS), ref)
    assert err < TOL, err
    teacher.guidance_scale = 1.0  # the test can fail: without guidance the chain is far off
    assert rel(flow_chain(teacher, z, PROMPTS), ref) > 100 * TOL


@pytest.mark.parametrize("guidance_embeds", [False, True], ids=["true-cfg", "guidance-distilled"])
@torch.no_grad()
def test_flux_euler_parity_with_the_pipeline(guidance_embeds):
    parts = tiny_flux_components(seed=0, guidance_embeds=guidance_embeds)
    pipe = FluxPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    kw = dict(num_inference_steps=STEPS, latents=pack_latents(z), output_type="latent", height=16, width=16)
    guide = dict(guidance_scale=3.0) if guidance_embeds else dict(true_cfg_scale=3.0, negative_prompt=["", ""])
    ref = unpack_latents(pipe(PROMPTS, max_sequence_length=TEXT_LENGTH, **kw, **guide).images, 8, 8)
    teacher = flux_teacher(parts, guidance_scale=3.0)
    assert teacher.guidance() == ((1.0, 3.0) if guidance_embeds else (3.0, None))
    seq, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=TEXT_LENGTH)
    emb = teacher.encode_prompts(PROMPTS)
    assert torch.equal(emb.seq, seq) and torch.equal(emb.pooled, pooled)
    assert teacher.dynamic_mu == pytest.approx(0.5 + (16 - 4) * 0.65 / 60)  # 16 image tokens
    err = rel(flow_chain(teacher, z, PROMPTS), ref)
    assert err < TOL, err
    teacher.guidance_scale = 1.0
    assert rel(flow_chain(teacher, z, PROMPTS), ref) > 100 * TOL


def test_flux_packing_round_trips_and_orders_patches_row_major():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    tokens = pack_latents(x)
    assert tokens.shape == (2, 2 * 3, 12) and torch.equal(unpack_latents(tokens, 4, 6), x)
    assert torch.equal(tokens[0, 1], x[0, :, 0:2, 2:4].reshape(3, 4).flatten())  # token (0, 1): channel-major 2x2
    assert torch.equal(tokens, FluxPipeline._pack_latents(x, 2, 3, 4, 6))


@torch.no_grad()
def test_dit_guided_ddim_parity_with_the_pipeline():
    parts = tiny_dit_components(seed=0)
    pipe = DiTPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z, **kw: (seen.append(z), decode(z, **kw))[1]  # the pipeline's final latents
    labels = [3, 517]
    pipe(labels, guidance_scale=4.0, num_inference_steps=6, generator=torch.Generator().manual_seed(1))
    pipe.vae.decode = decode
    ref = seen[0] * pipe.vae.config.scaling_factor

    teacher = DiTTeacher(parts["transformer"], parts["vae"], parts["scheduler"], guidance_scale=4.0)
    assert teacher.num_classes == 1000 and teacher.shape == (4, 8, 8)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))  # the pipeline's randn_tensor draw
    sigmas = ddim_sigmas(parts["scheduler"], 6)

    def chain():
        x = edm_ddim(teacher, z.double() * (1 + sigmas[0] ** 2).sqrt(), sigmas.double(), torch.tensor(labels))
        return (x / (1 + sigmas[-1] ** 2).sqrt()).float()

    err = rel(chain(), ref)
    assert err < TOL, err
    teacher.guidance_scale = 1.0
    assert rel(chain(), ref) > 100 * TOL
    x = torch.randn(3, 4, 8, 8)
    x_vp, t, s = teacher.model_input(x, 2.0)  # None: the null class 1000; the variance half is split off
    eps = parts["transformer"](x_vp, timestep=t, class_labels=torch.full((3,), 1000)).sample[:, :4]
    torch.testing.assert_close(teacher(x, 2.0), x - s * eps)
    with pytest.raises(ValueError, match="class labels in"):
        teacher(x, 2.0, torch.tensor([0, 1, 1000]))


# ---- the discriminator's feature tap ----------------------------------------------------------------------
def test_depth_names_a_block():
    blocks = list(range(24))
    assert [block_at_depth(blocks, f) for f in (0.5, 0.75, 0.99, 1.0, 0.01)] == [11, 17, 23, 23, 0]
    assert [block_at_depth(list(range(4)), f) for f in (0.25, 0.5, 0.75, 1.0)] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"feature depth must lie in \(0, 1\]"):
        block_at_depth(blocks, 0.0)


def _copies():
    sd3 = sd3_teacher(tiny_sd3_components(seed=2))
    flux = flux_teacher(tiny_flux_components(seed=2, guidance_embeds=True))
    dit = tiny_dit_components(seed=2)
    dit = DiTTeacher(dit["transformer"], dit["vae"], dit["scheduler"])
    return {
        "sd3": (sd3.unguided(sd3.network), sd3, sd3.network.transformer_blocks, PROMPTS),
        "flux": (flux.unguided(flux.network), flux, [*flux.network.transformer_blocks,
                                                     *flux.network.single_transformer_blocks], PROMPTS),
        "dit": (dit, dit, dit.transformer.transformer_blocks, torch.tensor([5, 7])),
    }  # fmt: skip


@pytest.mark.parametrize("depth", [0.5, 0.75, 1.0])
def test_the_tap_reads_the_chosen_block_and_the_head_gets_gradients(depth):
    for name, (den, owner, blocks, cond) in _copies().items():
        owner.feature_depth = depth
        index = block_at_depth(range(len(blocks)), depth)
        seen = {}
        hooks = [b.register_forward_hook(lambda m, a, out, i=i, seen=seen: seen.setdefault(i, out))
                 for i, b in enumerate(blocks)]  # fmt: skip
        x, sigma = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3.0, 0.4])
        f = den.features(x, sigma, cond)
        for h in hooks:
            h.remove()
        assert sorted(seen) == list(range(index + 1)), (name, sorted(seen))  # stops at the chosen block
        tokens = seen[index][1] if isinstance(seen[index], tuple) else seen[index]
        assert f.shape == (2, den.feature_channels, 4, 4), name
        assert torch.equal(f, tokens.transpose(1, 2).reshape(f.shape)), name

        critic = Critic(den, "linear")  # the head on psi = den's features, reached through forward
        head = critic.disc
        torch.nn.init.normal_(head.linear.weight)  # zero-initialised: give the features a gradient path
        den.requires_grad_(True)
        critic(x, sigma, cond, logit=True).sum().backward()
        assert head.linear.weight.grad.abs().sum() > 0, name
        grads = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in b.parameters()) for b in blocks]
        assert grads == [i <= index for i in range(len(blocks))], (name, grads)  # none past the tap
        den.requires_grad_(False)


# ---- folders and errors ---------------------------------------------------------------------------------------
@torch.no_grad()
def test_folders_load_and_wrong_kinds_fail_in_one_line(tmp_path):
    sd3_dir, flux_dir, dit_dir = tmp_path / "sd3", tmp_path / "flux", tmp_path / "dit"
    parts = tiny_sd3_components(sd3_dir, seed=4)
    tiny_flux_components(flux_dir, seed=4)
    tiny_dit_components(dit_dir, seed=4)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    loaded = load_teacher(f"sd3:{sd3_dir}", max_sequence_length=TEXT_LENGTH, guidance_scale=2.0)
    torch.testing.assert_close(loaded(x, 1.3, PROMPTS), sd3_teacher(parts, guidance_scale=2.0)(x, 1.3, PROMPTS))
    flux = load_teacher(f"flux:{flux_dir}", resolution=16)
    assert flux.shape == (4, 8, 8) and load_teacher(f"flux:{flux_dir}").shape == (4, 512, 512)  # 1024 px
    assert isinstance(load_teacher(f"dit:{dit_dir}"), DiTTeacher)

    with pytest.raises(ValueError, match=r"needs SD3Transformer2DModel \(it looks like a flux:DIR folder\)"):
        load_teacher(f"sd3:{flux_dir}")
    with pytest.raises(FileNotFoundError, match=r"lacks subfolder\(s\) \['text_encoder'.*looks like a dit:DIR"):
        load_teacher(f"flux:{dit_dir}")
    with pytest.raises(FileNotFoundError, match="dit: folder not found"):
        load_teacher(f"dit:{tmp_path / 'nowhere'}")
    shutil.rmtree(sd3_dir / "vae")
    with pytest.raises(FileNotFoundError, match=r"lacks subfolder\(s\) \['vae'\]; a sd3: teacher needs all of"):
        load_teacher(f"sd3:{sd3_dir}")
    (flux_dir / "transformer" / "config.json").unlink()
    with pytest.raises(ValueError, match="holds a folder without config.json; a flux: teacher needs Flux"):
        load_teacher(f"flux:{flux_dir}")


@torch.no_grad()
def test_dit_published_as_transformer2dmodel_loads_with_its_weights(tmp_path):
    """facebook/DiT-XL-2-* name their transformer `Transformer2DModel` (ada_norm_zero); the same weights load."""
    parts = tiny_dit_components(tmp_path, seed=5)
    torch.manual_seed(6)
    legacy = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                                norm_type="ada_norm_zero", norm_elementwise_affine=False).eval()  # fmt: skip
    shutil.rmtree(tmp_path / "transformer")
    legacy.save_pretrained(tmp_path / "transformer")
    assert json.loads((tmp_path / "transformer" / "config.json").read_text())["_class_name"] == "Transformer2DModel"
    teacher = load_teacher(f"dit:{tmp_path}")
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([1, 2])
    ref = legacy(x, timestep=t, class_labels=y).sample
    torch.testing.assert_close(teacher.transformer(x, timestep=t, class_labels=y).sample, ref)
    assert not torch.allclose(parts["transformer"](x, timestep=t, class_labels=y).sample, ref)  # other weights
