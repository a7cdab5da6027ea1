"""Few-step students (issue 34): the sigma ladder (defaults per teacher family, one-line errors), the sampling chain
and its seeding rule, both training-input modes (they train, and feed each step what the docstring says), bitwise
resume with K > 1, export/reload equality, `sample --steps`, and K = 1 untouched (its streams, its exports)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dibregman import api, ladder
from dibregman import draws as draws_mod
from dibregman.cli import main
from dibregman.config import override
from dibregman.draws import draw_batch, generator_for
from dibregman.generators import generate, load_generator
from dibregman.loop import Trainer
from dibregman.methods.fewstep import FewStepInputs, StudentDraw
from dibregman.networks.generator import OneStepGenerator
from dibregman.networks.mlp import MLPConfig, MLPDenoiser
from dibregman.networks.student import Student, check_steps, sample_chain
from dibregman.presets import get_preset

BATCH = 16


def _gmm_cfg(steps: int = 4, **pairs):
    """A tiny GMM run (an MLP of width 16, 30 pretraining steps) of `steps` optimisation steps."""
    base = {
        "model.init_steps": 30,
        "model.mlp_hidden": 16,
        "model.mlp_depth": 2,
        "optim.batch_size": BATCH,
        "optim.lr_schedule": "constant",
        "loss.gen_warmup_kimg": 0.0,
        "loss.gan_warmup_kimg": 0.0,
        "loss.regression_pairs": 32,
        "loss.regression_steps": 3,
        "run.total_kimg": steps * BATCH / 1000,
        "run.log_every_kimg": BATCH / 1000,
        "run.ckpt_every_kimg": 1000.0,
        "run.sample_every_kimg": 0.0,
        "run.tensorboard": False,
        "run.device": "cpu",
        "model.student_steps": 2,
    }
    return override(get_preset("gmm"), {**base, **pairs})


def _mlp(seed: int = 0) -> MLPDenoiser:
    torch.manual_seed(seed)
    return MLPDenoiser(MLPConfig(dim=2, hidden=16, depth=2, sigma_data=1.0, sigma_min=1e-3, sigma_max=80.0))


# ---- the ladder ------------------------------------------------------------------------------------------------
def test_default_ladders_per_family():
    assert ladder.edm_ladder(1, 2.5) == (2.5,)
    assert np.allclose(ladder.edm_ladder(2, 2.5), [2.5, 0.8])
    assert np.allclose(ladder.edm_ladder(4, 2.5), [2.5, 1.1696, 0.5472, 0.256], atol=1e-4)
    assert np.allclose(ladder.edm_ladder(2, 1.0), [1.0, 0.32])  # the gmm preset's sigma_init
    t1 = 2.5 / 3.5
    flow2 = ladder.flow_ladder(2, 2.5)
    assert flow2[0] == 2.5 and np.allclose(ladder.flow_times(flow2), [t1, t1 / 2])  # even in flow time
    flow4 = ladder.flow_ladder(4, 2.5)
    assert np.allclose(ladder.flow_times(flow4), [t1, 0.75 * t1, 0.5 * t1, 0.25 * t1])
    assert np.allclose(flow4, [2.5, 1.1538, 0.5556, 0.2174], atol=1e-4)
    assert ladder.resolve_ladder(2, 2.5, "2.5,0.8") == ladder.resolve_ladder(2, 2.5, "[2.5, 0.8]") == (2.5, 0.8)
    assert ladder.resolve_ladder(4, 2.5, None, flow=True) == flow4
    for k in (1, 2, 3, 4, 8):  # every default is a valid ladder
        for fn in (ladder.edm_ladder, ladder.flow_ladder):
            assert ladder.check_ladder(fn(k, 2.5)) and len(fn(k, 2.5)) == k


@pytest.mark.parametrize(
    "pairs, words",
    [
        ({"model.student_steps": 0}, "model.student_steps=0 must be an integer >= 1"),
        ({"model.student_sigmas": "1.0,1.0"}, "must decrease strictly"),
        ({"model.student_sigmas": "1.0,0.5,0.2"}, "has 3 values but model.student_steps=2"),
        ({"model.student_sigmas": "2.0,0.5"}, "sigma_1 must equal sigma_init"),
        ({"model.student_sigmas": "one,two"}, "not a comma-separated list of numbers"),
        ({"model.student_sigmas": "1.0,-0.5"}, "must be finite noise levels > 0"),
        ({"loss.student_inputs": "forward_sim"}, "choose one of ['backward_sim', 'noised_data']"),
    ],
)
def test_ladder_mistakes_are_one_line_errors(pairs, words):
    from dibregman.config import validate

    with pytest.raises(ValueError) as e:
        validate(override(get_preset("gmm"), {"model.student_steps": 2, **pairs}))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_flow_teachers_get_the_flow_time_ladder(tmp_path):
    from dibregman import checkpoint as ckpt
    from dibregman.build import build_models
    from dibregman.networks.unet import build_unet
    from dibregman.teachers.flow import FlowUNet

    torch.manual_seed(0)
    net = FlowUNet(build_unet("tiny").cfg)
    path = tmp_path / "flow.safetensors"
    ckpt.export_safetensors(net.state_dict(), {"kind": "flow-unet", "unet": net.cfg.to_dict()}, path)
    cfg = override(
        get_preset("mnist"),
        {"model.teacher": f"flow:{path}", "model.real": "teacher", "model.teacher_pool": 4,
         "model.teacher_pool_steps": 1, "model.student_steps": 2, "optim.batch_size": 4, "run.total_kimg": 0.004,
         "run.sample_every_kimg": 0, "run.tensorboard": False, "run.device": "cpu"},
    )  # fmt: skip
    assert build_models(cfg, torch.device("cpu")).generator.sigmas == ladder.flow_ladder(2, 2.5)
    out = Trainer(cfg, tmp_path / "run").train()  # one step of a flow teacher's K = 2 student, exported
    gen, meta = load_generator(out["export"])
    assert gen.sigmas == ladder.flow_ladder(2, 2.5) and meta["student_steps"] == 2
    assert np.allclose(meta["student_times"], [2.5 / 3.5, 1.25 / 3.5])  # the ladder in the flow's own time


# ---- the student and its sampling chain ------------------------------------------------------------------------
def test_one_step_student_is_the_one_step_generator():
    den = _mlp()
    one, student, four = OneStepGenerator(den, 2.5), Student(den, [2.5]), Student(den, [2.5, 1.0, 0.5, 0.2])
    assert list(one.state_dict()) == list(student.state_dict()) == list(four.state_dict())  # same keys: exports load
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(one(z), student(z)) and torch.equal(one(z), four(z))  # forward is step 1
    assert torch.equal(student.sample(z), one(z)) and torch.equal(four.sample(z, steps=1), one(z))
    with pytest.raises(ValueError, match=r"trained with 4 step\(s\); valid: 1..4"):
        check_steps(four, 5)
    with pytest.raises(ValueError, match="strictly decreasing"):
        Student(den, [2.5, 2.5])


def test_the_chain_renoises_x0_with_fresh_noise_and_the_seed_fixes_it():
    den = _mlp()
    gen = Student(den, [2.5, 0.8, 0.3])
    g = torch.Generator().manual_seed(1)
    z, e2, e3 = (torch.randn(8, 2, generator=g) for _ in range(3))
    with torch.no_grad():
        x0 = den(2.5 * z, 2.5)
        x0 = den(x0 + 0.8 * e2, 0.8)
        want = den(x0 + 0.3 * e3, 0.3)
        assert torch.equal(gen.sample(z, noise=[e2, e3]), want)
        assert torch.equal(sample_chain(gen, z, None, 2, noise=[e2]), den(den(2.5 * z, 2.5) + 0.8 * e2, 0.8))
        # generate(): z from Generator(seed) as a one-step student's, eps_k from ("student-noise", k)
        seed, n = 5, 6
        z = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
        eps = [torch.randn(n, 2, generator=generator_for(seed, "student-noise", k)) for k in (2, 3)]
        assert torch.equal(generate(gen, n, seed=seed), gen.sample(z, noise=eps))
        assert torch.equal(generate(gen, n, seed=seed, steps=2), gen.sample(z, steps=2, noise=eps[:1]))
        assert torch.equal(generate(gen, n, seed=seed, steps=1), generate(OneStepGenerator(den, 2.5), n, seed=seed))
        assert torch.equal(generate(gen, n, seed=seed, batch_size=4), generate(gen, n, seed=seed, batch_size=4))
        assert not torch.equal(generate(gen, n, seed=seed), generate(gen, n, seed=seed + 1))


# ---- training inputs -------------------------------------------------------------------------------------------
def _draw(k: list[int], steps: int, real=None) -> StudentDraw:
    g = torch.Generator().manual_seed(3)
    return StudentDraw(torch.tensor(k), torch.randn(steps - 1, len(k), 2, generator=g), real)


def _batch(n: int):
    from types import SimpleNamespace

    return SimpleNamespace(z=torch.randn(n, 2, generator=torch.Generator().manual_seed(4)), cond=None)


def test_backward_simulation_runs_the_students_own_chain_without_gradient():
    gen = Student(_mlp(), [2.5, 0.8, 0.3])
    inputs = FewStepInputs(gen.sigmas, "backward_sim", 0, (2,))
    b, d = _batch(3), _draw([1, 2, 3], 3)
    x_in = inputs.trained_input(gen, b, d)
    assert not x_in.requires_grad  # no gradient through the earlier steps
    with torch.no_grad():
        x1 = gen(b.z)  # step 1's output
        x2_in = x1 + 0.8 * d.noise[0]
        x3_in = gen(x2_in, None, sigma=0.8) + 0.3 * d.noise[1]
    torch.testing.assert_close(x_in[0], 2.5 * b.z[0])
    torch.testing.assert_close(x_in[1], x2_in[1])
    torch.testing.assert_close(x_in[2], x3_in[2])
    out = inputs.output(gen, b, d)  # step k of each sample, with gradient
    with torch.no_grad():
        want = torch.stack([gen(b.z)[0], gen(x2_in, None, sigma=0.8)[1], gen(x3_in, None, sigma=0.3)[2]])
    torch.testing.assert_close(out, want)
    out.sum().backward()
    assert all(p.grad is not None for p in gen.parameters())


def test_noised_data_feeds_real_samples_noised_to_sigma_k_and_step_one_reads_noise():
    gen = Student(_mlp(), [2.5, 0.8, 0.3])
    real = torch.randn(3, 2, generator=torch.Generator().manual_seed(9))
    inputs = FewStepInputs(gen.sigmas, "noised_data", 0, (2,))
    b, d = _batch(3), _draw([1, 2, 3], 3, real)
    x_in = inputs.trained_input(gen, b, d)
    torch.testing.assert_close(x_in[0], 2.5 * b.z[0])
    torch.testing.assert_close(x_in[1], real[1] + 0.8 * d.noise[0, 1])
    torch.testing.assert_close(x_in[2], real[2] + 0.3 * d.noise[1, 2])


@pytest.mark.parametrize("mode", ["backward_sim", "noised_data"])
def test_both_training_inputs_train_and_change_the_generator(mode, tmp_path):
    trainer = Trainer(_gmm_cfg(steps=3, **{"loss.student_inputs": mode}), tmp_path)
    before = {k: v.clone() for k, v in trainer.m.generator.state_dict().items()}
    out = trainer.train()
    assert out["steps"] == 3 and out["bad_steps"] == 0
    assert trainer.method.fewstep.mode == mode and trainer.m.generator.sigmas == (1.0, 0.32)
    moved = [k for k, v in trainer.m.generator.state_dict().items() if not torch.equal(v, before[k])]
    assert moved, "the generator did not change"
    assert all(math.isfinite(v) for v in json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1]).values()
               if isinstance(v, float))  # fmt: skip


def test_k1_draws_are_untouched_and_k2_adds_only_its_own_stream(tmp_path, monkeypatch):
    streams: list[str] = []
    seed_for = draws_mod.seed_for
    monkeypatch.setattr(draws_mod, "seed_for", lambda s, stream, *c: streams.append(stream) or seed_for(s, stream, *c))
    one = Trainer(_gmm_cfg(steps=2, **{"model.student_steps": 1}), tmp_path / "one")
    one.train()
    assert "student" not in streams and "student-noise" not in streams
    k1_streams = sorted(set(streams))
    streams.clear()
    two = Trainer(_gmm_cfg(steps=2), tmp_path / "two")
    two.train()
    assert sorted(set(streams) - {"student"}) == k1_streams  # a new stream, the old ones as they were
    for step in (0, 1):  # the batch draws of K = 1 and K = 2 are the same tensors
        a, _ = draw_batch(one.cfg, one.m, step, 0, BATCH, "cpu", one.method.sigma_range)
        b, _ = draw_batch(two.cfg, two.m, step, 0, BATCH, "cpu", two.method.sigma_range)
        for key, value in vars(a).items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, getattr(b, key)), key


@pytest.mark.parametrize("mode", ["backward_sim", "noised_data"])
def test_resume_with_k4_is_bitwise_exact(mode, tmp_path):
    pairs = {"model.student_steps": 4, "loss.student_inputs": mode, "run.ckpt_every_kimg": 2 * BATCH / 1000}
    full = Trainer(_gmm_cfg(steps=4, **pairs), tmp_path / "full")
    full.train()
    Trainer(_gmm_cfg(steps=4, **pairs), tmp_path / "split").train(max_steps=2)  # stops after its checkpoint
    split = Trainer(_gmm_cfg(steps=4, **pairs), tmp_path / "split")
    assert split.state.step == 2
    split.train()
    for name in ("generator", "fake", "disc"):
        a, b = getattr(full.m, name).state_dict(), getattr(split.m, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert all(torch.equal(x, y) for x, y in zip(full.ema.parameters(), split.ema.parameters(), strict=True))


# ---- export, reload, sampling ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unet_run(tmp_path_factory, tiny_teacher):
    """A K = 2 student of the tiny EDM U-Net (8x8), two steps, exported."""
    run_dir = tmp_path_factory.mktemp("fewstep-unet")
    cfg = override(
        get_preset("mnist"),
        {"model.teacher": f"edm:{tiny_teacher}", "model.real": "teacher", "model.teacher_pool": 8,
         "model.teacher_pool_steps": 1, "model.student_steps": 2, "optim.batch_size": 4,
         "run.total_kimg": 0.008, "run.log_every_kimg": 0.004, "run.sample_every_kimg": 0.008,
         "run.tensorboard": False, "run.device": "cpu"},
    )  # fmt: skip
    trainer = Trainer(cfg, run_dir)
    return trainer, trainer.train()


def test_k2_export_records_its_ladder_and_reloads_equal(unet_run):
    trainer, out = unet_run
    assert list((trainer.run_dir / "samples").glob("*.png")), "the preview samples in K steps"
    meta = json.loads((trainer.run_dir / "generator.json").read_text())
    assert meta["student_steps"] == 2 and np.allclose(meta["student_sigmas"], [2.5, 0.8])
    gen, meta2 = load_generator(out["export"])
    assert isinstance(gen, Student) and gen.sigmas == trainer.ema.sigmas
    for steps in (None, 1, 2):
        assert torch.equal(generate(gen, 6, seed=3, steps=steps), generate(trainer.ema, 6, seed=3, steps=steps))
    assert not torch.equal(generate(gen, 6, seed=3, steps=1), generate(gen, 6, seed=3))
    assert torch.equal(api.sample(trainer.run_dir, 6, seed=3, steps=2), generate(gen, 6, seed=3))


def test_cli_sample_steps(unet_run, tmp_path, capsys):
    trainer, _ = unet_run
    gen, _ = load_generator(trainer.run_dir)
    base = ["sample", "--checkpoint", str(trainer.run_dir), "--num", "6", "--seed", "3"]
    for steps in (1, 2):
        out = tmp_path / f"s{steps}.npz"
        assert main([*base, "--steps", str(steps), "--out", str(out)]) == 0
        assert torch.equal(torch.from_numpy(np.load(out)["samples"]), generate(gen, 6, seed=3, steps=steps))
    assert main([*base, "--out", str(tmp_path / "grid.png")]) == 0 and (tmp_path / "grid.png").is_file()
    refused = tmp_path / "s3.npz"
    assert main([*base, "--steps", "3", "--out", str(refused)]) == 2 and not refused.exists()
    ev = ["eval", "--checkpoint", str(trainer.run_dir), "--features", "mnist", "--out", str(tmp_path / "e.json")]
    assert main([*ev, "--steps", "3"]) == 2 and not (tmp_path / "e.json").exists()  # refused before any feature
    err = capsys.readouterr().err.splitlines()
    assert err[-2:] == [f"dibregman {c}: error: steps=3: this student was trained with 2 step(s); valid: 1..2"
                        for c in ("sample", "eval")]  # fmt: skip


def test_an_export_without_a_ladder_loads_as_one_step():
    gen, meta = load_generator("assets/mnist_student.safetensors")  # written before few-step students
    assert "student_sigmas" not in meta and isinstance(gen, Student) and gen.sigmas == (2.5,)
    z = torch.randn(2, *gen.denoiser.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(generate(gen, 2, seed=0), gen(z).float())
    with pytest.raises(ValueError, match="valid: 1..1"):
        generate(gen, 2, steps=2)


def test_text_to_image_k2_student_exports_its_steps_and_reloads_equal(tmp_path):
    """A K = 2 student of tiny Stable-Diffusion parts: dibregman.json records each step's recipe, plain diffusers
    following it reproduces the two-step chain, and the export reloads into the same two-step sampler."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from dibregman.teachers.t2i import META_NAME, sample_images
    from tiny_hf import tiny_sd_components

    sd = tmp_path / "sd"
    tiny_sd_components(sd, seed=0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\ndog on a mat\n")
    cfg = override(
        get_preset("sd15"),
        {"model.teacher": f"sd:{sd}", "model.prompts": str(prompts), "model.teacher_pool": 2,
         "model.teacher_pool_steps": 1, "model.grad_checkpointing": False, "model.student_steps": 2,
         "optim.batch_size": 2, "optim.accum_steps": 1, "loss.gan_warmup_kimg": 0.0, "run.total_kimg": 0.002,
         "run.log_every_kimg": 0.002, "run.sample_every_kimg": 0.0, "run.tensorboard": False, "run.device": "cpu"},
    )  # fmt: skip
    trainer = Trainer(cfg, tmp_path / "run")
    folder = trainer.train()["export"]
    meta = json.loads((tmp_path / "run" / "diffusers" / META_NAME).read_text())
    assert not meta["one_step"] and meta["student_steps"] == 2 and len(meta["steps"]) == 2
    s1, s2 = meta["student_sigmas"]
    assert (s1, s2) == trainer.ema.sigmas and "K-step chain" in meta["usage_steps"]
    text = ["a cat", "dog on a mat"]
    g = torch.Generator().manual_seed(3)
    z, e2 = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        ours = trainer.ema.sample(z, text, noise=[e2])
        unet = UNet2DConditionModel.from_pretrained(f"{folder}/unet", local_files_only=True)
        tok = CLIPTokenizer.from_pretrained(f"{folder}/tokenizer", local_files_only=True)
        ids = tok(text, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        emb = CLIPTextModel.from_pretrained(f"{folder}/text_encoder", local_files_only=True)(ids)[0]
        x = s1 * z
        for k, (sigma, step) in enumerate(zip((s1, s2), meta["steps"], strict=True)):
            eps = unet(x / math.sqrt(1 + sigma**2), torch.full((2,), step["timestep"]), emb).sample
            x0 = x - sigma * eps  # an epsilon model (the tiny SD's)
            x = x0 + s2 * e2 if k == 0 else x0
        torch.testing.assert_close(x, ours, atol=1e-5, rtol=1e-5)
    gen, _ = load_generator(tmp_path / "run")
    assert isinstance(gen, Student) and gen.sigmas == (s1, s2)
    a, b = sample_images(trainer.ema, text, seed=7), sample_images(gen, text, seed=7)
    assert torch.equal(a, b) and not torch.equal(b, sample_images(gen, text, seed=7, steps=1))


def test_noised_data_refuses_a_conditional_teacher_in_one_line():
    from types import SimpleNamespace

    from dibregman.methods.fewstep import build_fewstep

    models = SimpleNamespace(generator=Student(_mlp(), [1.0, 0.32]), conditions=object(), shape=(2,), real=None)
    with pytest.raises(ValueError, match="needs an unconditional teacher") as e:
        build_fewstep(_gmm_cfg(**{"loss.student_inputs": "noised_data"}), models)
    assert "\n" not in str(e.value)


def _distill_unet(run_dir, teacher: str, procs: int, **pairs) -> dict:
    """A K = 4 student of the tiny U-Net through the CLI, on `procs` CPU processes (gloo); its generator."""
    import subprocess
    import sys

    from test_parallel import ENV, _free_port, _generator

    sets = {"model.real": "teacher", "model.teacher_pool": 8, "model.teacher_pool_steps": 1,
            "model.student_steps": 4, "optim.batch_size": 4, "optim.lr_schedule": "constant",
            "run.total_kimg": 0.012, "run.log_every_kimg": 0.004, "run.sample_every_kimg": 0,
            "run.tensorboard": "false", "run.device": "cpu", **pairs}  # fmt: skip
    cmd = ["-m", "dibregman.cli", "distill", "--preset", "mnist", "--teacher", f"edm:{teacher}", "--run-dir"]
    cmd += [str(run_dir), *(f"--set={k}={v}" for k, v in sets.items())]
    if procs > 1:
        cmd = ["-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", str(_free_port()), *cmd]
    out = subprocess.run([sys.executable, *cmd], env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return _generator(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("mode, parallel", [("backward_sim", "fsdp"), ("noised_data", "ddp")])
def test_two_processes_train_a_k4_student_as_one_does(mode, parallel, tmp_path, tiny_teacher):
    """Two CPU processes (gloo) on the tiny U-Net (FSDP2 shards its blocks, each forward gathers them): each rank
    keeps its slice of the global few-step draws and runs as many chain steps as the others (2 samples per rank: a
    rank's own largest k is often below the global one), so the student equals the one-process student up to the
    floating-point order of the gradient reduction."""
    pairs = {"loss.student_inputs": mode}
    a = _distill_unet(tmp_path / "one", tiny_teacher, 1, **pairs)
    b = _distill_unet(tmp_path / "two", tiny_teacher, 2, **{**pairs, "run.parallel": parallel})
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
