"""Distillation configuration: frozen dataclasses are the single source of truth, named presets live in
`PRESETS`, and `--set section.key=value` overrides are applied by `override()` with clear errors.

The resolved config is written to `<run_dir>/config.json` and into every checkpoint.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Literal, get_args, get_origin

from .distill import Weighting
from .divergences import Normalize, divergence_params
from .noise import SigmaScheduleName


def opt(default, help: str):  # noqa: A002
    """A config field: its default and its help (read by `describe_keys` and `dibregman distill --list-keys`)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ModelConfig:
    teacher: str = opt("gmm:ring8", "teacher spec KIND:ARG, see dibregman.teachers.load_teacher")
    real: str = opt("teacher", "real side of the discriminator: dataset KIND:PATH, or 'teacher' (its samples)")
    teacher_pool: int = opt(2048, "teacher samples drawn once for real='teacher' when no exact sampler exists")
    teacher_pool_steps: int = opt(18, "Heun steps for that pool (2n-1 evaluations)")
    sigma_init: float = opt(2.5, "G(z) = D_init(sigma_init * z, sigma_init) (SiD)")
    student_steps: int = opt(1, "K-step student (ladder.py): 1 = the one-step generator; 2, 4, ...")
    student_sigmas: str | None = opt(
        None,
        "the student's ladder sigma_1 > ... > sigma_K, e.g. 2.5,0.8 (sigma_1 = sigma_init); None = the "
        "teacher family's default (ladder.py: EDM sigma, or even in flow time t for flow teachers)",
    )
    init_steps: int = opt(2000, "analytic teachers: steps fitting the MLP copy (G, psi) to the exact denoiser")
    mlp_hidden: int = opt(128, "analytic teachers: MLP width")
    mlp_depth: int = opt(3, "analytic teachers: MLP depth")
    disc_placement: Literal["fake_score", "teacher", "separate"] = opt("fake_score", "discriminator backbone")
    disc_head: Literal["linear", "mean"] = opt(
        "linear", "logit from features: linear (zero-initialised) | mean (SiDA: channel mean, no parameters)"
    )
    prompts: str | None = opt(None, "text-to-image: condition set D_c, a prompts file (.txt, .csv/.jsonl)")
    guidance_scale: float = opt(3.0, "text-to-image: classifier-free guidance of the teacher (copies unguided)")
    grad_checkpointing: bool = opt(
        False,
        "activation checkpointing of G and psi: their blocks (TeacherFamily.blocks) are recomputed in the backward "
        "pass (text-to-image: diffusers' own switch)",
    )
    fake_lora_rank: int = opt(0, "text-to-image: LoRA rank of psi's attention projections (0 = full weights)")
    student_lora_rank: int = opt(
        0,
        "LoRA rank of the student G: PEFT adapters on the teacher's network (targets per network class: "
        "networks/lora.py STUDENT_TARGETS), exported as pytorch_lora_weights.safetensors (0 = full weights)",
    )
    share_lora_base: bool = opt(
        True,
        "LoRA networks (G, psi, G's EMA) use the teacher's frozen weight tensors themselves: one copy in memory "
        "(with teacher_bf16 that base is bf16 for all of them; False: each holds its own float32 copy)",
    )
    teacher_bf16: bool = opt(False, "text-to-image: keep the frozen teacher UNet, VAE and text encoder in bf16")
    real_cache: str | None = opt(None, "text-to-image: file caching the real side's latents (None = off)")
    resolution: int | None = opt(None, "sd3/flux: image side in pixels (None = SD3's sample_size, FLUX's 1024)")
    feature_depth: float = opt(
        0.5,
        "transformer teachers (sd3, flux, dit): the discriminator reads the image tokens after block "
        "ceil(feature_depth * num_blocks), in (0, 1] (FastGen taps 0.5/0.75/0.99; 0.5 mirrors a U-Net's "
        "bottleneck and runs half the blocks); U-Nets always read their bottleneck",
    )


@dataclass(frozen=True)
class DivergenceConfig:
    name: str = opt("sba", "registered divergence (dibregman divergences)")
    lam: float = opt(5.0, "SBA lambda (sba only)")
    alpha: float = opt(0.5, "alpha-divergence alpha (alpha only)")
    logit_clamp: float | None = opt(10.0, "|l| <= clamp before weighting (None = off)")
    ratio_clip_min: float = opt(0.0, "clip r = e^{-l} to [ratio_clip_min, ratio_clip_max] (0 = no lower clip)")
    ratio_clip_max: float | None = opt(None, "see ratio_clip_min (None = off)")
    normalize: Normalize = opt(
        "sigma_bins",
        "self-normalisation of the weights: sigma_bins divides h''(r) r by its mean within each log-sigma bin (every "
        "noise level keeps its mean weight w(t)); batch_mean (= softmax) by the batch mean, which let SBA(5) on MNIST "
        "put the step on the small sigmas and diverge (bench/tuning/results/mnist_recipe_probes)",
    )
    num_sigma_bins: int = opt(8, "bins in log sigma for normalize=sigma_bins")
    weight_clip: float | None = opt(5.0, "clip normalised weights at this value (None = off)")
    shuffle_weights: bool = opt(
        False,
        "placebo control: permute the stabilised weights at random among the samples of each log-sigma bin "
        "(num_sigma_bins bins): the same weights, assigned to random samples",
    )


