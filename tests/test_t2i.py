"""Text-to-image distillation on tiny Stable-Diffusion parts (CPU): only the teacher is guided, the frozen VAE
and text encoder are shared, condition files parse, runs go end to end (data-free and on captioned images),
and the diffusers export reloads into identical one-step images."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dibregman import trainer_state
from dibregman.build import build_models
from dibregman.cli import main
from dibregman.conditions import load_image, read_captioned_images, read_prompts
from dibregman.config import override, validate
from dibregman.draws import draw_batch
from dibregman.generators import load_generator
from dibregman.loop import Trainer
from dibregman.presets import get_preset
from dibregman.teachers.t2i import META_NAME, sample_images, trainable_copy
from tiny_hf import tiny_sd_components

PROMPTS = ["a cat", "dog on a mat", "a red house", "two birds"]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    tiny_sd_components(root, seed=0)
    return root


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def t2i_cfg(sd_dir, prompts_file, steps: int = 2, **pairs):
    batch = 2
    return override(
        get_preset("sd15"),
        {
            "model.teacher": f"sd:{sd_dir}",
            "model.prompts": str(prompts_file),
            "model.teacher_pool": 4,
            "model.teacher_pool_steps": 2,
            "optim.batch_size": batch,
            "optim.accum_steps": 1,
            "optim.gen_lr": 1e-3,
            "optim.fake_lr": 1e-3,
            "loss.gan_warmup_kimg": 0.0,
            "run.total_kimg": steps * batch / 1000,
            "run.log_every_kimg": batch / 1000,
            "run.sample_every_kimg": steps * batch / 1000,
            "run.tensorboard": False,
            **pairs,
        },
    )


@pytest.fixture(scope="module")
def data_free_run(sd_dir, prompts_file, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    trainer = Trainer(t2i_cfg(sd_dir, prompts_file), run_dir)
    return trainer, trainer.train()


# ---- condition data ----------------------------------------------------------------------------------------
def test_prompt_files_in_every_format(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    (tmp_path / "p.csv").write_text('id,Caption\n1,a cat\n2,"a dog, running"\n')
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n{"text": "a dog"}\n"a bird"\n')
    (tmp_path / "p.json").write_text('["a cat", {"caption": "a dog"}]')
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    assert read_prompts(tmp_path / "p.csv") == ["a cat", "a dog, running"]
    assert read_prompts(tmp_path / "p.jsonl") == ["a cat", "a dog", "a bird"]
    assert read_prompts(tmp_path / "p.json") == ["a cat", "a dog"]
    (tmp_path / "bad.csv").write_text("id,label\n1,cat\n")
    with pytest.raises(ValueError, match="prompt.*caption.*text"):
        read_prompts(tmp_path / "bad.csv")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError):
        read_prompts(tmp_path / "nowhere.txt")


def _png(path, h=12, w=20, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def test_captioned_image_folders(tmp_path):
    pairs_dir = tmp_path / "pairs"
    pairs_dir.mkdir()
    for i, cap in enumerate(["a cat", "a dog"]):
        _png(pairs_dir / f"im{i}.png", seed=i)
        (pairs_dir / f"im{i}.txt").write_text(cap + "\n")
    assert [c for _, c in read_captioned_images(pairs_dir)] == ["a cat", "a dog"]
    meta_dir = tmp_path / "meta"
    meta_dir.mkdir()
    _png(meta_dir / "x.png")
    (meta_dir / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "a house"}) + "\n")
    assert read_captioned_images(meta_dir) == [(meta_dir / "x.png", "a house")]
    _png(pairs_dir / "orphan.png")
    with pytest.raises(ValueError, match="lack a caption"):
        read_captioned_images(pairs_dir)
    x = load_image(meta_dir / "x.png", 16, 16)  # 12x20 -> cover 16x16 -> centre crop
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1


def test_config_errors(sd_dir, prompts_file, tmp_path):
    with pytest.raises(ValueError, match="model.prompts is empty"):
        validate(override(get_preset("sd15"), {"model.teacher": f"sd:{sd_dir}"}))
    with pytest.raises(ValueError, match="takes no text conditions"):
        build_models(override(get_preset("gmm"), {"model.prompts": str(prompts_file)}), torch.device("cpu"))
    with pytest.raises(ValueError, match="captions:DIR"):
        build_models(t2i_cfg(sd_dir, prompts_file, **{"model.real": "mnist:data"}), torch.device("cpu"))
    with pytest.raises(ValueError, match="no captioned images"):  # the SD folder holds no images
        build_models(t2i_cfg(sd_dir, prompts_file, **{"model.real": f"captions:{sd_dir}"}), torch.device("cpu"))


# ---- networks ----------------------------------------------------------------------------------------------
@torch.no_grad()
def test_only_the_teacher_is_guided_and_frozen_parts_are_shared(sd_dir, prompts_file):
    m = build_models(t2i_cfg(sd_dir, prompts_file, **{"model.guidance_scale": 4.0}), torch.device("cpu"))
    teacher, den, fake = m.teacher, m.generator.denoiser, m.fake
    assert teacher.guidance_scale == 4.0 and den.text is teacher and fake.text is teacher
    x = 2.0 * torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma, cond = torch.tensor([5.0, 1.0, 0.2]), teacher.encode_prompts(PROMPTS[:3])
    d_c, d_u = fake(x, sigma, cond), fake(x, sigma)  # the copies: plain conditional / unconditional models
    assert torch.equal(den(x, sigma, cond), d_c)
    torch.testing.assert_close(teacher(x, sigma, cond), d_u + 4.0 * (d_c - d_u), atol=5e-5, rtol=1e-5)
    teacher.guidance_scale = 1.0
    torch.testing.assert_close(teacher(x, sigma, cond), d_c, atol=1e-6, rtol=1e-6)
    for net in (m.generator, fake, m.disc, copy.deepcopy(m.generator)):  # only UNet weights are held
        assert all(k.startswith(("denoiser.unet.", "unet.", "linear.")) for k in net.state_dict()), type(net)
    assert copy.deepcopy(m.generator).denoiser.text is teacher  # the EMA copy shares the frozen parts too
    trainable = {id(p) for p in m.generator.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in den.unet.parameters()}
    assert not any(p.requires_grad for p in teacher.parameters())


@torch.no_grad()
def test_features_are_the_mid_block_output(sd_dir):
    parts = tiny_sd_components(seed=1)
    from dibregman.teachers.sd import StableDiffusionTeacher

    teacher = StableDiffusionTeacher(*(parts[k] for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")))
    fake = trainable_copy(teacher)
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 0.5])
    seen = []
    hook = fake.unet.mid_block.register_forward_hook(lambda mod, args, out: seen.append(out))
    fake(x, sigma, PROMPTS[:2])
    hook.remove()
    f = fake.features(x, sigma, PROMPTS[:2])
    assert f.shape == (2, fake.feature_channels, 4, 4) and torch.equal(f, seen[0])
    assert not fake.unet.mid_block._forward_hooks  # the early-exit hook is removed again

    lora = trainable_copy(teacher, lora_rank=4)
    assert torch.equal(lora(x, sigma, PROMPTS[:2]), fake(x, sigma, PROMPTS[:2]))  # B = 0: starts as the copy
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(("lora_A.default.weight", "lora_B.default.weight")) for n in names)
    assert set(lora.state_dict()) == set(names)  # the base is the teacher's: never in a state dict


# ---- end to end --------------------------------------------------------------------------------------------
def test_data_free_run_exports_a_diffusers_folder_that_reloads_identically(data_free_run):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    trainer, out = data_free_run
    assert out["steps"] == 2 and out["bad_steps"] == 0
    assert list((trainer.run_dir / "samples").glob("*.png")), "VAE-decoded preview grid written"
    folder = trainer.run_dir / "diffusers"
    assert out["export"] == str(folder)
    meta = json.loads((folder / META_NAME).read_text())
    assert meta["one_step"] and meta["sigma_init"] == 2.5
    prompts = PROMPTS[:2]
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = trainer.ema(z, prompts)
        # plain diffusers/transformers on the exported folder, following dibregman.json
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
        tok = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        text = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        t = torch.full((2,), meta["timestep"])
        eps = unet(meta["input_scale"] * z, t, encoder_hidden_states=text(ids)[0]).sample
        theirs = meta["sigma_init"] * (z - eps)
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
        vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True)
        images = vae.decode(theirs / vae.config.scaling_factor).sample.clamp(-1, 1)

    gen, meta2 = load_generator(trainer.run_dir)  # through dibregman: bitwise the in-memory EMA generator
    assert meta2["kind"] == meta["kind"]
    a = sample_images(trainer.ema, prompts, seed=7)
    b = sample_images(gen, prompts, seed=7)
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b)
    torch.testing.assert_close(sample_images(gen, prompts, seed=3), images, atol=1e-4, rtol=1e-4)


def test_cli_sample_prompt(data_free_run, tmp_path):
    trainer, _ = data_free_run
    png = tmp_path / "grid.png"
    args = ["sample", "--checkpoint", str(trainer.run_dir), "--num", "4", "--out", str(png)]
    assert main([*args, "--prompt", "a cat", "--prompt", "a dog"]) == 0 and png.is_file()
    assert main(args) == 2  # a text-to-image export needs prompts


def test_conditions_are_drawn_per_step_and_sliced(data_free_run):
    trainer, _ = data_free_run
    draw = lambda step: draw_batch(trainer.cfg, trainer.m, step, 0, 2, "cpu", trainer.sigma_range)  # noqa: E731
    (b1, r1), (b2, r2), (b3, _) = draw(5), draw(5), draw(6)
    assert b1.cond.shape == (2, 77, 32) and b1.real_cond.shape == (2, 77, 32)
    assert torch.equal(b1.cond, b2.cond) and torch.equal(b1.real_cond, b2.real_cond) and torch.equal(r1, r2)
    assert not torch.equal(b1.z, b3.z)


def test_captioned_images_with_lora_checkpointing_and_cache(sd_dir, prompts_file, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i, cap in enumerate(["a cat", "a dog", "a red house"]):
        _png(data / f"{i}.png", h=20, w=24, seed=i)
        (data / f"{i}.txt").write_text(cap)
    pairs = {"model.real": f"captions:{data}", "model.fake_lora_rank": 4, "model.grad_checkpointing": True,
             "model.real_cache": str(tmp_path / "real"), "loss.gan_weight": 0.1}  # fmt: skip
    tr = Trainer(t2i_cfg(sd_dir, prompts_file, **pairs), tmp_path / "run")
    fake0 = {k: v.clone() for k, v in tr.m.fake.state_dict().items()}
    gen0 = [p.clone() for p in tr.m.generator.parameters()]
    assert tr.m.real_conditions.prompts == ["a cat", "a dog", "a red house"]
    out = tr.train()
    assert out["steps"] == 2 and out["bad_steps"] == 0
    assert any(not torch.equal(a, b) for a, b in zip(gen0, tr.m.generator.parameters(), strict=True))
    fake1 = tr.m.fake.state_dict()
    changed = {k for k in fake0 if not torch.equal(fake0[k], fake1[k])}
    assert changed and all(k.endswith(("lora_A.default.weight", "lora_B.default.weight")) for k in changed)
    assert (tmp_path / "real.safetensors").is_file()
    again = build_models(tr.cfg, torch.device("cpu"))  # from the cache
    g = torch.Generator().manual_seed(0)
    assert torch.equal(again.real(g, 3)[0], tr.m.real(torch.Generator().manual_seed(0), 3)[0])


def test_resume_is_bitwise_exact(sd_dir, prompts_file, tmp_path):
    pairs = {"run.sample_every_kimg": 0.0, "run.ckpt_every_kimg": 0.004, "model.teacher_bf16": True}
    full = Trainer(t2i_cfg(sd_dir, prompts_file, steps=4, **pairs), tmp_path / "full")
    assert full.m.teacher.unet.dtype == torch.bfloat16 and full.m.generator.denoiser.unet.dtype == torch.float32
    full.train()
    Trainer(t2i_cfg(sd_dir, prompts_file, steps=2, **pairs), tmp_path / "split").train()
    resumed = Trainer(t2i_cfg(sd_dir, prompts_file, steps=4, **pairs), tmp_path / "split")
    assert resumed.state.step == 2
    resumed.train()
    for name in ("generator", "fake", "disc", "ema"):
        a, b = trainer_state.state_dict(full)[name], trainer_state.state_dict(resumed)[name]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
