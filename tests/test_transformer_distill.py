"""Distillation with transformer teachers on tiny pipelines (CPU): SD3 and FLUX through the text-to-image recipe,
a class-conditional DiT through the native recipe with labels as conditions. Each trains, resumes bitwise (an
interrupted run equals an uninterrupted one) and exports what reloads into the same samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dibregman import trainer_state
from dibregman.build import build_models
from dibregman.conditions import LabelSet
from dibregman.config import override, validate
from dibregman.draws import draw_batch
from dibregman.generators import generate, load_generator, sample_export
from dibregman.loop import Trainer
from dibregman.presets import get_preset
from dibregman.teachers.flux import image_ids, pack_latents, unpack_latents
from dibregman.teachers.t2i import META_NAME, sample_images
from tiny_flow_hf import tiny_dit_components, tiny_flux_components, tiny_sd3_components

PROMPTS = ["a cat", "dog on a mat", "a red house"]
BATCH = 2


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    tiny_sd3_components(root / "sd3", seed=0)
    tiny_flux_components(root / "flux", seed=0, guidance_embeds=True)  # guidance-distilled: copies keep the input
    tiny_dit_components(root / "dit", seed=0)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def run_cfg(folders, kind: str, steps: int, **pairs):
    """A tiny run of `kind` (sd3 | flux: text-to-image preset; dit: native preset with labels)."""
    common = {
        "model.teacher": f"{kind}:{folders / kind}",
        "model.teacher_pool": 4,
        "model.teacher_pool_steps": 2,
        "model.feature_depth": 0.75,
        "optim.batch_size": BATCH,
        "optim.gen_lr": 1e-3,
        "optim.fake_lr": 1e-3,
        "loss.gan_weight": 0.1,
        "loss.gan_warmup_kimg": 0.0,
        "optim.lr_schedule": "constant",  # a split run stops early by a shorter total_kimg
        "run.total_kimg": steps * BATCH / 1000,
        "run.log_every_kimg": BATCH / 1000,
        "run.ckpt_every_kimg": 2 * BATCH / 1000,
        "run.sample_every_kimg": steps * BATCH / 1000,
        "run.tensorboard": False,
        "run.device": "cpu",
    }
    if kind == "dit":
        return validate(override(get_preset("mnist"), {**common, "model.real": "teacher", **pairs}))
    text = {"model.prompts": str(folders / "prompts.txt"), "model.resolution": 16, "optim.accum_steps": 1}
    return validate(override(get_preset("sd15"), {**common, **text, **pairs}))


def assert_resumes_bitwise(folders, kind: str, tmp_path, **pairs) -> Trainer:
    """4 steps in one go == 2 steps, stop, resume, 2 more: every network and the EMA bitwise; returns the first."""
    full = Trainer(run_cfg(folders, kind, 4, **pairs), tmp_path / "full")
    assert full.m.teacher.guidance_scale == full.cfg.model.guidance_scale
    out = full.train()
    assert out["steps"] == 4 and out["bad_steps"] == 0
    Trainer(run_cfg(folders, kind, 2, **pairs), tmp_path / "split").train()
    resumed = Trainer(run_cfg(folders, kind, 4, **pairs), tmp_path / "split")
    assert resumed.state.step == 2
    resumed.train()
    trained, copied = full.m.generator.denoiser.network, full.m.teacher.network
    assert any(not torch.equal(p, q) for p, q in zip(trained.parameters(), copied.parameters(), strict=True))
    for name in ("generator", "fake", "disc", "ema"):
        a, b = trainer_state.state_dict(full)[name], trainer_state.state_dict(resumed)[name]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    return full


# ---- text to image: sd3 and flux ---------------------------------------------------------------------------
def plain_one_step(folder, meta: dict, teacher, z: torch.Tensor, prompts) -> torch.Tensor:
    """The export's one step by its dibregman.json, with diffusers' transformer class only (our text encoding)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    emb = teacher.encode_prompts(prompts)
    x_t, n = meta["input_scale"] * z, len(z)
    if meta["family"] == "sd3":
        net = SD3Transformer2DModel.from_pretrained(folder / "transformer", local_files_only=True)
        t = torch.full((n,), meta["timestep"])
        v = net(x_t, encoder_hidden_states=emb.seq, pooled_projections=emb.pooled, timestep=t).sample
    else:
        net = FluxTransformer2DModel.from_pretrained(folder / "transformer", local_files_only=True)
        out = net(hidden_states=pack_latents(x_t), timestep=torch.full((n,), meta["timestep"]),
                  guidance=torch.full((n,), meta["guidance"]), pooled_projections=emb.pooled,
                  encoder_hidden_states=emb.seq, txt_ids=torch.zeros(emb.seq.shape[1], 3),
                  img_ids=image_ids(4, 4)).sample  # fmt: skip
        v = unpack_latents(out, 8, 8)
    return meta["input_scale"] * (z - v)


