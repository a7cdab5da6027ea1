"""Teachers: anything implementing `D(x, sigma, cond=None) -> x0_hat` (see `base.Denoiser`), grouped in families.

`load_teacher(spec)` is the one entry point: `edm:PATH.safetensors` (native U-Net, `edm.py`), `gmm:ring8`
(exact mixture, `gmm.py`), `diffusers:FOLDER` (`diffusers.py`), `sd:FOLDER` (`sd.py`), `sd3:FOLDER` (`sd3.py`),
`flux:FOLDER` (`flux.py`; both rectified-flow transformers, `mmdit.py`), `dit:FOLDER` (class-conditional DiT,
`dit.py`), `flow:PATH.safetensors` (native rectified-flow U-Net, `flow.py`), `python:MODULE:FUNCTION` (a user's
own network, `custom.py`; a rectified-flow network is wrapped in `flow.FlowDenoiser`). The adapters for foreign
formats are imported only when asked for, so their optional dependencies stay optional.

A family (`TeacherFamily`) is what the rest of the package knows of a `KIND:` spec: its loader and, if the
native recipe (`build.native_models`: G and psi copy the teacher's network, eta a head, the real side from data
or teacher samples, a safetensors export, a sample-grid preview) does not fit, its own builder returning
`models.Models` with its real-side sampler, conditions, `export(...)` and `preview(...)` (text-to-image:
`t2i.build_t2i_models`). The loop, the monitor and the CLI never branch on the family. Adding one touches this
folder and one registry line, as the rectified-flow family (D(x, sigma) in `teachers/flow.py`) shows:

    def _flow(arg, **kw):
        from .flow import load_flow_teacher

        return load_flow_teacher(arg, **kw)

    FAMILIES["flow"] = TeacherFamily(_flow)  # native recipe; or TeacherFamily(_flow, build=build_flow_models)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .base import Denoiser, as_sigma, score
from .edm import import_edm_state_dict, load_edm_teacher
from .gmm import GaussianMixture, ring_mixture

UNET_BLOCKS = ("UNetBlock", "ResnetBlock2D", "Transformer2DModel", "Attention")  # native and diffusers U-Nets
DIT_BLOCKS = ("BasicTransformerBlock",)  # diffusers' DiT
MMDIT_BLOCKS = ("JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")  # SD3, FLUX


@dataclass(frozen=True)
class TeacherFamily:
    load: Callable  # load(arg, **kwargs) -> teacher: the `ARG` of a `KIND:ARG` spec (a path made absolute)
    build: Callable | None = None  # build(cfg, teacher, device) -> models.Models; None: build.native_models
    prompts: bool = False  # text-to-image: model.prompts is required
    blocks: tuple[str, ...] = ()  # class names of the network's repeated blocks (see `parallelize`)

    def parallelize(self, module) -> list:
        """The blocks of `module` (a network copied from this family's teacher) that FSDP2 shards one unit each
        and activation checkpointing recomputes (`parallel.py`): the outermost submodules whose class is one of
        `blocks`; [] (the network is one unit) for a family without blocks."""
        out, inside = [], ()
        for name, sub in module.named_modules():
            if inside and any(name.startswith(p + ".") for p in inside):
                continue
            if type(sub).__name__ in self.blocks:
                out.append(sub)
                inside = (*inside, name)
        return out


def _gmm(arg, **kwargs):
    from .gmm import gmm_from_spec

    return gmm_from_spec(arg, **kwargs)


def _diffusers(arg, **kwargs):
    from .diffusers import DiffusersTeacher

    return DiffusersTeacher.from_folder(arg, **kwargs)


def _sd(arg, **kwargs):
    from .sd import StableDiffusionTeacher

    return StableDiffusionTeacher.from_folder(arg, **kwargs)


def _sd3(arg, **kwargs):
    from .sd3 import SD3Teacher

    return SD3Teacher.from_folder(arg, **kwargs)


def _flux(arg, **kwargs):
    from .flux import FluxTeacher

    return FluxTeacher.from_folder(arg, **kwargs)


def _dit(arg, **kwargs):
    from .dit import DiTTeacher

    return DiTTeacher.from_folder(arg, **kwargs)


def _flow(arg, **kwargs):
    from .flow import load_flow_teacher

    return load_flow_teacher(arg, **kwargs)


def _python(arg, **kwargs):
    from .custom import load_python_teacher

    return load_python_teacher(arg, **kwargs)


def _object(arg, **kwargs):
    from .custom import load_object_teacher

    return load_object_teacher(arg, **kwargs)


def _t2i_models(cfg, teacher, device):
    from .t2i import build_t2i_models

    return build_t2i_models(cfg, teacher, device)


FAMILIES: dict[str, TeacherFamily] = {
    "edm": TeacherFamily(load_edm_teacher, blocks=UNET_BLOCKS),
    "gmm": TeacherFamily(_gmm),
    "diffusers": TeacherFamily(_diffusers, blocks=UNET_BLOCKS),
    "sd": TeacherFamily(_sd, build=_t2i_models, prompts=True, blocks=UNET_BLOCKS),
    "sd3": TeacherFamily(_sd3, build=_t2i_models, prompts=True, blocks=MMDIT_BLOCKS),
    "flux": TeacherFamily(_flux, build=_t2i_models, prompts=True, blocks=MMDIT_BLOCKS),
    "dit": TeacherFamily(_dit, blocks=DIT_BLOCKS),  # native recipe, class labels as conditions
    "flow": TeacherFamily(_flow, blocks=UNET_BLOCKS),
    "python": TeacherFamily(_python),
    "object": TeacherFamily(_object),  # api.distill(cfg, run_dir, teacher=obj), this process only
}
TEACHER_KINDS = tuple(FAMILIES)


def resolve_path(spec: str) -> str:
    """Relative paths in a spec are resolved against the working directory, then the package folder (assets/)."""
    kind, _, path = spec.partition(":")
    if path and not Path(path).exists():
        alt = Path(__file__).resolve().parent.parent / path
        if alt.exists():
            return f"{kind}:{alt}"
    return spec


def family(spec: str) -> TeacherFamily:
    """The family of a `KIND:ARG` teacher spec; ValueError for an unknown kind or a missing argument."""
    kind, sep, arg = spec.partition(":")
    if not sep or kind not in FAMILIES:
        raise ValueError(f"unknown teacher spec {spec!r}; expected KIND:ARG with KIND in {list(FAMILIES)}")
    if not arg:
        raise ValueError(f"teacher spec {spec!r} lacks its argument after '{kind}:'")
    return FAMILIES[kind]


def load_teacher(spec: str, **kwargs):
    """Build a teacher from `KIND:ARG` (KIND in FAMILIES; a relative path may name a package asset); kwargs go to
    that kind's loader."""
    return family(spec).load(resolve_path(spec).partition(":")[2], **kwargs)


__all__ = [
    "Denoiser",
    "as_sigma",
    "score",
    "GaussianMixture",
    "ring_mixture",
    "load_edm_teacher",
    "import_edm_state_dict",
    "load_teacher",
    "resolve_path",
    "TEACHER_KINDS",
    "FAMILIES",
    "TeacherFamily",
    "family",
]
