"""Distillation configuration: frozen dataclasses are the single source of truth, named presets live in
`PRESETS`, and `--set section.key=value` overrides are applied by `override()` with clear errors.

The resolved config is written to `<run_dir>/config.json` and into every checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace


@dataclass(frozen=True)
class ModelConfig:
    teacher: str = "gmm:ring8"  # teacher spec, see dibregman.teachers.load_teacher
    real: str = "teacher"  # real side of the discriminator: dataset KIND:PATH, or "teacher" (exact/pooled samples)
    teacher_pool: int = 2048  # teacher samples drawn once for real="teacher" when no exact sampler exists
    teacher_pool_steps: int = 18  # Heun steps for that pool (2n-1 evaluations)
    sigma_init: float = 2.5  # G(z) = D_init(sigma_init * z, sigma_init) (SiD)
    init_steps: int = 2000  # analytic teachers only: steps fitting the MLP copy (G, psi) to the exact denoiser
    mlp_hidden: int = 128  # analytic teachers only: MLP width
    mlp_depth: int = 3  # analytic teachers only: MLP depth
    disc_placement: str = "fake_score"  # discriminator backbone: fake_score | teacher | separate
    disc_head: str = "linear"  # logit from features: linear (zero-initialised) | mean (SiDA: channel mean, no params)
    # text-to-image teachers (sd:DIR) only, see t2i.py:
    prompts: str = ""  # condition set D_c: prompts file (.txt lines, .csv/.jsonl with prompt|caption|text)
    guidance_scale: float = 3.0  # classifier-free guidance w of the teacher phi (copies are never guided)
    grad_checkpointing: bool = False  # gradient checkpointing in the trainable UNets (G and psi)
    fake_lora_rank: int = 0  # LoRA rank of the fake score psi's attention projections (0 = full weights)
    teacher_bf16: bool = False  # keep the frozen teacher UNet, VAE and text encoder in bf16
    real_cache: str = ""  # file caching the real side's latents (teacher pool / encoded images); "" = off


@dataclass(frozen=True)
class DivergenceConfig:
    name: str = "sba"  # registered divergence (dibregman divergences)
    lam: float = 5.0  # SBA lambda (sba only)
    alpha: float = 0.5  # alpha-divergence alpha (alpha only)
    logit_clamp: float = 10.0  # |l| <= clamp before weighting (0 = off)
    ratio_clip_min: float = 0.0  # clip r = e^{-l} to [min, max] (0 = off)
    ratio_clip_max: float = 0.0
    normalize: str = "sigma_bins"  # none | batch_mean | sigma_bins | softmax
    num_sigma_bins: int = 8  # bins in log sigma for normalize=sigma_bins
    weight_clip: float = 5.0  # clip normalised weights at this value (0 = off)


@dataclass(frozen=True)
class LossConfig:
    weighting: str = "dmd"  # w(t): dmd (divide by mean|x - D_teacher|) | unit (D_p - D_q) | score ((D_p - D_q)/sigma^2)
    gen_sigma_max: float = 0.0  # largest generator-step sigma (0 = teacher's sigma_max)
    gen_sigma_min: float = 0.0  # smallest generator-step sigma (0 = teacher's sigma_min)
    gen_t_max: float = 0.8  # generator sigma: Karras schedule at t ~ U[0, gen_t_max] (0 = sigma_max)
    disc_t_max: float = 0.95  # discriminator sigma: Karras schedule at t'' ~ U[0, disc_t_max] (Algorithm 1)
    fake_p_mean: float = -1.2  # fake-score DSM: ln(sigma) ~ N(p_mean, p_std^2) (EDM)
    fake_p_std: float = 1.2
    disc_weight: float = 1.0  # weight of the discriminator BCE in the critic loss
    gan_weight: float = 0.0  # weight of the generator's GAN term (0 = off)
    gan_warmup_kimg: float = 0.0  # GAN term switched on after this many thousand images
    gan_logit_clamp: float = 10.0  # logits clamped to +-this in the GAN term (SiDA)
    gen_warmup_kimg: float = 0.0  # generator frozen for the first N thousand images (critic warm-up)


@dataclass(frozen=True)
class OptimConfig:
    batch_size: int = 256  # global batch (all ranks, all accumulation rounds)
    accum_steps: int = 1  # gradient accumulation rounds per step
    gen_lr: float = 1e-4  # generator learning rate
    fake_lr: float = 1e-4  # fake score + discriminator learning rate
    head_lr_mult: float = 1.0  # learning-rate multiplier of the discriminator head's own parameters
    lr_schedule: str = "constant"  # constant | cosine: both lrs follow cos from 1 down to lr_final at total_kimg
    lr_final: float = 0.05  # cosine only: final lr as a fraction of the initial one
    beta1: float = 0.0  # AdamW beta1 (SiD/DMD use 0)
    beta2: float = 0.999  # AdamW beta2
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    grad_clip: float = 10.0  # global gradient-norm clip per network (0 = off)
    gen_every: int = 1  # generator updated every N critic steps (DMD2: 5)
    order: str = "critic_first"  # critic_first (SiDA) | generator_first (Algorithm 1)
    ema_halflife_kimg: float = 5.0  # generator EMA half-life, thousands of images (0 = off)
    bf16: bool = False  # bf16 autocast on CUDA (ignored on CPU)


@dataclass(frozen=True)
class RunConfig:
    total_kimg: float = 100.0  # training length, thousands of generator images
    log_every_kimg: float = 1.0  # JSONL / TensorBoard period
    ckpt_every_kimg: float = 10.0  # checkpoint period
    sample_every_kimg: float = 10.0  # sample-grid period (0 = off)
    keep_ckpts: int = 2  # checkpoints kept on disk
    seed: int = 0  # all randomness derives from (seed, step)
    max_bad_steps: int = 20  # abort after this many consecutive NaN/Inf steps
    threads: int = 0  # torch CPU threads (0 = default)
    device: str = "auto"  # auto | cpu | cuda
    tensorboard: bool = True  # also write TensorBoard scalars when tensorboard is installed


@dataclass(frozen=True)
class RewardConfig:
    """Reward-tilted distillation (Appendix G, `dibregman.reward`): distil p R / Z instead of p."""

    name: str = "none"  # none | constant | gmm_modes | mnist_class | python:MODULE:FUNCTION
    target: str = "auto"  # noisy-level R_t: auto | sigma (R of (x, sigma)) | denoised R(D_phi) | noisy R(x_t)
    modes: str = "0"  # gmm_modes: comma-separated components whose weight is multiplied by `boost`
    boost: float = 4.0  # gmm_modes: factor c_k of the chosen components (others 1)
    digit: int = 0  # mnist_class: R(x) = p(y = digit | x) under the shipped classifier
    classifier: str = ""  # mnist_class: classifier weights (empty = assets/mnist_classifier.safetensors)
    value: float = 1.0  # constant: R = value
    floor: float = 1e-6  # R clamped below at this value before the log
    z_estimator: str = "mean"  # normaliser Z = E_p[R] on real samples: mean (cumulative) | ema | fixed
    z_value: float = 0.0  # fixed: the known Z
    z_ema_kimg: float = 50.0  # ema: half-life in thousands of real samples
    z_init_samples: int = 4096  # real samples averaged into Z before step 0


@dataclass(frozen=True)
class DistillConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> DistillConfig:
        return override(cls(), {f"{s}.{k}": v for s, sec in d.items() for k, v in sec.items()})


CHOICES = {
    "model.disc_placement": ("fake_score", "teacher", "separate"),
    "model.disc_head": ("linear", "mean"),
    "divergence.normalize": ("none", "batch_mean", "sigma_bins", "softmax"),
    "loss.weighting": ("dmd", "unit", "score"),
    "optim.order": ("critic_first", "generator_first"),
    "optim.lr_schedule": ("constant", "cosine"),
    "run.device": ("auto", "cpu", "cuda"),
}


AT_LEAST = {  # lower bounds of counts, rates and periods (0 = off where the field says so)
    **dict.fromkeys(("model.teacher_pool", "model.teacher_pool_steps", "model.mlp_hidden", "model.mlp_depth"), 1),
    **dict.fromkeys(("model.init_steps", "optim.gen_lr", "optim.fake_lr", "optim.head_lr_mult"), 0),
    **dict.fromkeys(("optim.weight_decay", "optim.grad_clip", "optim.ema_halflife_kimg", "run.threads"), 0),
    **dict.fromkeys(("run.log_every_kimg", "run.ckpt_every_kimg", "run.sample_every_kimg"), 0),
    "run.max_bad_steps": 1,
}


def validate(cfg: DistillConfig) -> DistillConfig:
    """Raise ValueError for a config that cannot run; returns it unchanged otherwise."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ValueError(f"{key}={value!r} is not valid; choose one of {list(allowed)}")
    o = cfg.optim
    if o.batch_size < 1 or o.accum_steps < 1 or o.batch_size % o.accum_steps:
        raise ValueError(f"optim.batch_size={o.batch_size} must be a positive multiple of accum_steps={o.accum_steps}")
    if o.gen_every < 1:
        raise ValueError(f"optim.gen_every must be >= 1, got {o.gen_every}")
    if not 0 <= o.lr_final <= 1:
        raise ValueError(f"optim.lr_final must lie in [0, 1], got {o.lr_final}")
    if not 0 <= cfg.loss.gen_t_max <= 1 or not 0 <= cfg.loss.disc_t_max <= 1:
        raise ValueError("loss.gen_t_max and loss.disc_t_max must lie in [0, 1]")
    if cfg.run.total_kimg <= 0:
        raise ValueError(f"run.total_kimg must be > 0, got {cfg.run.total_kimg}")
    m = cfg.model
    if m.guidance_scale < 0 or m.fake_lora_rank < 0:
        raise ValueError(
            f"model.guidance_scale={m.guidance_scale} and model.fake_lora_rank={m.fake_lora_rank} must be >= 0"
        )
    if m.teacher.startswith("sd:") and not m.prompts:
        raise ValueError(
            "model.prompts is empty: a text-to-image teacher (sd:DIR) needs a prompts file (--prompts FILE)"
        )
    for section in fields(cfg):  # NaN/Inf is never valid, also for a parameter the chosen divergence ignores
        for f in fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{section.name}.{f.name}={value!r} must be a finite number")
    for key, low in AT_LEAST.items():
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < low:
            raise ValueError(f"{key}={getattr(getattr(cfg, section), name)!r} must be >= {low}")
    if not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1):
        raise ValueError(f"optim.beta1={o.beta1} and optim.beta2={o.beta2} must lie in [0, 1)")
    from . import divergences

    divergences.get(cfg.divergence.name, **divergence_params(cfg.divergence))  # raises on bad name/params
    from .reward import check_config

    check_config(cfg)  # the reward section (Appendix G)
    return cfg


