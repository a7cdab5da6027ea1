"""Build the four networks of Algorithm 1 from a config: teacher phi (frozen), generator G_theta and fake score
psi (both copies of the teacher's network, line 1), discriminator eta (a head on a backbone), plus the sampler of
the real side of Eq. 5. A class-conditional teacher (`num_classes`, e.g. `dit:`) gets class labels as its
conditions c (`conditions.LabelSet`), like prompts in the text-to-image recipe, and the guidance
`model.guidance_scale` if it has one (the copies, made before, stay unguided). Analytic teachers have no network
to copy: an MLP denoiser is fitted to their exact denoiser and copied instead. A teacher family with its own
builder (text-to-image: `teachers/t2i.py`) is dispatched to through `teachers.FAMILIES`; nothing here branches on
a family.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import nn

from . import divergences
from .conditions import LabelSet
from .config import DistillConfig
from .draws import generator_for
from .generators import export_generator, preview_samples
from .ladder import make_student
from .models import Models
from .networks.discriminator import build_critic
from .networks.lora import full_copy, lora_copy
from .networks.mlp import MLPConfig, MLPDenoiser
from .noise import edm_preconditioning


def _frozen(net: nn.Module) -> nn.Module:
    return net.eval().requires_grad_(False)


def _trainable_copy(net: nn.Module) -> nn.Module:
    # eval(): no dropout, so a run is a deterministic function of its seed; gradients still flow. full_copy: weights
    # the teacher shares with LoRA copies (`networks/lora.py`) are copied too.
    return full_copy(net).eval().requires_grad_(True)


def pretrain_mlp(teacher, cfg: DistillConfig, device) -> MLPDenoiser:
    """Fit an MLP denoiser to an analytic teacher's exact denoiser (the stand-in for 'copy the teacher's weights').

    Regression on the exact posterior mean D_phi(x, sigma) (no noisy DSM targets), with EDM's loss weight
    1 / c_out^2, at two kinds of points: noisy data x0 + sigma n with log-uniform sigma over the teacher's range,
    and the generator's own inputs sigma_init * z at sigma_init, where G = D(sigma_init z, sigma_init) evaluates
    the copy far from the data. Cosine-decayed Adam; `model.init_steps` steps of 512 points.
    """
    m = cfg.model
    dim = int(teacher.shape[0])
    torch.manual_seed(cfg.run.seed)
    net = MLPDenoiser(
        MLPConfig(
            dim=dim,
            hidden=m.mlp_hidden,
            depth=m.mlp_depth,
            sigma_data=teacher.sigma_data,
            sigma_min=teacher.sigma_min,
            sigma_max=teacher.sigma_max,
        )
    ).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(m.init_steps, 1))
    g = generator_for(cfg.run.seed, "init")
    lo, hi = math.log(teacher.sigma_min), math.log(teacher.sigma_max)
    n_data, n_gen = 256, 256
    for _ in range(m.init_steps):
        x0 = teacher.sample(n_data, generator=g).cpu()
        s_data = (lo + (hi - lo) * torch.rand(n_data, generator=g, dtype=x0.dtype)).exp()
        x_data = x0 + s_data[:, None] * torch.randn(x0.shape, generator=g, dtype=x0.dtype)
        s_gen = torch.full((n_gen,), m.sigma_init, dtype=x0.dtype)
        x_gen = m.sigma_init * torch.randn(n_gen, dim, generator=g, dtype=x0.dtype)
        x, sigma = torch.cat([x_data, x_gen]), torch.cat([s_data, s_gen])
        x, sigma = x.to(device), sigma.to(device)
        target = teacher(x, sigma)
        c_out = edm_preconditioning(sigma[:, None], teacher.sigma_data)[1]
        loss = ((net(x, sigma) - target) / c_out).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()
    return net


def real_sampler(cfg: DistillConfig, teacher, shape, device, labels=None) -> Callable:
    """draw(generator, n) -> ([n, *shape] real samples, their labels [n] or None): data set, exact teacher samples,
    or a teacher pool. labels: the `LabelSet` of a class-conditional teacher (pool samples of drawn labels, data
    with its labels), else None."""
    spec = cfg.model.real
    if spec == "teacher" and hasattr(teacher, "sample"):
        return lambda g, n: (teacher.sample(n, generator=g).to(device), None)
    pool_labels = None
    if spec == "teacher":
        from .sample import sample_teacher

        g = generator_for(cfg.run.seed, "teacher_pool")
        num, steps = cfg.model.teacher_pool, cfg.model.teacher_pool_steps
        pool_labels = labels.draw(g, num) if labels is not None else None
        pool = sample_teacher(teacher, num, num_steps=steps, generator=g, cond=pool_labels)
    else:
        pool, pool_labels = _real_data(spec, teacher, labels)
    if tuple(pool.shape[1:]) != tuple(shape):
        raise ValueError(f"real data {spec!r} has shape {tuple(pool.shape[1:])} but the teacher makes {tuple(shape)}")
    pool = pool.to(device)
    if pool_labels is None:
        return lambda g, n: (pool[torch.randint(len(pool), (n,), generator=g).to(device)], None)

    def draw(g: torch.Generator, n: int):
        index = torch.randint(len(pool), (n,), generator=g)
        return pool[index.to(device)], pool_labels[index]

    return draw


def _real_data(spec: str, teacher, labels) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A data set's samples (VAE latents for a latent-space teacher) and, for a class-conditional teacher, labels."""
    from .data import load_dataset

    pool, data_labels = load_dataset(spec)
    if labels is not None and (data_labels is None or int(data_labels.max()) >= len(labels)):
        raise ValueError(f"real data {spec!r} needs labels in [0, {len(labels)}) for a class-conditional teacher")
    if hasattr(teacher, "encode") and pool.ndim == 4 and pool.shape[1] == 3:  # images -> the teacher's latents
        device = next(teacher.parameters()).device
        pool = torch.cat([teacher.encode(pool[i : i + 64].to(device)).cpu() for i in range(0, len(pool), 64)])
    return pool, (data_labels if labels is not None else None)


