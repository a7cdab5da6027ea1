"""Teachers: anything implementing `D(x, sigma, cond=None) -> x0_hat` (see `base.Denoiser`).

`load_teacher(spec)` is the one entry point: `edm:PATH.safetensors` (native U-Net, `edm.py`), `gmm:ring8`
(exact mixture, `gmm.py`), `diffusers:FOLDER` (`diffusers.py`), `sd:FOLDER` (`sd.py`). The adapters for
foreign formats are imported only when asked for, so their optional dependencies stay optional.
"""

from __future__ import annotations

from .base import Denoiser, as_sigma, score
from .edm import import_edm_state_dict, load_edm_teacher
from .gmm import GaussianMixture, ring_mixture

TEACHER_KINDS = ("edm", "gmm", "diffusers", "sd")


def load_teacher(spec: str, **kwargs):
    """Build a teacher from `KIND:ARG` (KIND in TEACHER_KINDS); kwargs go to that kind's loader."""
    kind, sep, arg = spec.partition(":")
    if not sep or kind not in TEACHER_KINDS:
        raise ValueError(f"unknown teacher spec {spec!r}; expected KIND:ARG with KIND in {list(TEACHER_KINDS)}")
    if not arg:
        raise ValueError(f"teacher spec {spec!r} lacks its argument after '{kind}:'")
    if kind == "edm":
        return load_edm_teacher(arg, **kwargs)
    if kind == "gmm":
        from .gmm import gmm_from_spec

        return gmm_from_spec(arg, **kwargs)
    if kind == "diffusers":
        from .diffusers import DiffusersTeacher

        return DiffusersTeacher.from_folder(arg, **kwargs)
    from .sd import StableDiffusionTeacher

    return StableDiffusionTeacher.from_folder(arg, **kwargs)


__all__ = [
    "Denoiser",
    "as_sigma",
    "score",
    "GaussianMixture",
    "ring_mixture",
    "load_edm_teacher",
    "import_edm_state_dict",
    "load_teacher",
    "TEACHER_KINDS",
]
