"""Teacher samples at any NFE from the command line and the API (`teacher_samples.py`): `dibregman sample --teacher
SPEC --nfe N [--sampler ...]` is `sample.sample_teacher` on the student's z, `dibregman eval --teacher SPEC --nfe N`
is the FID of those samples, a bad NFE is one line, and text-to-image teachers take prompts like their students."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dibregman import api
from dibregman.cli import main
from dibregman.evaluate import evaluate_samples
from dibregman.generators import generate
from dibregman.sample import euler_sampler, sample_teacher
from dibregman.teacher_samples import TeacherSampler, num_steps_for, teacher_sigmas
from dibregman.teachers import load_teacher
from tiny_flow_hf import tiny_sd3_components
from tiny_hf import tiny_sd_components


def test_nfe_counts_denoiser_evaluations_and_a_bad_one_is_refused():
    assert [num_steps_for(n, "heun") for n in (1, 3, 35)] == [1, 2, 18]
    assert num_steps_for(10, "euler") == num_steps_for(10, "flow_euler") == 10
    with pytest.raises(ValueError, match=r"--nfe 10: Heun takes 2N - 1 .* 9 or 11"):
        num_steps_for(10, "heun")
    with pytest.raises(ValueError, match="unknown sampler 'rk4'"):
        num_steps_for(3, "rk4")


def test_sample_teacher_command_is_the_teacher_chain_on_the_students_z(tiny_teacher, tmp_path, capsys):
    spec, out = f"edm:{tiny_teacher}", tmp_path / "t.npz"
    argv = ["sample", "--teacher", spec, "--nfe", "3", "--num", "6", "--batch", "4", "--seed", "5", "--out", str(out)]
    assert main(argv) == 0 and "wrote 6 teacher samples (heun, 3 evaluations)" in capsys.readouterr().out
    x = torch.from_numpy(np.load(out)["samples"])
    g = torch.Generator().manual_seed(5)  # the z stream of `generate(student, 6, seed=5, batch_size=4)`
    ref = sample_teacher(load_teacher(spec), 6, num_steps=2, sampler="heun", generator=g, batch_size=4)
    assert x.shape == (6, 1, 8, 8) and torch.equal(x, ref.float())
    euler = api.sample_teacher(spec, 6, nfe=4, sampler="euler", seed=5)
    chain = TeacherSampler(load_teacher(spec), 4, "euler")
    assert torch.equal(euler, generate(chain, 6, seed=5)) and not torch.equal(euler, x)
    assert main(["sample", "--teacher", spec, "--nfe", "4", "--out", str(out)]) == 2  # Heun: odd NFE only
    assert "Heun takes 2N - 1" in capsys.readouterr().err
    assert main(["sample", "--teacher", spec, "--checkpoint", str(tmp_path), "--out", str(out)]) == 2


def test_eval_teacher_is_the_fid_of_its_samples(tiny_teacher, tmp_path):
    spec, out = f"edm:{tiny_teacher}", tmp_path / "fid.json"
    argv = ["eval", "--teacher", spec, "--nfe", "3", "--num", "8", "--features", "mnist", "--reference",
            "digits::test", "--metrics", "fid", "--device", "cpu", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert res["teacher"] == spec and res["nfe"] == 3 and res["sampler"] == "heun" and res["n_samples"] == 8
    x = api.sample_teacher(spec, 8, nfe=3)
    same = evaluate_samples(x, "digits::test", feature_net="mnist", metrics=("fid",), cache_dir=False)
    assert res["fid"] == pytest.approx(same["fid"], rel=1e-9)


def test_text_to_image_teachers_sample_prompts_and_flow_teachers_their_pipeline_chain(tmp_path, capsys):
    tiny_sd_components(tmp_path / "sd", seed=0)
    png = tmp_path / "sd.png"
    argv = ["sample", "--teacher", f"sd:{tmp_path / 'sd'}", "--nfe", "2", "--sampler", "euler", "--num", "2"]
    assert main([*argv, "--prompt", "a cat", "--guidance-scale", "2.0", "--out", str(png)]) == 0 and png.is_file()
    assert main([*argv, "--out", str(png)]) == 2  # a text-to-image teacher needs prompts, as its students
    assert "needs --prompt/--prompts" in capsys.readouterr().err
    sd, prompts = load_teacher(f"sd:{tmp_path / 'sd'}"), ["a cat", "a dog"]
    x = api.sample_teacher(f"sd:{tmp_path / 'sd'}", 2, nfe=2, sampler="euler", prompts=prompts, seed=4)
    z = torch.randn((2, *sd.shape), generator=torch.Generator().manual_seed(4))  # the z of the student's images
    with torch.no_grad():
        ref = sd.decode(euler_sampler(sd, z, teacher_sigmas(sd, 2, "euler"), prompts).float())
    assert x.shape == (2, 3, 16, 16) and torch.equal(x, ref) and sd.guidance_scale == 7.5  # the teacher's own CFG
    tiny_sd3_components(tmp_path / "sd3", seed=0)
    sd3 = load_teacher(f"sd3:{tmp_path / 'sd3'}")
    assert torch.equal(teacher_sigmas(sd3, 4, "flow_euler"), sd3.sampling_sigmas(4))  # shift 3, as the pipeline
    x = api.sample_teacher(f"sd3:{tmp_path / 'sd3'}", 2, nfe=2, sampler="flow_euler", prompts=["a cat", "a dog"])
    assert x.shape == (2, 3, 16, 16) and bool(x.abs().max() <= 1)  # decoded images