def build_models(cfg: DistillConfig, device: torch.device, *, pretrain: Callable | None = None) -> Models:
    """The networks of Algorithm 1 for `cfg`: the teacher family's own builder (`teachers.FAMILIES`), else
    `native_models`. pretrain: see `native_models`."""
    from .teachers import family, load_teacher

    teacher = _frozen(load_teacher(cfg.model.teacher).to(device))
    build = family(cfg.model.teacher).build
    return build(cfg, teacher, device) if build is not None else native_models(cfg, teacher, device, pretrain)


def native_models(cfg: DistillConfig, teacher, device, pretrain: Callable | None = None) -> Models:
    """G and psi copy the teacher's network (line 1); eta is a head on psi, the teacher or a small net of its own.
    pretrain(teacher, cfg, device) -> nn.Module fits the network to copy for an analytic teacher (default
    `pretrain_mlp`; a benchmark may inject a cached one)."""
    if cfg.model.prompts:
        raise ValueError(f"model.prompts is set but teacher {cfg.model.teacher!r} takes no text conditions")
    shape = tuple(teacher.shape)
    if hasattr(teacher, "feature_depth"):  # a transformer: where the head reads its tokens (copies inherit it)
        teacher.feature_depth = cfg.model.feature_depth
    analytic = hasattr(teacher, "sample") and not any(True for _ in teacher.parameters())
    init = (pretrain or pretrain_mlp)(teacher, cfg, device) if analytic else teacher
    generator = make_student(_student_copy(init, cfg.model, analytic), cfg, teacher).to(
        device
    )  # K = 1: OneStepGenerator
    fake = _trainable_copy(init).to(device)
    num_classes = int(getattr(teacher, "num_classes", 0) or 0)  # class-conditional: labels are the conditions
    labels = LabelSet(num_classes) if num_classes else None
    if labels is not None and hasattr(teacher, "guidance_scale"):
        teacher.guidance_scale = cfg.model.guidance_scale  # after copying: only phi is guided
    m = cfg.model
    critic = build_critic(fake, m.disc_head, m.disc_placement, teacher=teacher, init=init).to(device)
    real = real_sampler(cfg, teacher, shape, device, labels)
    decode = getattr(teacher, "decode", None)  # a latent-space teacher's pictures are decoded
    preview = functools.partial(preview_samples, real=real, shape=shape, num_classes=num_classes, decode=decode)
    sd = float(teacher.sigma_data)
    return Models(teacher, generator, critic, shape, sd, real, export_generator, preview, labels, labels)


def _student_copy(init: nn.Module, m, analytic: bool) -> nn.Module:
    """G's network: a full trainable copy, or LoRA adapters on init's frozen weights (`model.student_lora_rank`)."""
    if not m.student_lora_rank:
        return _trainable_copy(init)
    if analytic:
        raise ValueError(
            "model.student_lora_rank needs a teacher network to adapt; an analytic teacher has none: use 0"
        )
    return lora_copy(init, m.student_lora_rank, share_base=m.share_lora_base)


def objective(cfg: DistillConfig) -> tuple[divergences.Divergence, divergences.Stabilizer]:
    """The divergence (weight h''(r) r) and the stabiliser of `cfg.divergence`: what Eq. 4's weight is made of."""
    from .config import divergence_params

    return divergences.get(cfg.divergence.name, **divergence_params(cfg.divergence)), stabilizer(cfg)


def stabilizer(cfg: DistillConfig) -> divergences.Stabilizer:
    """The numerical choices of `cfg.divergence` applied on top of the exact weights (`divergences.Stabilizer`)."""
    d = cfg.divergence
    clip = (d.ratio_clip_min, d.ratio_clip_max) if d.ratio_clip_max is not None else None
    return divergences.Stabilizer(
        logit_clamp=d.logit_clamp,
        ratio_clip=clip,
        normalize=d.normalize,
        num_sigma_bins=d.num_sigma_bins,
        weight_clip=d.weight_clip,
    )