@dataclass(frozen=True)
class LossConfig:
    weighting: Weighting = opt("dmd", "w(t): dmd (D_p - D_q over mean|x - D_p|) | unit (D_p - D_q) | score")
    gen_sigma_max: float | None = opt(None, "largest generator-step sigma (None = the teacher's sigma_max)")
    gen_sigma_min: float | None = opt(None, "smallest generator-step sigma (None = the teacher's sigma_min)")
    sigma_schedule: SigmaScheduleName = opt(
        "karras",
        "sigma of the generator step, the discriminator and fake_sigma=generator: a position t ~ U[0, gen_t_max] "
        "(disc_t_max) on [gen_sigma_min, gen_sigma_max], 0 = the top, maps to sigma by: karras (EDM, rho 7) | "
        "flow_uniform (flow time uniform, sigma = t/(1-t)) | flow_logit_normal (logit of flow time ~ "
        "N(flow_t_mean, flow_t_std^2), SD3); flow_* suit flow teachers (README, Flow-matching teachers)",
    )
    flow_shift: float = opt(1.0, "flow_* schedules: SD3's shift t -> s t / (1 + (s-1) t) of the draw (>1: noisier)")
    flow_t_mean: float = opt(0.0, "flow_logit_normal: mean of logit(t) (SD3: 0; < 0 favours low noise)")
    flow_t_std: float = opt(1.0, "flow_logit_normal: std of logit(t) (SD3: 1; larger spreads to both ends)")
    gen_t_max: float = opt(0.8, "generator sigma: sigma_schedule at t ~ U[0, gen_t_max] (0 = sigma_max)")
    gen_t_origin: Literal["sigma_max", "sigma_min"] = opt(
        "sigma_max", "which end t = 0 is: sigma_max (sigma in [S(gen_t_max), max]) | sigma_min (SiD's code)"
    )
    disc_t_max: float = opt(0.95, "discriminator sigma: sigma_schedule at t ~ U[0, disc_t_max] (Algorithm 1)")
    fake_p_mean: float = opt(-1.2, "fake-score DSM: ln(sigma) ~ N(p_mean, p_std^2) (EDM)")
    fake_p_std: float = opt(1.2, "see fake_p_mean")
    fake_sigma: Literal["lognormal", "generator"] = opt(
        "lognormal", "fake-score DSM sigma: lognormal (EDM, fake_p_*) | generator (the generator step's draw)"
    )
    disc_weight: float = opt(1.0, "weight of the discriminator BCE in the critic loss")
    gan_weight: float = opt(0.0, "weight of the generator's GAN term (0 = off)")
    gan_warmup_kimg: float = opt(0.0, "GAN term switched on after this many thousand images")
    gan_logit_clamp: float = opt(10.0, "logits clamped to +-this in the GAN term (SiDA)")
    gen_warmup_kimg: float = opt(0.0, "generator frozen for the first N thousand images (critic warm-up)")
    regression_weight: float = opt(
        0.0,
        "DMD's regression term: weight x per-sample MSE between G(z) and the teacher's ODE solution from the same z, "
        "over a fixed set of pairs made at the start (0 = off; regression.py; mode coverage)",
    )
    regression_pairs: int = opt(4096, "number of (z, teacher ODE sample) pairs, kept in the run folder")
    regression_steps: int = opt(18, "Heun intervals of the teacher's ODE for the pairs (2n - 1 evaluations each)")
    student_inputs: Literal["backward_sim", "noised_data"] = opt(
        "backward_sim",
        "K > 1: the trained step's input: backward_sim (DMD2: the student's own chain, no gradient through earlier "
        "steps) | noised_data (FastGen: model.real samples noised to sigma_k); methods/fewstep.py",
    )


