"""The text-to-image teacher families (Di-Bregman's Stable Diffusion v1.5 experiment, arXiv 2510.16983): `sd`,
`sd3` and `flux` share this builder, export and loader.

Algorithm 1 with conditions c (text embeddings of prompts):
- phi: the teacher with classifier-free guidance scale w (`model.guidance_scale`), frozen;
- G_theta(z, c) = U_theta(sigma_init z, sigma_init, c): a copy of the teacher's network (line 1), NOT guided
  (full weights, or PEFT LoRA adapters on the teacher's frozen weights: `model.student_lora_rank`);
- psi(x, sigma, c): another copy without guidance (optionally LoRA, `model.fake_lora_rank`);
LoRA copies use the teacher's frozen tensors themselves (`model.share_lora_base`, `networks/lora.py`).
- eta: a head on psi's features (a UNet's bottleneck, a transformer's image tokens at `model.feature_depth`).
Only the network (UNet or transformer) trains. The VAE, text encoders and tokenizers stay in the teacher and are
shared by reference (never copied, never in a state dict). Conditions c ~ D_c come from `model.prompts`; the real
side (x_gt, c) ~ D_d is either a captioned image folder encoded by the VAE (`model.real=captions:DIR`) or,
data-free, a pool of guided teacher samples of prompts from D_c (`model.real=teacher`).

A text-to-image teacher offers (`sd.StableDiffusionTeacher`, `mmdit.MMDiTTeacher` for sd3 and flux):
    family, network_folder, subfolders     its spec kind, the trainable network's subfolder, its folder layout
    network, unguided(network)             the network to copy, and D(x, sigma, c) of a copy without guidance
                                           (with features / feature_channels, sharing the frozen parts as .text)
    encode_prompts(prompts), uncond_embedding(), guidance_scale, feature_depth (transformers)
    encode(images), decode(latents), vae_scale_factor, shape, sigma_data
    export_meta(sigma_init)                how one student step runs in plain diffusers, and `load_kwargs` with
                                           which `from_folder` reloads the export as the student
    pipeline_recipe(sigma_init)            how the family's stock diffusers pipeline runs it (LoRA exports)
Export (`export.export_student`, called by the method): a LoRA student's adapters (`<run_dir>/lora/`, diffusers'
LoRA file), else
a diffusers folder (the EMA generator's network in its subfolder + the teacher's other components,
hard-linked or copied) with `dibregman.json` (sigma_init, the family's one-step recipe, `usage`).
For `sd`: input_scale = sigma_init / sqrt(1 + sigma_init^2) and, for an epsilon model (v / sample:
`x0_from_model_output`),
    x_vp = input_scale z,  eps = unet(x_vp, t, text_embedding),  z0 = sigma_init (z - eps),
    image = vae.decode(z0 / scaling_factor).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from .. import dist
from ..conditions import ConditionSet, load_image, read_captioned_images, read_prompts
from ..draws import seed_for
from ..ladder import chain_generators, chain_noise, make_student, t2i_student_meta
from ..models import Models
from ..networks.discriminator import build_critic
from ..networks.generator import OneStepGenerator
from ..networks.lora import PSI_TARGETS, full_copy, lora_copy
from ..networks.student import Student, check_steps, sample_chain
from . import FAMILIES, resolve_path

META_NAME = "dibregman.json"  # the export's description, beside model_index.json
META_KIND = "dibregman-one-step-text-to-image"


def trainable_copy(
    teacher,
    *,
    lora_rank: int = 0,  # 0: full float32 weights, all trainable; r > 0: LoRA adapters of rank r only
    targets: tuple[str, ...] | None = PSI_TARGETS,  # LoRA layers (None: the student's, `lora.STUDENT_TARGETS`)
    share_base: bool = True,  # LoRA: the frozen base weights are the teacher's own tensors
    grad_checkpointing: bool = False,
):
    """A copy of the teacher's network as a guidance-free denoiser: full weights or LoRA adapters trainable."""
    if lora_rank > 0:  # eval(): no dropout, runs are functions of their seed
        net = lora_copy(teacher.network, lora_rank, targets, share_base=share_base)
    else:
        net = full_copy(teacher.network).float().eval().requires_grad_(True)
    if grad_checkpointing:
        net.enable_gradient_checkpointing()
    return teacher.unguided(net)


