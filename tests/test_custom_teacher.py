"""`--teacher python:MODULE:FUNCTION`: a user's own network (here a rectified-flow net behind FlowDenoiser) distils
through the family registry, exports and reloads; a module that cannot serve gets a one-line error naming the gap."""

from __future__ import annotations

import textwrap

import pytest
import torch

from dibregman.teachers import load_teacher

USER_MODULE = """
import torch
from torch import nn

from dibregman.teachers.flow import FlowDenoiser


class TinyVelocity(nn.Module):
    feature_channels = 16

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 16)
        self.out = nn.Linear(16, 2)

    def features(self, x_t, time, cond=None):
        return torch.tanh(self.inp(torch.cat([x_t, time[:, None]], dim=1)))

    def forward(self, x_t, time, cond=None):
        return self.out(self.features(x_t, time, cond))


def build():
    torch.manual_seed(0)
    return FlowDenoiser(TinyVelocity(), (2,), sigma_data=1.0)


class NoShape(nn.Module):
    sigma_min = 0.002

    def forward(self, x, sigma, cond=None):
        return x


def no_shape():
    return NoShape()


def no_forward():
    return nn.Module()


def not_a_module():
    return lambda x, sigma, cond=None: x
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_flow_teacher.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_flow_teacher"


def test_python_teacher_distils_exports_and_reloads(user_module, tmp_path):
    from dibregman.generators import generate, load_generator
    from dibregman.loop import distill
    from test_distill import gmm_cfg, steps_kimg

    teacher = load_teacher(f"python:{user_module}:build")
    assert teacher.shape == (2,) and teacher(torch.zeros(3, 2), 1.0).shape == (3, 2)
    cfg = gmm_cfg(
        **{
            "model.teacher": f"python:{user_module}:build",
            "model.teacher_pool": 64,
            "model.teacher_pool_steps": 2,
            "run.total_kimg": steps_kimg(2),
        }
    )
    out = distill(cfg, tmp_path / "run")
    assert out["steps"] == 2 and out["bad_steps"] == 0
    gen, meta = load_generator(tmp_path / "run")
    assert meta["network"] == {"type": "teacher-copy", "teacher": f"python:{user_module}:build"}
    x = generate(gen, 8, seed=0)
    assert x.shape == (8, 2) and torch.isfinite(x).all()


@pytest.mark.parametrize(
    "function, message",
    [
        ("no_shape", r"lacks shape, sigma_max; see"),
        ("no_forward", r"lacks shape, sigma_min, sigma_max, forward\(x, sigma, cond\)"),
        ("not_a_module", r"returned a function, not a torch.nn.Module"),
        ("missing", r"has no function 'missing'"),
    ],
)
def test_python_teacher_says_what_is_missing(user_module, function, message):
    with pytest.raises(ValueError, match=message):
        load_teacher(f"python:{user_module}:{function}")


def test_python_teacher_import_errors_are_one_line():
    with pytest.raises(ValueError, match=r"cannot import 'no_such_module_xyz' \(ModuleNotFoundError"):
        load_teacher("python:no_such_module_xyz:build")
    with pytest.raises(ValueError, match="must read python:MODULE:FUNCTION"):
        load_teacher("python:just_a_module")


def test_api_distill_takes_a_teacher_object(user_module, tmp_path):
    import importlib

    from dibregman import api
    from test_distill import gmm_cfg, steps_kimg

    teacher = importlib.import_module(user_module).build()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    pairs = {"model.teacher_pool": 64, "model.teacher_pool_steps": 2, "run.total_kimg": steps_kimg(2)}
    out = api.distill(gmm_cfg(**pairs), tmp_path / "run", teacher=teacher)
    assert out["steps"] == 2 and out["bad_steps"] == 0
    x = api.sample(tmp_path / "run", 4)  # the export reloads (in this process) from a copy of the object
    assert x.shape == (4, 2) and torch.isfinite(x).all()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # the original is untouched
    with pytest.raises(ValueError, match="lacks shape, sigma_min, sigma_max"):
        api.distill(gmm_cfg(**pairs), tmp_path / "bad", teacher=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="in another process"):
        load_teacher("object:Gone@0")