VARIANTS = {  # SD3: LoRA fake score with gradient checkpointing (the tap stops inside it); FLUX: head on the teacher
    "sd3": {"model.fake_lora_rank": 2, "model.grad_checkpointing": True},
    "flux": {"model.disc_placement": "teacher"},
}


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_text_to_image_run_resumes_bitwise_and_its_export_reloads(folders, kind, tmp_path):
    full = assert_resumes_bitwise(folders, kind, tmp_path, **VARIANTS[kind])
    m = full.m
    assert m.teacher.shape == (4, 8, 8) and m.teacher.feature_depth == 0.75
    assert m.generator.denoiser.text is m.teacher and m.fake.text is m.teacher  # frozen parts shared
    for net in (m.generator, m.fake, m.disc):  # only transformer weights (and the head) are held
        assert all(k.startswith(("denoiser.transformer.", "transformer.", "linear.")) for k in net.state_dict())
    guidance = m.generator.denoiser.guidance
    assert guidance == (3.0 if kind == "flux" else None)  # FLUX-dev style copies keep the guidance input
    assert list((full.run_dir / "samples").glob("*.png")), "VAE-decoded preview written"

    folder = full.run_dir / "diffusers"
    meta = json.loads((folder / META_NAME).read_text())
    assert meta["family"] == kind and meta["one_step"] and (folder / "transformer" / "config.json").is_file()
    assert meta["timestep"] == pytest.approx(2.5 / 3.5 * (1000 if kind == "sd3" else 1))
    gen, _ = load_generator(full.run_dir)
    a, b = sample_images(full.ema, PROMPTS[:2], seed=7), sample_images(gen, PROMPTS[:2], seed=7)
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(plain_one_step(folder, meta, m.teacher, z, PROMPTS[:2]), full.ema(z, PROMPTS[:2]))


def test_text_to_image_config_errors(folders):
    with pytest.raises(ValueError, match=r"model.prompts is empty: a text-to-image teacher \(flux:DIR\)"):
        validate(override(get_preset("sd15"), {"model.teacher": f"flux:{folders / 'flux'}"}))
    with pytest.raises(ValueError, match=r"model.feature_depth=0.0 must lie in \(0, 1\]"):
        run_cfg(folders, "sd3", 1, **{"model.feature_depth": 0.0})
    with pytest.raises(ValueError, match="resolution 10 must be a positive multiple of 4"):
        build_models(run_cfg(folders, "flux", 1, **{"model.resolution": 10}), torch.device("cpu"))


# ---- class-conditional DiT: the native recipe with labels -----------------------------------------------------
def test_dit_run_with_labels_resumes_bitwise_and_its_export_reloads(folders, tmp_path):
    full = assert_resumes_bitwise(folders, "dit", tmp_path, **{"model.guidance_scale": 2.0})
    m = full.m
    assert isinstance(m.conditions, LabelSet) and len(m.conditions) == 1000 and m.real_conditions is m.conditions
    assert m.teacher.guidance_scale == 2.0 and m.generator.denoiser.guidance_scale == 1.0 == m.fake.guidance_scale
    assert m.fake.feature_depth == 0.75 and m.fake.vae is m.teacher.vae  # the VAE is shared, never copied
    ema_keys = trainer_state.state_dict(full)["ema"]
    assert all(k.startswith(("denoiser.transformer.", "transformer.", "linear.")) for k in ema_keys)
    b, real = draw_batch(full.cfg, m, 0, 0, BATCH, "cpu", full.sigma_range)
    assert b.cond.dtype == torch.int64 and b.cond.shape == (BATCH,) and b.real_cond.shape == (BATCH,)
    assert real.shape == (BATCH, 4, 8, 8)

    gen, meta = load_generator(full.run_dir)
    assert meta["network"]["type"] == "teacher-copy"
    labels = torch.tensor([0, 5, 999, 5])
    assert torch.equal(generate(full.ema, 4, seed=1, cond=labels), generate(gen, 4, seed=1, cond=labels))
    x, ncol = sample_export(gen, meta, 4, [], seed=0)  # `dibregman sample`: decoded images, a class per column
    assert x.shape == (4, 3, 16, 16) and ncol == 4 and x.abs().max() <= 1


def test_dit_real_side_from_labelled_images_is_encoded_by_the_vae(folders, tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, images=rng.integers(0, 255, (6, 3, 16, 16), dtype=np.uint8), labels=np.arange(6) * 100)
    m = build_models(run_cfg(folders, "dit", 1, **{"model.real": f"npz:{data}"}), torch.device("cpu"))
    x, labels = m.real(torch.Generator().manual_seed(0), 5)
    assert x.shape == (5, 4, 8, 8) and set(labels.tolist()) <= {0, 100, 200, 300, 400, 500}
    np.savez(data, images=rng.integers(0, 255, (6, 3, 16, 16), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"needs labels in \[0, 1000\) for a class-conditional teacher"):
        build_models(run_cfg(folders, "dit", 1, **{"model.real": f"npz:{data}"}), torch.device("cpu"))