def _autocast(cfg, device):
    if cfg.optim.bf16 and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_t2i_models(cfg, teacher, device) -> Models:
    """The networks of Algorithm 1 for a text-to-image teacher, with its real side, conditions, export and
    preview (the builder of the `sd`, `sd3` and `flux` families in `teachers.FAMILIES`)."""
    m = cfg.model
    if not m.prompts:
        raise ValueError("a text-to-image teacher needs conditions: set model.prompts (--prompts FILE)")
    if m.resolution:
        if not hasattr(teacher, "set_resolution"):
            raise ValueError(f"model.resolution={m.resolution}: {teacher.family}: teachers keep their network's size")
        teacher.set_resolution(m.resolution)
    teacher.guidance_scale = m.guidance_scale  # only phi is guided (before copying: FLUX's embedded guidance)
    if hasattr(teacher, "feature_depth"):
        teacher.feature_depth = m.feature_depth  # where the head reads a transformer's tokens
    teacher.uncond_embedding()  # cached once, outside autocast
    conditions = ConditionSet(read_prompts(m.prompts), teacher.encode_prompts)
    kw = dict(share_base=m.share_lora_base, grad_checkpointing=m.grad_checkpointing)
    student_net = trainable_copy(teacher, lora_rank=m.student_lora_rank, targets=None, **kw)
    gen = make_student(student_net, cfg, teacher)  # K steps (K = 1: OneStepGenerator)
    fake = trainable_copy(teacher, lora_rank=m.fake_lora_rank, **kw)
    critic = build_critic(fake, m.disc_head, m.disc_placement, teacher=teacher.unguided(teacher.network))
    if m.teacher_bf16:  # after copying: full-weight copies keep float32 weights, LoRA ones share the bf16 base
        teacher.to(torch.bfloat16)
    latents, captions = real_side(cfg, teacher, conditions, device)
    real_conditions = ConditionSet(captions, teacher.encode_prompts)

    def real(g: torch.Generator, n: int):
        idx = torch.randint(len(latents), (n,), generator=g)
        return latents[idx], idx

    def export(gen, cfg, run_dir, num_images: int) -> Path:  # full weights: a diffusers folder (LoRA: export.py)
        return export_diffusers(gen, cfg, Path(run_dir) / "diffusers", num_images)

    def preview(gen, path, seed: int, device, title: str = "") -> None:  # fixed prompts, a column each
        from ..viz import save_image_grid

        prompts = preview_prompts(conditions)
        x = sample_images(gen, prompts, seed=seed, batch_size=4, device=device)
        save_image_grid(x, path, ncol=len(set(prompts)))

    shape, sd = tuple(teacher.shape), float(teacher.sigma_data)
    return Models(teacher, gen.to(device), critic.to(device), shape, sd, real, export, preview,
                  conditions=conditions, real_conditions=real_conditions)  # fmt: skip


