"""FlowDenoiser: exact maths on a Gaussian mixture (the exact velocity field wrapped as a flow network gives back the
exact EDM denoiser in every time convention) and parity with diffusers' FlowMatchEulerDiscreteScheduler chain."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dibregman.teachers.flow import (
    FlowDenoiser,
    flow_euler_sigmas,
    shift_time,
    sigma_of_time,
    time_of_sigma,
    unshift_time,
)
from dibregman.teachers.gmm import ring_mixture


class ExactFlowNet(nn.Module):
    """The exact rectified-flow prediction of a mixture, in a chosen convention: reads (x_t, time) as a network
    trained with that convention would, and answers from the mixture's exact EDM denoiser (float64)."""

    def __init__(self, gmm, prediction="velocity", time_scale=1.0, reverse=False, shift=1.0):
        super().__init__()
        self.gmm, self.prediction, self.time_scale, self.reverse, self.shift = (
            gmm,
            prediction,
            time_scale,
            reverse,
            shift,
        )

    def forward(self, x_t, time, cond=None):
        u = time.to(torch.float64) / self.time_scale
        t = shift_time(1 - u if self.reverse else u, self.shift)[:, None]  # [N, 1]
        x_t = x_t.to(torch.float64)
        x0 = self.gmm(x_t / (1 - t), t / (1 - t))  # exact E[x0 | x_t]
        eps = (x_t - (1 - t) * x0) / t
        v = eps - x0
        out = {"velocity": -v if self.reverse else v, "epsilon": eps, "sample": x0}[self.prediction]
        return out.to(time.dtype)


CONVENTIONS = [
    dict(),
    dict(prediction="epsilon"),
    dict(prediction="sample"),
    dict(time_scale=1000.0),
    dict(reverse=True),  # SiT
    dict(shift=3.0, time_scale=1000.0),  # SD3-style shifted time input
    dict(reverse=True, shift=0.5, prediction="epsilon"),
]


@pytest.mark.parametrize("conv", CONVENTIONS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
@torch.no_grad()
def test_flow_adapter_gives_the_exact_denoiser(conv):
    gmm = ring_mixture()
    teacher = FlowDenoiser(ExactFlowNet(gmm, **conv), (2,), **conv)
    g = torch.Generator().manual_seed(0)
    for sigma in torch.logspace(math.log10(0.003), math.log10(80.0), 25, dtype=torch.float64):
        x = gmm.sample(64, generator=g).double() + sigma * torch.randn(64, 2, generator=g, dtype=torch.float64)
        ref = gmm(x, sigma)
        assert (teacher(x, sigma) - ref).abs().max() < 1e-6, float(sigma)
        sig = torch.full((64,), float(sigma), dtype=torch.float64)  # a per-sample sigma gives the same
        assert (teacher(x, sig) - ref).abs().max() < 1e-6
    x32 = torch.randn(8, 2, generator=g)  # float32 in, float32 out
    assert teacher(x32, 1.0).dtype == torch.float32
    assert (teacher(x32, 1.0) - gmm(x32, 1.0)).abs().max() < 1e-5


def test_time_maps_invert_and_clamp():
    t = torch.linspace(0, 0.999, 50, dtype=torch.float64)
    assert torch.allclose(time_of_sigma(sigma_of_time(t)), t, atol=1e-12)
    assert torch.allclose(unshift_time(shift_time(t, 3.0), 3.0), t, atol=1e-12)
    assert torch.isfinite(sigma_of_time(torch.tensor(1.0))) and time_of_sigma(float("inf")) < 1
    x = torch.ones(2, 2)
    teacher = FlowDenoiser(ExactFlowNet(ring_mixture()), (2,))
    assert torch.isfinite(teacher(x, 1e12)).all()  # clamped near t = 1


def test_bad_prediction_is_a_clear_error():
    with pytest.raises(ValueError, match="prediction must be one of"):
        FlowDenoiser(nn.Identity(), (2,), prediction="v")


@pytest.mark.parametrize("shift", [1.0, 3.0])
@torch.no_grad()
def test_edm_ddim_equals_diffusers_flow_match_euler(shift):
    """diffusers' FlowMatchEulerDiscreteScheduler loop (timesteps t * 1000, shifted) == the EDM DDIM chain of the
    adapter over `flow_euler_sigmas`: Euler on the flow ODE is DDIM."""
    diffusers = pytest.importorskip("diffusers")
    gmm = ring_mixture()
    net = ExactFlowNet(gmm, time_scale=1000.0)  # the network reads the (already shifted) t * 1000
    times = torch.linspace(0.95, 0.05, 8, dtype=torch.float64)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=times.numpy())
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
    x = x_T.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(net(x, t.expand(len(x))), t, x).prev_sample
    ref = x

    teacher = FlowDenoiser(net, (2,), time_scale=1000.0)
    sigmas = flow_euler_sigmas(times, shift)
    assert torch.allclose(time_of_sigma(sigmas), scheduler.sigmas.double(), atol=1e-6)
    x = x_T.double() * (1 + sigmas[0])  # EDM scaling x = x_t / (1 - t)
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        x0 = teacher(x, s)
        x = x0 + (s_next / s) * (x - x0)
    assert float((x.float() - ref).norm() / ref.norm()) < 1e-5


