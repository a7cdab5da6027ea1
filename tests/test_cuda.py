"""CUDA paths, skipped on machines without a GPU (CI has none; run `make test` on a GPU machine to cover them):
bf16 autocast trains, a float32 step on CUDA matches the CPU step, torchrun uses NCCL on the GPU and gloo
when run.device=cpu, and more processes than GPUs fail with a clear message."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dibregman import checkpoint as ckpt
from dibregman.config import override
from dibregman.loop import Trainer, distill
from dibregman.monitor import Monitor
from dibregman.networks.unet import Conv2d
from dibregman.presets import get_preset
from test_distill import GMM_SMALL

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GMM = {**GMM_SMALL, "loss.gan_weight": 0.1}  # a few steps train every network, the GAN term included
SRC = str(Path(__file__).parents[1] / "src")


def _unet_cfg(teacher: str, **pairs):
    return override(
        get_preset("mnist"),
        {
            "model.teacher": f"edm:{teacher}",
            "model.real": "teacher",
            "model.teacher_pool": 16,
            "model.teacher_pool_steps": 2,
            "optim.batch_size": 8,
            "run.total_kimg": 0.024,
            "run.tensorboard": False,
            "run.sample_every_kimg": 0.0,
            "run.device": "cuda",
            **pairs,
        },
    )


def test_bf16_autocast_trains_on_cuda(tmp_path, tiny_teacher):
    tr = Trainer(_unet_cfg(tiny_teacher, **{"optim.bf16": True}), tmp_path)
    assert tr.device.type == "cuda"
    before = {k: v.clone() for k, v in tr.m.generator.state_dict().items()}
    seen = []  # dtype of the generator's convolutions inside the training step
    convs = [mod for mod in tr.m.generator.modules() if isinstance(mod, Conv2d)]
    hook = convs[0].register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    out = tr.train()
    hook.remove()
    assert out["steps"] == 3 and out["bad_steps"] == 0
    assert seen and all(d == torch.bfloat16 for d in seen), seen
    after = tr.m.generator.state_dict()
    assert all(after[k].dtype == torch.float32 for k in after), "master weights stay float32"
    assert any(not torch.equal(before[k], after[k]) for k in before), "the generator was updated"
    x = tr.ema(torch.randn(4, 1, 8, 8, device="cuda"))
    assert torch.isfinite(x).all()


def test_float32_step_on_cuda_matches_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cfg = override(get_preset("gmm"), {**GMM, "run.total_kimg": 1.0})
    cpu = Trainer(override(cfg, {"run.device": "cpu"}), tmp_path / "cpu")
    gpu = Trainer(override(cfg, {"run.device": "cuda"}), tmp_path / "gpu")
    for name in ("generator", "fake", "disc"):  # same starting point (the MLP pre-fit draws on the device's RNG)
        getattr(gpu.m, name).load_state_dict(getattr(cpu.m, name).state_dict())
    gpu.ema.load_state_dict(cpu.ema.state_dict())
    for tr in (cpu, gpu):
        mon = Monitor(tr.run_dir, tr.cfg, enabled=False, initial=0, total=1)
        for _ in range(4):
            tr.step(mon)
    for name in ("generator", "fake", "disc"):
        a, b = getattr(cpu.m, name).state_dict(), getattr(gpu.m, name).state_dict()
        for k in a:
            torch.testing.assert_close(b[k].cpu(), a[k], rtol=1e-4, atol=1e-5, msg=f"{name}.{k}")


def _cli(args: list[str], run_dir: Path, nproc: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "29541"]
    cmd = [*(launch if nproc else [sys.executable]), "-m", "dibregman.cli", *args, "--run-dir", str(run_dir)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _gmm_args(**pairs) -> list[str]:
    return ["distill", "--preset", "gmm", *[f"--set={k}={v}" for k, v in {**GMM, **pairs}.items()]]


def test_torchrun_nccl_one_process_equals_plain_run(tmp_path):
    args = _gmm_args(**{"run.total_kimg": 0.096, "run.device": "cuda"})
    plain, launched = _cli(args, tmp_path / "plain"), _cli(args, tmp_path / "torchrun", nproc=1)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert launched.returncode == 0, launched.stderr[-2000:]
    a = ckpt.load_safetensors(tmp_path / "plain" / "generator.safetensors")[0]
    b = ckpt.load_safetensors(tmp_path / "torchrun" / "generator.safetensors")[0]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="needs a machine with exactly one GPU")
def test_more_processes_than_gpus_fail_clearly(tmp_path):
    out = _cli(_gmm_args(**{"run.total_kimg": 0.064, "run.device": "cuda"}), tmp_path / "two", nproc=2)
    assert out.returncode != 0
    assert "CUDA device(s) are visible" in out.stderr, out.stderr[-2000:]


def test_distill_on_cuda_writes_a_cpu_loadable_generator(tmp_path, tiny_teacher):
    out = distill(_unet_cfg(tiny_teacher, **{"optim.bf16": True}), tmp_path)
    from dibregman.generators import load_generator

    gen, _ = load_generator(out["export"])
    assert gen(torch.randn(2, 1, 8, 8)).shape == (2, 1, 8, 8)


def test_train_teacher_on_cuda_resumes_exactly_and_exports_to_the_cpu(tmp_path):
    """train-teacher with device=cuda: 2 steps + resume + 2 steps equals 4 steps bitwise (the CUDA noise RNG
    travels in the checkpoint), and the export holds CPU tensors."""
    import numpy as np
    from safetensors.torch import load_file

    from dibregman.train_teacher import TeacherConfig, train_teacher

    data = tmp_path / "data.npz"
    np.savez(data, images=np.random.default_rng(0).integers(0, 255, (64, 1, 8, 8), dtype=np.uint8))
    base = dict(data=f"npz:{data}", unet="tiny", batch_size=8, lr_warmup_kimg=0.0, lr_final_ratio=1.0, device="cuda")
    base.update(ckpt_every_kimg=0.016, keep_ckpts=4)
    full = train_teacher(TeacherConfig(**base, total_kimg=0.032), tmp_path / "full")
    train_teacher(TeacherConfig(**base, total_kimg=0.016), tmp_path / "split")
    split = train_teacher(TeacherConfig(**base, total_kimg=0.032), tmp_path / "split")
    a, b = load_file(str(full)), load_file(str(split))
    assert all(t.device.type == "cpu" for t in a.values())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