# ---- the real side of Eq. 5 --------------------------------------------------------------------------------
def real_side(cfg, teacher, conditions: ConditionSet, device) -> tuple[torch.Tensor, list[str]]:
    """(latents [P, C, h, w] on the CPU, captions): VAE-encoded captioned images or guided teacher samples."""
    m = cfg.model
    kind, _, path = m.real.partition(":")
    if m.real != "teacher" and kind != "captions":
        raise ValueError(
            f"model.real={m.real!r}: a text-to-image teacher takes 'teacher' (data-free, guided teacher "
            f"samples of the prompts) or 'captions:DIR' (images + captions)"
        )
    source = {"real": m.real, "teacher": m.teacher, "shape": list(teacher.shape)}
    if m.real == "teacher":
        source.update(
            guidance_scale=m.guidance_scale,
            pool=m.teacher_pool,
            steps=m.teacher_pool_steps,
            seed=cfg.run.seed,
            num_prompts=len(conditions),
        )
    cache = Path(m.real_cache) if m.real_cache else None
    if cache is not None and cache.with_suffix(".safetensors").is_file():
        state, meta = ckpt.load_safetensors(cache)
        if meta.get("source") != source:
            raise ValueError(
                f"{cache} holds another real side ({meta.get('source')}); this run needs {source}. "
                f"Delete it or set model.real_cache to another path"
            )
        return state["latents"], meta["captions"]
    batch = max(1, cfg.optim.batch_size // cfg.optim.accum_steps)
    with _autocast(cfg, device):
        if m.real == "teacher":
            latents, captions = teacher_pool(
                teacher,
                conditions,
                m.teacher_pool,
                m.teacher_pool_steps,
                seed=seed_for(cfg.run.seed, "teacher_pool"),
                batch_size=batch,
            )
        else:
            latents, captions = encode_captioned_images(teacher, path, batch_size=batch)
    if cache is not None and dist.rank() == 0:
        ckpt.export_safetensors({"latents": latents}, {"source": source, "captions": captions}, cache)
    return latents, captions


def teacher_pool(teacher, conditions: ConditionSet, n: int, num_steps: int, *, seed: int, batch_size: int):
    """n guided teacher samples (Heun, `num_steps` intervals) of prompts from D_c: the data-free real side."""
    from ..sample import sample_teacher

    g = torch.Generator().manual_seed(seed)
    prompts = [conditions.prompts[i] for i in conditions.draw(g, n).tolist()]
    dist.print0(f"drawing {n} guided teacher samples (w={teacher.guidance_scale}) for the real side ...")
    x = sample_teacher(teacher, n, num_steps=num_steps, cond=prompts, generator=g, batch_size=batch_size)
    return x.float().cpu(), prompts


def encode_captioned_images(teacher, root, *, batch_size: int) -> tuple[torch.Tensor, list[str]]:
    """VAE latents (posterior mean) of a captioned image folder, resized to the teacher's resolution."""
    pairs = read_captioned_images(root)
    f = teacher.vae_scale_factor
    height, width = teacher.shape[1] * f, teacher.shape[2] * f
    device = next(teacher.vae.parameters()).device
    out = []
    for i in range(0, len(pairs), batch_size):
        x = torch.stack([load_image(p, height, width) for p, _ in pairs[i : i + batch_size]])
        out.append(teacher.encode(x.to(device)).float().cpu())
    return torch.cat(out), [c for _, c in pairs]


# ---- export, loading, sampling ----------------------------------------------------------------------------
def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # same bytes, no extra disk space, survives moving the teacher
    except OSError:
        shutil.copy2(src, dst)


def _pipeline_parts(folder: Path, default: tuple[str, ...]) -> list[str]:
    """Component folders of a diffusers pipeline: those named in model_index.json, else `default`."""
    index = folder / "model_index.json"
    if index.is_file():
        names = [k for k, v in json.loads(index.read_text()).items() if isinstance(v, list) and v[0] is not None]
        return [n for n in names if (folder / n).is_dir()]
    return [n for n in default if (folder / n).is_dir()]


def export_diffusers(gen: OneStepGenerator, cfg, out_dir: str | Path, num_images: int) -> Path:
    """Write the generator's network + the teacher's other components as a diffusers folder (atomically)."""
    den = gen.denoiser
    text = den.text  # the teacher: family, folder layout, one-step recipe
    teacher_dir = Path(resolve_path(cfg.model.teacher).partition(":")[2])
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    den.network.save_pretrained(tmp / text.network_folder)
    for name in _pipeline_parts(teacher_dir, text.subfolders):
        if name != text.network_folder:
            shutil.copytree(teacher_dir / name, tmp / name, copy_function=_link_or_copy)
    if (teacher_dir / "model_index.json").is_file():
        shutil.copy2(teacher_dir / "model_index.json", tmp / "model_index.json")
    meta = {
        "kind": META_KIND,
        "family": text.family,
        "sigma_init": gen.sigma_init,
        **text.export_meta(gen.sigma_init),
        **t2i_student_meta(gen, text),  # the ladder and, for K > 1, each step's recipe (ladder.py)
        "teacher": cfg.model.teacher,
        "teacher_guidance_scale": cfg.model.guidance_scale,
        "num_images": num_images,
        "distill_config": cfg.to_dict(),
    }
    (tmp / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def load_t2i_generator(folder: str | Path, device="cpu") -> tuple[OneStepGenerator, dict]:
    """Rebuild a one-step text-to-image generator from its diffusers export; returns (generator, metadata)."""
    folder = Path(folder)
    meta = json.loads((folder / META_NAME).read_text())
    if meta.get("kind") != META_KIND:
        raise ValueError(f"{folder / META_NAME} is not a dibregman text-to-image export (kind={meta.get('kind')!r})")
    kind = meta.get("family", "sd")  # exports written before sd3/flux name no family
    kwargs = meta.get("load_kwargs", {"prediction_type": meta.get("prediction_type"), "guidance_scale": 1.0})
    parts = FAMILIES[kind].load(str(folder), **kwargs).to(device)  # the student's network + the shared parts
    gen = Student(parts.unguided(parts.network), meta.get("student_sigmas") or [meta["sigma_init"]])  # old: K = 1
    return gen.to(device).eval().requires_grad_(False), meta


@torch.no_grad()
def sample_images(
    gen: OneStepGenerator, prompts: list[str], *, seed: int = 0, batch_size: int = 8, device="cpu", steps=None
):
    """Images [len(prompts), 3, H, W] in [-1, 1] of a student in `steps` steps (None: all), VAE-decoded, on the
    CPU; deterministic in seed (`ladder.py`'s rule). (Any gen(z, prompts) with `.denoiser.shape` works:
    `teacher_samples.TeacherSampler` runs the teacher's chain.)"""
    den, k = gen.denoiser, check_steps(gen, steps)
    z = torch.randn((len(prompts), *den.shape), generator=torch.Generator().manual_seed(seed))
    eps = chain_noise(chain_generators(seed, k), len(prompts), den.shape)  # eps_2..eps_k; [] for one step
    out = []
    for i in range(0, len(prompts), batch_size):
        noise = [e[i : i + batch_size].to(device) for e in eps]
        latents = sample_chain(gen, z[i : i + batch_size].to(device), list(prompts[i : i + batch_size]), k, noise=noise)
        out.append(getattr(den, "text", den).decode(latents.float()).cpu())  # a copy's shared parts, or the teacher
    return torch.cat(out)


def preview_prompts(conditions: ConditionSet, num_prompts: int = 8, per_prompt: int = 2) -> list[str]:
    """The first distinct prompts of D_c, each repeated `per_prompt` times (a grid column per prompt)."""
    distinct = list(dict.fromkeys(conditions.prompts))[:num_prompts]
    return distinct * per_prompt
