"""A user's own teacher: `--teacher python:MODULE:FUNCTION`.

FUNCTION (in an importable MODULE, e.g. a file on PYTHONPATH) takes no arguments and returns a `torch.nn.Module`
implementing the one interface of `base.Denoiser`, D(x, sigma, cond=None) -> x0_hat in EDM's parametrisation
x = x0 + sigma eps, with the attributes `shape` (per-sample shape), `sigma_min` and `sigma_max`; `sigma_data`
defaults to 0.5. Like a native U-Net it is copied into the generator G and the fake score psi, so with the default
discriminator placement (`fake_score`) it also needs `features(x, sigma, cond) -> [N, C, ...]` and
`feature_channels`. A rectified-flow network can be wrapped in `teachers.flow.FlowDenoiser` first.
Exports rebuild the network by calling FUNCTION again, so MODULE must stay importable where they are loaded.

`api.distill(cfg, run_dir, teacher=obj)` hands over the module itself: it is registered here as `object:NAME`
(the spec the run records) and copied on every load, so it lives only as long as the process that registered it.
"""

from __future__ import annotations

import copy
import importlib

from torch import nn

REQUIRED = ("shape", "sigma_min", "sigma_max")


def check_teacher(obj, name: str) -> nn.Module:
    """`obj` if it is a usable teacher module, else a one-line ValueError naming exactly what it lacks."""
    if not isinstance(obj, nn.Module):
        raise ValueError(f"teacher {name} returned a {type(obj).__name__}, not a torch.nn.Module")
    missing = [a for a in REQUIRED if not hasattr(obj, a)]
    if type(obj).forward is nn.Module.forward:
        missing.append("forward(x, sigma, cond)")
    if missing:
        raise ValueError(f"teacher {name} ({type(obj).__name__}) lacks {', '.join(missing)}; see teachers/base.py")
    if not hasattr(obj, "sigma_data"):
        obj.sigma_data = 0.5
    return obj


def load_python_teacher(arg: str, **kwargs) -> nn.Module:
    """The teacher `FUNCTION(**kwargs)` returns, for the spec argument `MODULE:FUNCTION` (see module docstring)."""
    name = f"python:{arg}"
    module_name, sep, func_name = arg.rpartition(":")
    if not sep or not module_name or not func_name:
        raise ValueError(f"teacher {name!r} must read python:MODULE:FUNCTION, e.g. python:my_teacher:build")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or any error the module raises while importing
        raise ValueError(f"teacher {name}: cannot import {module_name!r} ({type(e).__name__}: {e})") from e
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ValueError(f"teacher {name}: module {module_name!r} has no function {func_name!r}")
    return check_teacher(fn(**kwargs), name)


OBJECTS: dict[str, nn.Module] = {}  # teachers handed to api.distill(teacher=...) in this process, by spec name


def register_object(obj) -> str:
    """Check `obj` and register it; returns its spec `object:NAME` for `cfg.model.teacher`."""
    name = f"{type(obj).__name__}@{id(obj):x}"
    OBJECTS[name] = check_teacher(obj, f"object:{name}")
    return f"object:{name}"


def load_object_teacher(arg: str, **kwargs) -> nn.Module:
    """A copy of the module registered as `object:ARG` (a copy: loading an export never touches the original)."""
    if arg not in OBJECTS:
        raise ValueError(
            f"teacher object:{arg} was handed to api.distill(teacher=...) in another process; pass it again, or "
            "give a loadable spec such as python:MODULE:FUNCTION"
        )
    net = copy.deepcopy(OBJECTS[arg])
    return net.to(kwargs["device"]) if "device" in kwargs else net


__all__ = ["load_python_teacher", "check_teacher", "register_object", "load_object_teacher", "OBJECTS"]
