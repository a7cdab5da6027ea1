"""LoRA students of text-to-image teachers on tiny pipelines (CPU): trained a few steps (resuming bitwise), exported
as one `pytorch_lora_weights.safetensors` + dibregman.json, and loaded by stock diffusers (`load_lora_weights` on
the base pipeline built from the same components) into the student's own samples, with the scheduler settings the
export records; `dibregman sample` reads the LoRA export as it reads a diffusers folder; the card's sampling code
is the recorded recipe."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch

from dibregman import checkpoint as ckpt
from dibregman import trainer_state
from dibregman.cli import main
from dibregman.config import override
from dibregman.export import LORA_WEIGHTS, one_step_latents
from dibregman.generators import load_generator
from dibregman.loop import Trainer
from dibregman.presets import get_preset
from dibregman.teachers.t2i import sample_images
from tiny_flow_hf import tiny_flux_components, tiny_sd3_components
from tiny_hf import tiny_sd_components

PROMPTS = ["a cat", "dog on a mat", "a red house"]
BATCH = 2


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    tiny_sd_components(root / "sd", seed=0)
    (root / "sd" / "README.md").write_text("---\nlicense: creativeml-openrail-m\ntags: [tiny]\n---\n# a teacher\n")
    tiny_sd3_components(root / "sd3", seed=0)
    tiny_flux_components(root / "flux", seed=0, guidance_embeds=True)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def lora_cfg(folders, kind: str, steps: int, **pairs):
    """A tiny text-to-image run with a LoRA student (rank 4) and a LoRA psi (rank 2)."""
    return override(
        get_preset("sd15"),
        {
            "model.teacher": f"{kind}:{folders / kind}", "model.prompts": str(folders / "prompts.txt"),
            "model.student_lora_rank": 4, "model.fake_lora_rank": 2, "model.teacher_pool": 4,
            "model.teacher_pool_steps": 2, "optim.batch_size": BATCH, "optim.accum_steps": 1, "optim.gen_lr": 1e-2,
            "optim.fake_lr": 1e-3, "loss.gan_weight": 0.1, "loss.gan_warmup_kimg": 0.0,
            "optim.ema_halflife_kimg": 0.0,  # the EMA is G: the exported student differs from the teacher
            "optim.lr_schedule": "constant", "run.total_kimg": steps * BATCH / 1000, "run.log_every_kimg": BATCH / 1000,
            "run.ckpt_every_kimg": BATCH / 1000, "run.sample_every_kimg": 0.0, "run.tensorboard": False,
            **({} if kind == "sd" else {"model.resolution": 16, "model.feature_depth": 0.75}), **pairs,
        },
    )  # fmt: skip


def stock_pipeline(folders, kind: str):
    """The base pipeline of the teacher's components, loaded by diffusers itself (no dibregman code)."""
    if kind != "sd":
        cls = {"sd3": diffusers.StableDiffusion3Pipeline, "flux": diffusers.FluxPipeline}[kind]
        pipe = cls.from_pretrained(folders / kind, local_files_only=True)
    else:  # the tiny SD folder has no model_index.json: its components one by one
        from transformers import CLIPTextModel, CLIPTokenizer

        root, kw = folders / "sd", dict(local_files_only=True)
        pipe = diffusers.StableDiffusionPipeline(
            vae=diffusers.AutoencoderKL.from_pretrained(root / "vae", **kw),
            text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder", **kw),
            tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer", **kw),
            unet=diffusers.UNet2DConditionModel.from_pretrained(root / "unet", **kw),
            scheduler=diffusers.DDIMScheduler.from_pretrained(root / "scheduler", **kw),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def run_recipe(pipe, meta: dict, z: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The student's latents through the stock pipeline, following the export's recorded settings."""
    recipe = meta["diffusers"]
    sched = recipe["scheduler"]
    pipe.scheduler = getattr(diffusers, sched["class"]).from_config(pipe.scheduler.config, **sched["config"])
    out = pipe(prompts, latents=one_step_latents(meta, z), output_type="latent", **recipe["call"]).images
    if recipe.get("latents_packed"):
        from dibregman.teachers.flux import unpack_latents

        out = unpack_latents(out, *z.shape[-2:])
    return out


@pytest.mark.parametrize("kind", ["sd", "sd3", "flux"])
def test_lora_student_loads_in_stock_diffusers_and_reproduces_its_samples(folders, kind, tmp_path):
    tr = Trainer(lora_cfg(folders, kind, 2), tmp_path / "run")
    out = tr.train()
    assert out["bad_steps"] == 0
    folder = tr.run_dir / "lora"
    assert out["export"] == str(folder) and not (tr.run_dir / "diffusers").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "dibregman.json", LORA_WEIGHTS]
    meta = json.loads((folder / "dibregman.json").read_text())
    assert meta["format"] == "lora" and meta["sigmas"] == [2.5] and meta["num_steps"] == 1
    assert meta["base_model"] == f"{kind}:{folders / kind}" and meta["num_images"] == 2 * BATCH
    assert meta["recipe"]["divergence"] == tr.cfg.divergence.name

    prompts, z = PROMPTS[:2], torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = tr.ema(z, prompts)
    pipe = stock_pipeline(folders, kind)
    base = run_recipe(pipe, meta, z, prompts)  # the teacher's network, no adapters: far from the student
    assert (base - ours).abs().max() > 1e-2
    pipe.load_lora_weights(folder)  # stock diffusers + PEFT: one line
    torch.testing.assert_close(run_recipe(pipe, meta, z, prompts), ours, atol=1e-5, rtol=1e-5)

    gen, meta2 = load_generator(tr.run_dir)  # `dibregman sample` reads the LoRA export: bitwise the EMA student
    assert meta2 == meta and torch.equal(sample_images(gen, prompts, seed=7), sample_images(tr.ema, prompts, seed=7))
    png = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(folder), "--num", "2", "--prompt", "a cat", "--out", str(png)]) == 0
    assert png.is_file()
    card = (folder / "README.md").read_text()
    recipe = meta["diffusers"]
    assert f"from diffusers import {recipe['pipeline']}, {recipe['scheduler']['class']}" in card
    assert f'pipe.load_lora_weights("{folder}")' in card and f"sigmas={recipe['call']['sigmas']!r}" in card
    licence = "creativeml-openrail-m" if kind == "sd" else None  # copied from the teacher's own model card
    assert f"license: {licence or 'other'}\n" in card and (licence is None or f"`{licence}`, copied" in card)


def test_lora_student_resumes_bitwise(folders, tmp_path):
    full = Trainer(lora_cfg(folders, "sd", 4), tmp_path / "full")
    full.train()
    Trainer(lora_cfg(folders, "sd", 2), tmp_path / "split").train()
    resumed = Trainer(lora_cfg(folders, "sd", 4), tmp_path / "split")
    assert resumed.state.step == 2
    resumed.train()
    x, y = trainer_state.state_dict(full), trainer_state.state_dict(resumed)
    for name in ("generator", "fake", "disc", "ema", "opt_g", "opt_c"):
        assert ckpt.content_checksum(x[name]) == ckpt.content_checksum(y[name]), name
    assert all(".lora_" in k for k in x["generator"])  # checkpoints hold the adapters only
    trained = full.m.generator.denoiser.unet.state_dict()
    assert any(bool(v.abs().sum() > 0) for k, v in trained.items() if ".lora_B." in k)