# ---- the native rectified-flow U-Net: train-teacher objective="flow", export, flow:PATH, distil ------------------


def _flow_teacher_config(tmp_path, **kw):
    import numpy as np

    from dibregman.train_teacher import TeacherConfig

    data = tmp_path / "data.npz"
    if not data.exists():
        np.savez(data, images=np.random.default_rng(0).integers(0, 255, (64, 1, 8, 8), dtype=np.uint8))
    base = dict(data=f"npz:{data}", unet="tiny", batch_size=8, objective="flow", lr_warmup_kimg=0.0)
    return TeacherConfig(**{**base, "lr_final_ratio": 1.0, "ckpt_every_kimg": 0.016, "keep_ckpts": 4, **kw})


def test_flow_teacher_resume_is_exact(tmp_path):
    from safetensors.torch import load_file

    from dibregman.train_teacher import train_teacher

    full = train_teacher(_flow_teacher_config(tmp_path, total_kimg=0.032), tmp_path / "full")
    train_teacher(_flow_teacher_config(tmp_path, total_kimg=0.016), tmp_path / "split")
    split = train_teacher(_flow_teacher_config(tmp_path, total_kimg=0.032), tmp_path / "split")
    a, b = load_file(str(full)), load_file(str(split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="trained with objective='flow'"):
        train_teacher(_flow_teacher_config(tmp_path, total_kimg=0.048, objective="edm"), tmp_path / "split")


def test_flow_teacher_trains_exports_loads_and_distils(tmp_path):
    from dibregman import checkpoint as ckpt
    from dibregman.config import override
    from dibregman.generators import generate, load_generator
    from dibregman.loop import distill
    from dibregman.presets import get_preset
    from dibregman.teachers import load_teacher
    from dibregman.train_teacher import train_teacher

    path = train_teacher(_flow_teacher_config(tmp_path, total_kimg=0.016), tmp_path / "teacher")
    assert ckpt.load_safetensors(path)[1]["kind"] == "flow-unet"
    with pytest.raises(ValueError, match="load it as flow:"):
        load_teacher(f"edm:{path}")
    teacher = load_teacher(f"flow:{path}")
    assert isinstance(teacher, FlowDenoiser) and teacher.shape == (1, 8, 8)
    x = torch.randn(2, 1, 8, 8)
    assert (teacher(x, 1e-4) - x).abs().max() < 0.01  # D = x_t - t v -> x as sigma -> 0
    assert torch.isfinite(teacher(x, 80.0)).all()

    pairs = {
        "model.teacher": f"flow:{path}",
        "model.real": "teacher",
        "model.teacher_pool": 16,
        "model.teacher_pool_steps": 2,
        "optim.batch_size": 4,
        "run.total_kimg": 2 * 4 / 1000,
        "run.log_every_kimg": 4 / 1000,
        "run.ckpt_every_kimg": 1000.0,
        "run.sample_every_kimg": 0.0,
        "run.tensorboard": False,
        "run.device": "cpu",
    }
    out = distill(override(get_preset("mnist"), pairs), tmp_path / "run")
    assert out["steps"] == 2 and out["bad_steps"] == 0
    gen, meta = load_generator(tmp_path / "run")
    assert meta["network"]["teacher"] == f"flow:{path}"
    x = generate(gen, 4, seed=0)
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()


@pytest.mark.parametrize("num_steps", [1, 10])
@torch.no_grad()
def test_bench_flow_euler_is_euler_on_the_flow_ode_from_pure_noise(num_steps, monkeypatch):
    """bench/teacher_quality.py's `flow_euler` sampler (sample_teacher on flow_euler_sigmas) is the flow teacher's
    own Euler-N: x_{t'} = x_t + (t' - t) v(x_t, t) over t = 1, 1 - 1/N, ..., 0, starting at x_1 = noise (where
    the exact velocity is x_1 - E[x0])."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    import teacher_quality
    from dibregman.sample import sample_teacher

    gmm = ring_mixture()
    net = ExactFlowNet(gmm)
    kw = teacher_quality.sampler_args("flow_euler", num_steps)
    x = sample_teacher(FlowDenoiser(net, (2,)), 64, generator=torch.Generator().manual_seed(0), **kw)

    x_t = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)).double()
    times = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        mean = (gmm.weights[:, None] * gmm.means).sum(0).double()
        v = x_t - mean if t == 1 else net(x_t, t.expand(64)).double()
        x_t = x_t + (t_next - t) * v
    assert teacher_quality.num_steps("flow_euler", num_steps) == num_steps  # N steps = N evaluations
    assert float((x.double() - x_t).abs().max()) < 1e-4