def divergence_params(d: DivergenceConfig) -> dict:
    """The keyword parameters of the chosen divergence (lam for sba, alpha for alpha, none otherwise)."""
    return {"sba": {"lam": d.lam}, "alpha": {"alpha": d.alpha}}.get(d.name, {})


def _convert(value, current, key: str):
    if isinstance(current, bool):
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, bool | int):
            return bool(value)
    elif isinstance(current, int) and not isinstance(current, bool):
        if isinstance(value, int | float) and float(value).is_integer():
            return int(value)
    elif isinstance(current, float):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif isinstance(current, str):
        return str(value)
    raise ValueError(f"{key}: cannot use {value!r} for a {type(current).__name__} option")


def override(cfg: DistillConfig, pairs: dict) -> DistillConfig:
    """Apply {"section.key": value} overrides; unknown keys raise ValueError listing the valid ones."""
    sections = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    for key, value in pairs.items():
        section, _, name = key.partition(".")
        if section not in sections:
            raise ValueError(f"unknown config section {section!r} in {key!r}; valid: {sorted(sections)}")
        valid = [f.name for f in fields(sections[section])]
        if name not in valid:
            raise ValueError(f"unknown config key {key!r}; valid keys in {section!r}: {valid}")
        current = getattr(sections[section], name)
        sections[section] = replace(sections[section], **{name: _convert(value, current, key)})
    return replace(cfg, **sections)


