"""DiffusersTeacher: parity with diffusers' own DDIM chain, sigma <-> timestep maps, loading from a folder."""

from __future__ import annotations

import pytest
import torch

from dibregman.teachers.base import Denoiser
from dibregman.teachers.diffusers import (
    DiffusersTeacher,
    ddim_sigmas,
    sigmas_for_timesteps,
    timesteps_for_sigmas,
    x0_from_model_output,
)
from tiny_hf import tiny_ddim_scheduler, tiny_unet2d

NUM_STEPS = 10


def edm_ddim(denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond=None) -> torch.Tensor:
    """Deterministic DDIM in EDM form: x_{i+1} = x0_hat + (sigma_{i+1} / sigma_i)(x_i - x0_hat)."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        x0 = denoiser(x, s, cond)
        x = x0 + (s_next / s) * (x - x0)
    return x


def diffusers_ddim(unet, scheduler, x_T: torch.Tensor, num_steps: int) -> torch.Tensor:
    """diffusers' own DDIM loop (eta = 0) in VP scaling."""
    scheduler.set_timesteps(num_steps)
    x = x_T
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    return x


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    "prediction_type, sched_kw",
    [
        ("epsilon", {}),
        ("v_prediction", {}),
        ("sample", {}),
        ("epsilon", dict(set_alpha_to_one=True, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)),
        ("v_prediction", dict(timestep_spacing="trailing", steps_offset=0)),
    ],
)
@torch.no_grad()
def test_ddim_parity_with_diffusers(prediction_type, sched_kw):
    unet = tiny_unet2d(seed=0)
    scheduler = tiny_ddim_scheduler(prediction_type, **sched_kw)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))  # VP noise, abar_T scaling
    ref = diffusers_ddim(unet, scheduler, x_T, NUM_STEPS)

    teacher = DiffusersTeacher(unet, scheduler)  # prediction type read from the scheduler config
    assert teacher.prediction_type == prediction_type
    sigmas = ddim_sigmas(scheduler, NUM_STEPS)
    assert torch.equal(teacher.sigma_to_t(sigmas[:-1]), scheduler.timesteps.float())  # exact grid hits
    x = edm_ddim(teacher, x_T * (1 + sigmas[0] ** 2).sqrt(), sigmas)  # VP -> VE
    ours = x / (1 + sigmas[-1] ** 2).sqrt()  # VE -> VP at the final abar
    err = rel_err(ours, ref)
    print(f"DDIM parity {prediction_type} {sched_kw}: relative error {err:.2e}")
    assert err < 1e-4


def test_sigma_timestep_maps_roundtrip():
    scheduler = tiny_ddim_scheduler()
    t = torch.tensor([0.0, 0.25, 1.5, 17.0, 499.9, 998.5, 999.0], dtype=torch.float64)
    sig = sigmas_for_timesteps(t, scheduler)
    assert torch.allclose(timesteps_for_sigmas(sig, scheduler), t, atol=1e-6)
    grid = ((1 - scheduler.alphas_cumprod.double()) / scheduler.alphas_cumprod.double()).sqrt()
    assert torch.allclose(sigmas_for_timesteps(torch.arange(1000), scheduler), grid)
    # a continuous sigma lands strictly between its grid neighbours, log-linearly
    s = (grid[10] * grid[11]).sqrt()
    assert abs(float(timesteps_for_sigmas(s.reshape(1), scheduler)) - 10.5) < 1e-9
    # out-of-range sigmas are clamped to the grid ends
    assert timesteps_for_sigmas(torch.tensor([0.0, 1e6]), scheduler).tolist() == [0.0, 999.0]


def test_x0_from_model_output_inverts_each_parametrisation():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 3, 3, generator=g).unbind(0)
    sigma = torch.tensor([0.1, 1.0, 3.0, 40.0]).view(-1, 1, 1, 1)
    alpha, s = (1 + sigma**2).rsqrt(), sigma * (1 + sigma**2).rsqrt()
    x = x0 + sigma * eps
    outputs = {"epsilon": eps, "v_prediction": alpha * eps - s * x0, "sample": x0}
    for kind, out in outputs.items():
        assert torch.allclose(x0_from_model_output(out, x, sigma, kind), x0, atol=1e-5), kind
    with pytest.raises(ValueError, match="prediction_type"):
        x0_from_model_output(eps, x, sigma, "score")


@torch.no_grad()
def test_teacher_interface_class_labels_and_learned_variance():
    unet = tiny_unet2d(in_channels=1, num_class_embeds=3, out_channels=2, seed=3)
    teacher = DiffusersTeacher(unet, tiny_ddim_scheduler())
    assert isinstance(teacher, Denoiser)
    assert teacher.shape == (1, 8, 8) and teacher.sigma_data == 0.5
    assert 0 < teacher.sigma_min < 0.05 and 10 < teacher.sigma_max < 200
    s = torch.tensor([teacher.sigma_min, 0.3, 5.0, teacher.sigma_max])
    assert torch.allclose(teacher.t_to_sigma(teacher.sigma_to_t(s)), s, rtol=1e-5)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y0, y1 = teacher(x, 2.0, torch.tensor([0, 0, 0])), teacher(x, 2.0, torch.tensor([1, 1, 1]))
    assert y0.shape == x.shape and not torch.allclose(y0, y1)
    y = teacher(x, torch.tensor([0.5, 2.0, 7.3]), torch.tensor([0, 1, 2]))  # per-sample sigma
    assert torch.allclose(y[1:2], y1[1:2], atol=1e-6)
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusersTeacher(unet, tiny_ddim_scheduler(), prediction_type="eps")


@torch.no_grad()
def test_from_folder_roundtrip_and_errors(tmp_path):
    unet, scheduler = tiny_unet2d(seed=5), tiny_ddim_scheduler("v_prediction")
    unet.save_pretrained(tmp_path / "unet")
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        DiffusersTeacher.from_folder(tmp_path)
    scheduler.save_pretrained(tmp_path / "scheduler")
    loaded = DiffusersTeacher.from_folder(tmp_path)
    assert loaded.prediction_type == "v_prediction"
    assert torch.equal(loaded(x, 1.7), DiffusersTeacher(unet, scheduler)(x, 1.7))
    with pytest.raises(FileNotFoundError, match="not found"):
        DiffusersTeacher.from_folder(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        DiffusersTeacher.from_folder(tmp_path, subfolder="scheduler_typo")
