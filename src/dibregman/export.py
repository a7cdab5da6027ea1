"""What a finished run hands its users: the EMA student, written once at the end of `dibregman distill`.

- A LoRA student (`model.student_lora_rank` > 0) exports its adapters only, as LCM-LoRA, DMD2 and Hyper-SD ship
  theirs: `<run_dir>/lora/pytorch_lora_weights.safetensors` in the layout of diffusers' `save_lora_weights` (PEFT
  keys under the network's prefix, `unet.` / `transformer.`, PEFT's LoraConfig as `lora_adapter_metadata`), which
  stock `pipe.load_lora_weights(folder)` reads, and `dibregman.json` beside it: the sigma ladder (one step from
  sigma_init), the base model (the teacher spec), how a stock diffusers pipeline runs the student (`diffusers`:
  pipeline, scheduler class and settings, call arguments, latents scale: `teachers/sd.py`, `teachers/mmdit.py`),
  the recipe, the images seen. Native families (EDM U-Net, DiT) write the same two files (safetensors, PEFT keys
  under the network's attribute name); `dibregman sample` reads them.
- A full-weight student keeps its family's export: a diffusers folder (`teachers/t2i.py`) or
  `generator.safetensors` + `.json` (`generators.py`).
- Beside either, a model card `README.md` (`modelcard.py`).

`find_export` / `load_export` read every kind back (for `dibregman sample` and `eval --checkpoint`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .networks.generator import OneStepGenerator
from .networks.lora import adapted_network, adapter_state_dict, is_adapted, load_adapter_state_dict, lora_copy

LORA_DIR = "lora"  # a run's LoRA export folder
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' default weight_name for load_lora_weights
META_NAME = "dibregman.json"  # the export's description (as in a diffusers-folder export)
T2I_KIND = "dibregman-one-step-text-to-image"  # = teachers.t2i.META_KIND
NATIVE_KIND = "dibregman-one-step-generator"  # = the kind of `generators.generator_meta`


def export_student(gen: OneStepGenerator, cfg, run_dir, num_images: int, full) -> Path:
    """Export the EMA generator: its LoRA adapters if it has them, else `full(gen, cfg, run_dir, num_images)` (the
    family's full-weight export). Returns the export's path (the method writes the model card beside it)."""
    return export_lora(gen, cfg, run_dir, num_images) if is_adapted(gen) else Path(full(gen, cfg, run_dir, num_images))


def _recipe(cfg) -> dict:
    from .divergences import divergence_params

    d = cfg.divergence
    return {"divergence": d.name, "divergence_params": divergence_params(d), "weighting": cfg.loss.weighting,
            "gan_weight": cfg.loss.gan_weight, "regression_weight": cfg.loss.regression_weight}  # fmt: skip


def lora_meta(gen: OneStepGenerator, cfg, num_images: int) -> dict:
    """dibregman.json of a LoRA export: the adapters (rank, alpha, targets, key prefix), the sigma ladder, the base
    model, the recipe, the images seen and, for a text-to-image family, how stock diffusers runs it."""
    den = gen.denoiser
    prefix, net = adapted_network(den)
    info = net.dibregman_lora
    meta = {
        "format": "lora",
        "one_step": True,
        "sigma_init": gen.sigma_init,
        "sigmas": [gen.sigma_init],  # the student's ladder of noise levels (one step)
        "num_steps": 1,
        "base_model": cfg.model.teacher,
        "teacher": cfg.model.teacher,
        "lora": {
            "rank": info["rank"],
            "alpha": info["alpha"],
            "target_modules": info["targets"],
            "prefix": prefix,
            "network_class": type(net).__name__,
            "weights": LORA_WEIGHTS,
        },  # fmt: skip
        "recipe": _recipe(cfg),
        "num_images": num_images,
        "shape": list(getattr(den, "shape", ())),
        "distill_config": cfg.to_dict(),
    }
    text = getattr(den, "text", None)  # text-to-image: the teacher's family conventions
    if text is None:
        return {"kind": NATIVE_KIND, **meta}
    recipe = text.pipeline_recipe(gen.sigma_init)  # how the family's stock diffusers pipeline runs the student
    return {"kind": T2I_KIND, "family": text.family, **meta, **text.export_meta(gen.sigma_init),
            "teacher_guidance_scale": cfg.model.guidance_scale, "diffusers": recipe}  # fmt: skip


def export_lora(gen: OneStepGenerator, cfg, run_dir, num_images: int) -> Path:
    """Write `<run_dir>/lora/` (the adapters + dibregman.json) atomically; returns the folder."""
    meta = lora_meta(gen, cfg, num_images)
    prefix, net = adapted_network(gen.denoiser)
    out = Path(run_dir) / LORA_DIR
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = adapter_state_dict(net)
    pipeline = meta.get("diffusers", {}).get("pipeline")
    if pipeline:  # diffusers' own writer: the file stock load_lora_weights expects
        import diffusers

        peft_config = net.peft_config["default"].to_dict()
        peft_config["target_modules"] = sorted(peft_config["target_modules"])  # a set in PEFT: JSON needs a list
        kw = {f"{prefix}_lora_layers": weights, f"{prefix}_lora_adapter_metadata": peft_config}
        getattr(diffusers, pipeline).save_lora_weights(tmp, weight_name=LORA_WEIGHTS, **kw)
    else:
        from safetensors.torch import save_file

        save_file({f"{prefix}.{k}": v for k, v in weights.items()}, str(tmp / LORA_WEIGHTS), metadata={"format": "pt"})
    (tmp / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# ---- reading exports back ---------------------------------------------------------------------------------
def find_export(path: str | Path) -> Path | None:
    """The export folder (LoRA or diffusers) of a run folder, or the folder itself; None if there is none."""
    path = Path(path)
    for cand in (path, path / LORA_DIR, path / "diffusers"):
        if (cand / META_NAME).is_file():
            return cand
    return None


def read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((Path(folder) / META_NAME).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{Path(folder) / META_NAME} is not readable JSON ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("kind") not in (T2I_KIND, NATIVE_KIND):
        raise ValueError(f"{Path(folder) / META_NAME} is not a dibregman export description")
    return meta


def load_export(folder: str | Path, device="cpu") -> tuple[OneStepGenerator, dict]:
    """Rebuild the student of a LoRA export folder (its base model + the adapters); returns (generator, metadata)."""
    folder = Path(folder)
    meta = read_meta(folder)
    if meta.get("format") != "lora":
        raise ValueError(f"{folder} is not a LoRA export (generators.load_generator reads diffusers folders)")
    gen = _lora_generator(folder, meta)
    return gen.to(device).eval().requires_grad_(False), meta


def _lora_generator(folder: Path, meta: dict) -> OneStepGenerator:
    from safetensors.torch import load_file

    from .teachers import FAMILIES, load_teacher, resolve_path

    lora, base = meta["lora"], meta["base_model"]
    kind, _, arg = resolve_path(base).partition(":")
    if kind not in FAMILIES or (kind in ("sd", "sd3", "flux", "dit", "diffusers") and not Path(arg).exists()):
        raise FileNotFoundError(
            f"{folder}: its base model {base!r} is not found; a LoRA export needs the model it adapts"
        )
    weights = load_file(str(folder / lora.get("weights", LORA_WEIGHTS)))
    prefix = lora["prefix"] + "."
    state = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    targets = tuple(lora["target_modules"])
    if meta["kind"] == T2I_KIND:
        parts = FAMILIES[meta["family"]].load(arg, **meta.get("load_kwargs", {}))
        net = lora_copy(parts.network, lora["rank"], targets)
        load_adapter_state_dict(net, state)
        return OneStepGenerator(parts.unguided(net), meta["sigma_init"])
    den = lora_copy(load_teacher(base), lora["rank"], targets)  # G's copy: the teacher module, unguided
    load_adapter_state_dict(adapted_network(den)[1], state)
    return OneStepGenerator(den, meta["sigma_init"])


def file_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (hard links counted once per path)."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def one_step_latents(meta: dict, z: torch.Tensor) -> torch.Tensor:
    """The latents to hand a stock diffusers pipeline (`meta["diffusers"]`) for the student's sample of z."""
    recipe = meta["diffusers"]
    x = recipe["latents_scale"] * z
    if recipe.get("latents_packed"):
        from .teachers.flux import pack_latents

        x = pack_latents(x)
    return x


__all__ = ["export_student", "export_lora", "lora_meta", "find_export", "load_export", "read_meta", "LORA_WEIGHTS"]