@dataclass(frozen=True)
class OptimConfig:
    batch_size: int = opt(256, "global batch (all ranks, all accumulation rounds)")
    accum_steps: int = opt(1, "gradient accumulation rounds per step")
    gen_lr: float = opt(1e-4, "generator learning rate")
    fake_lr: float = opt(1e-4, "fake score + discriminator learning rate")
    head_lr_mult: float = opt(1.0, "learning-rate multiplier of the discriminator head's own parameters")
    lr_schedule: Literal["constant", "cosine"] = opt("constant", "cosine: both lrs fall to lr_final at total_kimg")
    lr_final: float = opt(0.05, "cosine only: final lr as a fraction of the initial one")
    beta1: float = opt(0.0, "AdamW beta1 (SiD/DMD use 0)")
    beta2: float = opt(0.999, "AdamW beta2")
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay")
    grad_clip: float | None = opt(10.0, "global gradient-norm clip per network (None = off)")
    gen_every: int = opt(1, "generator updated every N critic steps (DMD2: 5)")
    order: Literal["critic_first", "generator_first"] = opt("critic_first", "SiDA | Algorithm 1")
    ema_halflife_kimg: float = opt(5.0, "generator EMA half-life, thousands of images (0 = off)")
    bf16: bool = opt(False, "bf16 autocast on CUDA (ignored on CPU)")


@dataclass(frozen=True)
class RunConfig:
    total_kimg: float = opt(100.0, "training length, thousands of generator images")
    log_every_kimg: float = opt(1.0, "JSONL / TensorBoard period")
    ckpt_every_kimg: float = opt(10.0, "checkpoint period")
    sample_every_kimg: float | None = opt(10.0, "sample-picture period (None = off)")
    keep_ckpts: int = opt(2, "checkpoints kept on disk (>= 1; the newest healthy one is never pruned)")
    keep_ema_every_kimg: float | None = opt(None, "also keep the EMA generator as ema-<images>.safetensors this often")
    seed: int = opt(0, "all randomness derives from (seed, stream, counters): draws.seed_for")
    max_bad_steps: int = opt(20, "abort after this many consecutive NaN/Inf steps")
    threads: int | None = opt(None, "torch CPU threads (None = torch's default)")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where to train")
    parallel: Literal["auto", "none", "ddp", "fsdp"] = opt(
        "auto",
        "data parallelism (parallel.py): auto (ddp under torchrun, else none) | none (one process) | ddp "
        "(DistributedDataParallel: bucketed all-reduce overlapped with backward) | fsdp (FSDP2 fully_shard)",
    )
    cpu_offload: bool = opt(False, "parallel=fsdp: keep parameters, gradients and AdamW states on the CPU")
    compile: bool = opt(False, "torch.compile G's and the critic's forward (bench/results/compile_speed.md)")
    tensorboard: bool = opt(True, "also write TensorBoard scalars when tensorboard is installed")


@dataclass(frozen=True)
class RewardConfig:
    """Reward-tilted distillation (Appendix G, `dibregman.rewards`): distil p R / Z instead of p."""

    name: str = opt("none", "none | constant | gmm_modes | mnist_class | python:MODULE:FUNCTION")
    target: Literal["auto", "sigma", "denoised", "noisy"] = opt(
        "auto", "noisy-level R_t: R of (x, sigma) | R(D_phi(x_t)) | R(x_t); auto picks"
    )
    modes: str = opt("0", "gmm_modes: comma-separated components whose weight is multiplied by boost")
    boost: float = opt(4.0, "gmm_modes: factor c_k of the chosen components (others 1)")
    digit: int = opt(0, "mnist_class: R(x) = p(y = digit | x) under the shipped classifier")
    classifier: str | None = opt(None, "mnist_class: classifier weights (None = the shipped asset)")
    value: float = opt(1.0, "constant: R = value")
    floor: float = opt(1e-6, "R clamped below at this value before the log")
    z_estimator: Literal["mean", "ema", "fixed"] = opt("mean", "normaliser Z = E_p[R] on real samples")
    z_value: float = opt(0.0, "fixed: the known Z")
    z_ema_kimg: float = opt(50.0, "ema: half-life in thousands of real samples")
    z_init_samples: int = opt(4096, "real samples averaged into Z before step 0")


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


def choices(section_cls) -> dict[str, tuple]:
    """{field: allowed values} of the `Literal[...]` fields of a config section."""
    hints = typing.get_type_hints(section_cls)
    return {f.name: get_args(hints[f.name]) for f in fields(section_cls) if get_origin(hints[f.name]) is Literal}


AT_LEAST = {  # lower bounds of counts, rates and periods (0 = off where the field says so)
    **dict.fromkeys(("model.teacher_pool", "model.teacher_pool_steps", "model.mlp_hidden", "model.mlp_depth"), 1),
    **dict.fromkeys(("model.init_steps", "optim.gen_lr", "optim.fake_lr", "optim.head_lr_mult"), 0),
    **dict.fromkeys(("optim.weight_decay", "optim.grad_clip", "optim.ema_halflife_kimg", "run.threads"), 0),
    **dict.fromkeys(("run.log_every_kimg", "run.ckpt_every_kimg", "run.sample_every_kimg"), 0),
    **dict.fromkeys(("run.max_bad_steps", "run.keep_ckpts"), 1),
    "model.resolution": 1,
    "model.student_lora_rank": 0,
}


