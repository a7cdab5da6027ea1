"""Distilling rectified-flow teachers: every flow noise-level schedule runs and resumes bit for bit, and a teacher
trained by `train-teacher --preset mnist-flow` (tiny sizes) loads through `--teacher flow:PATH`, distils and
resumes bit for bit through the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dibregman import checkpoint as ckpt
from dibregman.cli import main as cli
from dibregman.config import override
from dibregman.loop import Trainer
from dibregman.presets import get_preset

BATCH = 4


@pytest.fixture(scope="module")
def flow_teacher(tmp_path_factory) -> str:
    """A randomly initialised tiny flow U-Net exported as `train-teacher objective=flow` writes it (8x8, 1 channel)."""
    from dibregman.networks.unet import build_unet
    from dibregman.teachers.flow import FlowUNet

    torch.manual_seed(0)
    net = FlowUNet(build_unet("tiny").cfg)
    path = tmp_path_factory.mktemp("flow") / "tiny-flow.safetensors"
    ckpt.export_safetensors(net.state_dict(), {"kind": "flow-unet", "unet": net.cfg.to_dict()}, path)
    return str(path)


def _cfg(teacher: str, steps: int, **pairs):
    base = {
        "model.teacher": f"flow:{teacher}",
        "model.real": "teacher",
        "model.teacher_pool": 16,
        "model.teacher_pool_steps": 2,
        "optim.batch_size": BATCH,
        "loss.gan_weight": 0.1,
        "optim.lr_schedule": "constant",  # the split runs below stop early by a shorter total_kimg
        "run.total_kimg": steps * BATCH / 1000,
        "run.log_every_kimg": BATCH / 1000,
        "run.ckpt_every_kimg": 1000.0,
        "run.sample_every_kimg": 0.0,
        "run.tensorboard": False,
        "run.device": "cpu",
    }
    return override(get_preset("mnist"), {**base, **pairs})


def _weights(trainer: Trainer) -> dict:
    nets = {"g": trainer.m.generator, "f": trainer.m.fake, "d": trainer.m.disc, "e": trainer.ema}
    return {f"{n}.{k}": v.clone() for n, mod in nets.items() for k, v in mod.state_dict().items()}


SCHEDULES = {
    "uniform": {"loss.sigma_schedule": "flow_uniform"},
    "logit_normal": {"loss.sigma_schedule": "flow_logit_normal", "loss.fake_sigma": "generator"},
    "shifted": {
        "loss.sigma_schedule": "flow_logit_normal",
        "loss.flow_shift": 3.0,
        "loss.flow_t_mean": -0.5,
        "loss.gen_t_max": 1.0,
        "loss.disc_t_max": 1.0,
    },
    "shifted_uniform": {
        "loss.sigma_schedule": "flow_uniform",
        "loss.flow_shift": 0.5,
        "loss.gen_t_origin": "sigma_min",
        "loss.disc_t_max": 1.0,
    },
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_each_flow_schedule_distils_and_resumes_bitwise(name, flow_teacher, tmp_path):
    pairs = SCHEDULES[name]
    full = Trainer(_cfg(flow_teacher, 4, **pairs), tmp_path / "full")
    out = full.train()
    assert out["steps"] == 4 and out["bad_steps"] == 0
    Trainer(_cfg(flow_teacher, 2, **pairs), tmp_path / "split").train()
    resumed = Trainer(_cfg(flow_teacher, 4, **pairs), tmp_path / "split")
    assert resumed.state.step == 2 and resumed.cfg.loss.sigma_schedule == pairs["loss.sigma_schedule"]
    resumed.train()
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _newest_state(run_dir) -> dict:
    state, _ = ckpt.load_latest(run_dir)
    return {k: state[k] for k in ("generator", "ema", "fake", "disc", "opt_g", "opt_c", "step", "num_images")}


def test_mnist_flow_teacher_distils_through_the_cli_and_resumes_bitwise(tmp_path):
    """`train-teacher --preset mnist-flow` at tiny sizes -> flow-unet export -> `distill --teacher flow:PATH` with
    the recommended schedule: 2 steps + resume + 2 steps equals 4 steps bit for bit."""
    data = tmp_path / "digits.npz"
    np.savez(data, images=np.random.default_rng(0).integers(0, 255, (64, 1, 8, 8), dtype=np.uint8))
    tiny = ["--set", "unet=tiny", "--set", "unet_overrides={}", "--set", "batch_size=8", "--set", "total_kimg=0.016"]
    tiny += ["--set", "lr_warmup_kimg=0.008", "--set", "ckpt_every_kimg=0.008"]
    teacher_dir = tmp_path / "teacher"
    argv = ["train-teacher", "--preset", "mnist-flow", "--data", f"npz:{data}", "--run-dir", str(teacher_dir)]
    assert cli([*argv, *tiny]) == 0
    export = teacher_dir / "teacher-ema.safetensors"
    state, meta = ckpt.load_safetensors(export)
    assert meta["kind"] == "flow-unet" and meta["num_images"] == 16
    assert meta["teacher_config"]["teacher"]["objective"] == "flow"

    def distill(run_dir, steps: int) -> int:
        sets = {
            "loss.sigma_schedule": "flow_logit_normal",  # bench/tuning/flow_teacher.md's recommendation
            "loss.fake_sigma": "generator",
            "loss.gen_t_max": 1.0,
            "loss.disc_t_max": 1.0,
            "optim.lr_schedule": "constant",  # the split run stops early by a shorter --kimg
            "model.teacher_pool": 16,
            "model.teacher_pool_steps": 2,
            "run.log_every_kimg": BATCH / 1000,
            "run.sample_every_kimg": 0,
            "run.tensorboard": "false",
            "run.device": "cpu",
        }
        argv = ["distill", "--preset", "mnist", "--teacher", f"flow:{export}", "--data", "teacher", "--run-dir"]
        argv += [str(run_dir), "--batch", str(BATCH), "--kimg", str(steps * BATCH / 1000)]
        return cli([*argv, *(a for k, v in sets.items() for a in ("--set", f"{k}={v}"))])

    assert distill(tmp_path / "full", 4) == 0
    assert distill(tmp_path / "split", 2) == 0 and _newest_state(tmp_path / "split")["step"] == 2
    assert distill(tmp_path / "split", 4) == 0
    a, b = _newest_state(tmp_path / "full"), _newest_state(tmp_path / "split")
    assert a["step"] == b["step"] == 4
    for net in ("generator", "ema", "fake", "disc"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), f"{net}.{k}"
    assert ckpt.content_checksum(a) == ckpt.content_checksum(b)  # optimiser states and counters too
    gen_a, gen_b = (
        ckpt.load_safetensors(d / "generator.safetensors")[0] for d in (tmp_path / "full", tmp_path / "split")
    )
    assert gen_a.keys() == gen_b.keys() and all(torch.equal(gen_a[k], gen_b[k]) for k in gen_a)