def _preset(**sections) -> DistillConfig:
    cfg = DistillConfig()
    return replace(cfg, **{k: replace(getattr(cfg, k), **v) for k, v in sections.items()})


PRESETS: dict[str, DistillConfig] = {
    # The 8-mode 2-D ring with its exact teacher; MLP generator/fake score; exact metrics available.
    # Chosen by measurement (bench/tuning/gmm_grid.py: 86 runs of 1-1.5 M images, one core each; the grids and their
    # results are in bench/tuning/grids and bench/tuning/results):
    # - sigma_init 1.0: G starts as the (fitted) exact denoiser at sigma 1, already a soft 8-sector map; at 2.5 it is
    #   a blob that first unfolds into a 1-D curve, at 0.3-0.7 the MLP's small input/output scales slow it down.
    # - what limits "within 3 std" is the straight chords between neighbouring modes (where G maps the z-sector
    #   boundaries) and the modes' tangential width: G needs a steep map, i.e. capacity. Width 128 x depth 3 stalls
    #   near 0.86 (0.82-0.86 over 3 seeds), 256 x 4 near 0.92, 256 x 5 with the generator at lr 2e-3 reaches 0.95.
    #   Deeper (256 x 6) or a stronger GAN term gets sharper still but drops modes.
    # - lr 1e-3 (critic) / 2e-3 (generator), cosine decay, 50 kimg generator warm-up (the fake score first fits G,
    #   as in SiDA): at a constant 5e-3 the whole sample cloud jumped between modes every few kimg.
    # - GAN term 0.3 from 400 kimg: without it 0.91-0.92; at weight 1 or 3 the sharper runs lost modes (a GAN
    #   generator gradient only acts where G already puts mass: it never restores a dropped mode).
    # - batch 512 for 2000 kimg (3900 steps instead of 7800 of 128 for 1000 kimg: 1.4x the time): at batch 128 one of
    #   three seeds lost a mode (a share of 0.3 %) and the mode weights were uneven (MMD^2 3-9e-3); at 512 they even
    #   out (MMD^2 0.8-1.2e-3, 8/8 on both seeds tried) at the same sharpness.
    # - divergence kl (= reverse KL, weight 1): at the old settings SBA(5), the library default, collapsed onto 1-2
    #   modes in every variant tried; at these it keeps 8/8 (0.948 within 3 std) but with less even mode weights
    #   (MMD^2 2.8e-3 against 8.2e-4), and SBA(3) / SBA(10) lose modes. See BENCHMARKS.md (gmm_sweep).
    "gmm": _preset(
        model=dict(teacher="gmm:ring8", real="teacher", sigma_init=1.0, init_steps=2000, mlp_hidden=256, mlp_depth=5),
        divergence=dict(name="kl"),
        loss=dict(gen_sigma_max=2.0, gen_t_max=1.0, gen_warmup_kimg=50.0, gan_weight=0.3, gan_warmup_kimg=400.0),
        optim=dict(batch_size=512, gen_lr=2e-3, fake_lr=1e-3, lr_schedule="cosine", ema_halflife_kimg=20.0),
        run=dict(total_kimg=2000.0, log_every_kimg=20.0, ckpt_every_kimg=500.0, sample_every_kimg=500.0),
    ),
    # The shipped MNIST teacher (EDM U-Net, 28x28) against full MNIST (make data).
    "mnist": _preset(
        model=dict(teacher="edm:assets/mnist_teacher.safetensors", real="mnist:data/mnist"),
        # head_lr_mult: with the head at the fake score's lr the logits stayed flat (std 0.007 after 3.2 kimg,
        # discriminator accuracy 0.50), i.e. every divergence acted as reverse KL; x50 gave std 0.04 (measured).
        optim=dict(batch_size=64, gen_lr=2e-4, fake_lr=2e-4, head_lr_mult=50.0, ema_halflife_kimg=2.0),
        run=dict(total_kimg=40.0, log_every_kimg=1.0, ckpt_every_kimg=10.0, sample_every_kimg=5.0),
    ),
    # A CIFAR-10-sized EDM teacher (DDPM++ 55.7 M, e.g. imported with `dibregman import-edm`); SiDA's recipe.
    "cifar10": _preset(
        model=dict(teacher="edm:teachers/edm-cifar10-uncond.safetensors", real="cifar10:data/cifar-10-batches-py"),
        optim=dict(batch_size=256, gen_lr=1e-5, fake_lr=1e-5, ema_halflife_kimg=500.0, bf16=True),
        loss=dict(gan_weight=0.01, gan_warmup_kimg=200.0, gen_warmup_kimg=100.0),
        run=dict(total_kimg=200_000.0, log_every_kimg=50.0, ckpt_every_kimg=5000.0, sample_every_kimg=1000.0),
    ),
    # Stable Diffusion v1.5 at 512x512 (the paper's text-to-image run) on one GPU: give the local diffusers
    # folder (--teacher sd:DIR) and a prompts file (--prompts FILE). Data-free: the real side is a pool of
    # guided teacher samples (or --data captions:DIR for image + caption pairs).
    "sd15": _preset(
        model=dict(
            teacher="sd:models/stable-diffusion-v1-5",
            real="teacher",
            teacher_pool=1024,
            teacher_pool_steps=12,
            guidance_scale=3.0,
            grad_checkpointing=True,
        ),
        loss=dict(gan_weight=1e-3, gan_warmup_kimg=10.0),
        optim=dict(batch_size=16, accum_steps=2, gen_lr=1e-6, fake_lr=1e-6, ema_halflife_kimg=20.0, bf16=True),
        run=dict(total_kimg=400.0, log_every_kimg=1.0, ckpt_every_kimg=10.0, sample_every_kimg=10.0),
    ),
}


def get_preset(name: str) -> DistillConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {sorted(PRESETS)}")
    return PRESETS[name]


__all__ = [
    "DistillConfig",
    "ModelConfig",
    "DivergenceConfig",
    "LossConfig",
    "OptimConfig",
    "RunConfig",
    "RewardConfig",
    "PRESETS",
    "get_preset",
    "override",
    "validate",
    "divergence_params",
]
