"""Exported one- and few-step generators: metadata to rebuild the network, loading and sampling for `dibregman
sample`/`eval`.

An export is `generator.safetensors` (EMA weights of `OneStepGenerator` / `Student`) + `generator.json` (how to
rebuild it, with the student's ladder `student_sigmas`; an export without one is a one-step generator: it loads as
a `Student` with K = 1); text-to-image runs write a diffusers folder instead (`teachers/t2i.py`), LoRA students
their adapters (`export.py`). Sampling follows `ladder.py`'s rule: a K-step student samples in K steps unless fewer
are asked for.
Loading never executes code from a file.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import dist
from .ladder import chain_generators, chain_noise, student_meta
from .networks.generator import OneStepGenerator
from .networks.mlp import MLPConfig, MLPDenoiser
from .networks.student import Student, check_steps, sample_chain
from .networks.unet import EDMDenoiser, UNetConfig, build_unet


def generator_meta(gen: OneStepGenerator, cfg, num_images: int) -> dict:
    from .networks.lora import adapted_network, is_adapted

    net = gen.denoiser
    if is_adapted(net):  # LoRA adapters on a copy of the teacher: rebuilt from the teacher spec, adapters loaded
        info = adapted_network(net)[1].dibregman_lora
        network = {"type": "teacher-lora", "teacher": cfg.model.teacher, "rank": info["rank"],
                   "target_modules": info["targets"]}  # fmt: skip
    elif isinstance(net, EDMDenoiser):
        network = {"type": "edm-unet", "config": net.cfg.to_dict()}
    elif isinstance(net, MLPDenoiser):
        network = {"type": "mlp", "config": net.cfg.to_dict()}
    else:  # foreign teachers (diffusers ...): rebuilt from the teacher spec, then the weights are loaded
        network = {"type": "teacher-copy", "teacher": cfg.model.teacher}
    return {
        "kind": "dibregman-one-step-generator",
        "sigma_init": gen.sigma_init,
        **student_meta(gen),  # the ladder (ladder.py); an export without it is a one-step generator
        "network": network,
        "shape": list(getattr(net, "shape", ())),
        "num_images": num_images,
        "distill_config": cfg.to_dict(),
    }


def export_generator(gen: OneStepGenerator, cfg, run_dir: str | Path, num_images: int) -> Path:
    """Write `gen` as `<run_dir>/generator.safetensors` + `generator.json` (the native families' export)."""
    meta = generator_meta(gen, cfg, num_images)
    return ckpt.export_safetensors(gen.state_dict(), meta, Path(run_dir) / "generator")


def class_grid(n: int, num_classes: int, ncol: int) -> torch.Tensor | None:
    """Labels [n] putting class j in grid column j (the first `ncol` classes), or None when unconditional."""
    return torch.arange(n) % min(ncol, num_classes) if num_classes else None


@torch.no_grad()
def preview_samples(gen, path, seed: int, device, *, real, shape, title: str = "", num_classes=0, decode=None) -> None:
    """A picture of one-step samples at `path`: an 8x8 grid for images (a class per column for a class-conditional
    teacher, VAE-decoded for a latent one), a 2000-point scatter over the real side for vectors (the native
    families' preview)."""
    from .viz import save_image_grid, save_scatter

    g = torch.Generator().manual_seed(seed)
    n = 64 if len(shape) == 3 else 2000
    z, labels = torch.randn((n, *shape), generator=g).to(device), class_grid(n, num_classes, 8)
    eps = [e.to(device) for e in chain_noise(chain_generators(seed, check_steps(gen, None)), n, shape)]
    x = sample_chain(gen, z, None if labels is None else labels.to(device), noise=eps).float()  # every step
    x = (decode(x) if decode is not None else x).cpu()
    if len(shape) == 3:
        save_image_grid(x, path, ncol=8)
    else:
        save_scatter(x, path, reference=real(g, n)[0].cpu(), title=title)


def load_generator(path: str | Path, device="cpu") -> tuple[OneStepGenerator, dict]:
    """Rebuild an exported generator (a run folder or its `generator.safetensors`; a relative path missing from the
    working directory may name a package asset such as `assets/mnist_student.safetensors`); returns
    (generator, metadata).

    Text-to-image runs export a diffusers folder (`<run_dir>/diffusers`, see `t2i.export_diffusers`) and LoRA
    students their adapters (`<run_dir>/lora`, see `export.py`) instead: a folder holding either is read too.
    """
    path = Path(path)
    if not path.exists() and not path.is_absolute():  # a shipped asset, e.g. assets/mnist_student.safetensors
        packaged = Path(__file__).resolve().parent / path
        path = packaged if packaged.exists() else path
    if path.is_dir():  # a run folder or an export folder: LoRA adapters or a diffusers folder (`export.py`)
        from .export import find_export, load_export, read_meta

        folder = find_export(path)
        if folder is not None and read_meta(folder).get("format") == "lora":
            return load_export(folder, device)
        if folder is not None:
            from .teachers.t2i import load_t2i_generator

            return load_t2i_generator(folder, device)
        path = path / "generator.safetensors"
    if not path.exists():
        raise FileNotFoundError(
            f"no generator export at {path} (a finished run writes <run_dir>/generator.safetensors)"
        )
    state, meta = ckpt.load_safetensors(path)
    if meta.get("kind") != "dibregman-one-step-generator":
        raise ValueError(f"{path} is not a dibregman generator export (kind={meta.get('kind')!r})")
    net_meta = meta.get("network") or {}
    kinds = ("edm-unet", "mlp", "teacher-copy", "teacher-lora")
    if net_meta.get("type") not in kinds or "sigma_init" not in meta:
        raise ValueError(f"{path}: its JSON lacks a valid network description (type {' | '.join(kinds)})")
    if net_meta["type"] == "teacher-lora":
        from .networks.lora import lora_copy
        from .teachers import load_teacher

        net = lora_copy(load_teacher(net_meta["teacher"]), net_meta["rank"], tuple(net_meta["target_modules"]))
    elif net_meta["type"] == "edm-unet":
        net = build_unet(UNetConfig.from_dict(net_meta["config"]))
    elif net_meta["type"] == "mlp":
        net = MLPDenoiser(MLPConfig(**net_meta["config"]))
    else:
        from .teachers import load_teacher

        net = load_teacher(net_meta["teacher"])
    gen = Student(net, _ladder_of_meta(meta, path))
    problem = ckpt.describe_mismatch(state, gen.state_dict())
    if problem:
        raise ValueError(f"{path} and its JSON do not belong together ({problem})")
    gen.load_state_dict(state)
    return gen.to(device).eval().requires_grad_(False), meta


def _ladder_of_meta(meta: dict, path) -> list[float]:
    """The ladder an export records (`student_sigmas`), or [sigma_init] for an export written before few-step
    students (a one-step generator); ValueError naming the file for a ladder that does not start at sigma_init."""
    sigmas = meta.get("student_sigmas") or [meta["sigma_init"]]
    if abs(float(sigmas[0]) - float(meta["sigma_init"])) > 1e-6 * float(meta["sigma_init"]):
        raise ValueError(f"{path}: its student_sigmas {sigmas} do not start at its sigma_init {meta['sigma_init']}")
    return sigmas


EMA_SNAPSHOT = re.compile(r"^ema-(\d+)\.safetensors$")


def export_ema_snapshot(ema, cfg, run_dir: Path, num_images: int, conditional: bool = False) -> Path | None:
    """Keep the EMA generator as `<run_dir>/ema-<num_images>.safetensors` (+ .json, an export `load_generator`
    reads) whenever `run.keep_ema_every_kimg` > 0 and a multiple of it was crossed since the newest snapshot;
    called at each checkpoint (rank 0; not for conditional generators). A few MB each, never pruned: the
    FID-versus-images curve of `dibregman eval --run RUN --every-ckpt` reads them."""
    every = int((cfg.run.keep_ema_every_kimg or 0) * 1000)
    if every <= 0 or conditional or dist.rank() != 0:
        return None
    run_dir = Path(run_dir)
    done = [int(m.group(1)) for p in run_dir.glob("ema-*.safetensors") if (m := EMA_SNAPSHOT.match(p.name))]
    if num_images // every <= max(done, default=0) // every:
        return None
    meta = generator_meta(ema, cfg, num_images)
    return ckpt.export_safetensors(ema.state_dict(), meta, run_dir / f"ema-{num_images:012d}")


@torch.no_grad()
def generate(
    gen: OneStepGenerator, n: int, *, seed: int = 0, batch_size: int = 256, cond=None, device="cpu", steps=None
):
    """n samples of a student in `steps` steps (None: all it was trained with; a one-step generator: G(z)),
    z ~ N(0, I) and the chain's noise deterministic in `seed` (`ladder.py`'s rule); [n, *shape] on CPU."""
    shape, k = tuple(gen.denoiser.shape), check_steps(gen, steps)
    g, gens = torch.Generator().manual_seed(seed), chain_generators(seed, k)
    out = []
    for i in range(0, n, batch_size):
        m = min(batch_size, n - i)
        z = torch.randn((m, *shape), generator=g).to(device)
        eps = [e.to(device) for e in chain_noise(gens, m, shape)]  # eps_2..eps_k; [] for one step
        c = None if cond is None else cond[i : i + m].to(device)
        out.append(sample_chain(gen, z, c, k, noise=eps).float().cpu())
    return torch.cat(out)


def sample_export(gen, meta: dict, num: int, prompts: list[str], *, seed: int = 0, batch_size: int = 256, steps=None):
    """`num` samples of a loaded export and the columns of their grid: (samples on the CPU, ncol). A text-to-image
    export takes prompts (cycled, a column each) and only it does."""
    device = next(iter([*gen.parameters(), *gen.buffers()]), torch.empty(0)).device
    text_to_image = meta.get("kind") == "dibregman-one-step-text-to-image"
    if text_to_image != bool(prompts):
        raise ValueError("a text-to-image export needs --prompt/--prompts, and only such exports take them")
    if not text_to_image:  # a class-conditional generator: a class per column; a latent one: VAE-decoded
        den, ncol = gen.denoiser, min(16, num)
        labels = class_grid(num, int(getattr(den, "num_classes", 0) or 0), ncol)
        ncol = min(ncol, len(set(labels.tolist()))) if labels is not None else ncol
        x = generate(gen, num, seed=seed, batch_size=batch_size, cond=labels, device=device, steps=steps)
        if hasattr(den, "decode"):
            x = torch.cat([den.decode(x[i : i + 16].to(device)).cpu() for i in range(0, len(x), 16)])
        return x, ncol
    from .teachers.t2i import sample_images

    prompts = [prompts[i % len(prompts)] for i in range(max(num, len(prompts)))]
    x = sample_images(gen, prompts, seed=seed, batch_size=min(batch_size, 16), device=device, steps=steps)
    return x, min(len(set(prompts)), 16)


@torch.no_grad()
def generate_rows(
    gen, n: int, rows: slice, *, seed: int, batch_size: int, device, progress: bool, steps=None
) -> torch.Tensor:
    """Rows `rows` of `generate(gen, n, seed=seed, batch_size=batch_size, steps=steps)` (the same z and noise
    streams; the generator runs on those rows only: a torchrun rank's share), on the CPU, with a progress line."""
    from .metrics.progress import Progress

    shape, k = tuple(gen.denoiser.shape), check_steps(gen, steps)
    g, gens = torch.Generator().manual_seed(seed), chain_generators(seed, k)
    bar = Progress("generation", rows.stop - rows.start, enabled=progress)
    out = []
    for i in range(0, n, batch_size):
        z = torch.randn((min(batch_size, n - i), *shape), generator=g)
        eps = chain_noise(gens, len(z), shape)
        lo, hi = max(rows.start - i, 0), min(rows.stop - i, len(z))
        if lo < hi:
            noise = [e[lo:hi].to(device) for e in eps]
            out.append(sample_chain(gen, z[lo:hi].to(device), None, k, noise=noise).float().cpu())
            bar.update(hi - lo)
    return torch.cat(out) if out else torch.empty(0, *shape)