def validate(cfg: DistillConfig) -> DistillConfig:
    """Raise ValueError for a config that cannot run; returns it unchanged otherwise."""
    for sec in fields(cfg):
        section = getattr(cfg, sec.name)
        for name, allowed in choices(type(section)).items():
            if getattr(section, name) not in allowed:
                key, value = f"{sec.name}.{name}", getattr(section, name)
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
    from .noise import check_sigma_cover

    check_sigma_cover(cfg.loss, 1e-3 if cfg.model.teacher.startswith("gmm:") else 0.002)
    L = cfg.loss
    if L.regression_weight < 0 or (L.regression_weight > 0 and (L.regression_pairs < 1 or L.regression_steps < 1)):
        raise ValueError(
            f"loss.regression_weight={L.regression_weight} must be >= 0, and with it loss.regression_pairs="
            f"{L.regression_pairs} and loss.regression_steps={L.regression_steps} >= 1"
        )
    if cfg.run.total_kimg <= 0:
        raise ValueError(f"run.total_kimg must be > 0, got {cfg.run.total_kimg}")
    m = cfg.model
    if m.guidance_scale < 0 or m.fake_lora_rank < 0:
        raise ValueError(
            f"model.guidance_scale={m.guidance_scale} and model.fake_lora_rank={m.fake_lora_rank} must be >= 0"
        )
    if not 0 < m.feature_depth <= 1:
        raise ValueError(f"model.feature_depth={m.feature_depth} must lie in (0, 1] (a fraction of the blocks)")
    if m.disc_placement == "teacher" and m.disc_head == "mean":
        raise ValueError(
            "model.disc_placement='teacher' with model.disc_head='mean' has no trainable parameter (the teacher "
            "is frozen, the head parameter-free): use disc_head='linear' or another placement"
        )
    from .teachers import FAMILIES

    kind = m.teacher.partition(":")[0]
    if kind in FAMILIES and FAMILIES[kind].prompts and not m.prompts:
        raise ValueError(
            f"model.prompts is empty: a text-to-image teacher ({kind}:DIR) needs a prompts file (--prompts FILE)"
        )
    for section in fields(cfg):  # NaN/Inf is never valid, also for a parameter the chosen divergence ignores
        for f in fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{section.name}.{f.name}={value!r} must be a finite number")
    for key, low in AT_LEAST.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and value < low:  # None: off
            raise ValueError(f"{key}={value!r} must be >= {low}")
    if not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1):
        raise ValueError(f"optim.beta1={o.beta1} and optim.beta2={o.beta2} must lie in [0, 1)")
    from . import divergences

    divergences.get(cfg.divergence.name, **divergence_params(cfg.divergence))  # raises on bad name/params
    from .rewards import check_config

    check_config(cfg)  # the reward section (Appendix G)
    from .ladder import check_config as check_student

    check_student(cfg)  # model.student_steps / student_sigmas (few-step students)
    return cfg


def saved_divergence_params(section: dict) -> dict:
    """`divergence_params` of a saved config's `divergence` section (a dict; keys this version lacks are ignored)."""
    known = {f.name for f in fields(DivergenceConfig)}
    return divergence_params(DivergenceConfig(**{k: v for k, v in section.items() if k in known}))


def _convert(value, current, key: str, hint=None):
    """value as the type of the field (`current`'s, or the non-None type of an optional field's `hint`). An
    optional field (`X | None`) takes None, JSON null, and 0 or '' as None: "off" has one spelling."""
    options = get_args(hint) if get_origin(hint) is types.UnionType else ()
    if type(None) in options:
        if value is None or (not isinstance(value, bool) and value in (0, "", "null", "none", "None")):
            return None
        current = next(a for a in options if a is not type(None))()
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
        current, hint = getattr(sections[section], name), typing.get_type_hints(type(sections[section]))[name]
        sections[section] = replace(sections[section], **{name: _convert(value, current, key, hint)})
    return replace(cfg, **sections)


def _parse_value(text: str):
    """`--set key=value`: JSON values where they parse (numbers, true/false, lists), plain strings otherwise."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_set(pairs: list[str] | None) -> dict:
    """["section.key=value", ...] (the CLI's `--set`) -> {"section.key": value} for `override`."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = _parse_value(value)
    return out


__all__ = [
    "DistillConfig",
    "ModelConfig",
    "DivergenceConfig",
    "LossConfig",
    "OptimConfig",
    "RunConfig",
    "RewardConfig",
    "override",
    "parse_set",
    "choices",
    "validate",
    "divergence_params",
]
