"""Named presets (edm2's `config_presets`): the `gmm`, `mnist`, `cifar10` and `sd15` starting points, each a
frozen `DistillConfig`; `get_preset` and `from_preset` (the one path of the CLI and `api.preset`). `mnist-paper` is
`mnist` run the paper's way (`PAPER_DESIGN`).

Why each preset's values are what they are: the comments beside them and `bench/tuning/README.md`.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

from .config import DistillConfig, override, validate


def _preset(**sections) -> DistillConfig:
    cfg = DistillConfig()
    return replace(cfg, **{k: replace(getattr(cfg, k), **v) for k, v in sections.items()})


# The paper's own design (Algorithm 1 and Appendix D; its critic is SiDA's), applied over a preset:
# - the `mean` head: the logit is the mean of psi's pooled encoder features, no parameters of its own;
# - raw weights h''(r) r: no normalisation and no weight cap. What remains is one numerical safety: logits clamped
#   to [-8, 8] (SiDA and FastGen clamp at 10), the widest clamp that keeps e^{lam |l|} finite in float32 for every
#   |lam| <= 10 (10 x 8 = 80 < ln(3.4e38) = 88.7); a step whose gradient still overflows is skipped and counted
#   like any non-finite step;
# - the generator's t ~ U[0, 1] over the whole sigma range (and the critic's alike);
# - no GAN term (the paper's experiments train without it).
PAPER_DESIGN = {
    "model.disc_head": "mean",
    "divergence.normalize": "none",
    "divergence.weight_clip": None,
    "divergence.logit_clamp": 8.0,
    "loss.gen_t_max": 1.0,
    "loss.disc_t_max": 1.0,
    "loss.gan_weight": 0.0,
}

PRESETS: dict[str, DistillConfig] = {
    # The 8-mode 2-D ring with its exact teacher; MLP generator/fake score; exact metrics available. Chosen by
    # measurement: bench/tuning/README.md tells how.
    "gmm": _preset(
        model=dict(teacher="gmm:ring8", real="teacher", sigma_init=1.0, init_steps=2000, mlp_hidden=256, mlp_depth=5),
        divergence=dict(name="kl"),
        # disc_t_max 1: the discriminator covers every generator sigma (at 0.95, 5 % fell below its range)
        loss=dict(
            gen_sigma_max=2.0,
            gen_t_max=1.0,
            disc_t_max=1.0,
            gen_warmup_kimg=50.0,
            gan_weight=0.3,
            gan_warmup_kimg=400.0,
            # DMD's regression towards the teacher's ODE map: on 25 uneven modes the preset without it dropped
            # 6-9 modes (3 seeds), with it none (bench/results/gmm_coverage/README.md)
            regression_weight=1.0,
        ),
        optim=dict(batch_size=512, gen_lr=2e-3, fake_lr=1e-3, lr_schedule="cosine", ema_halflife_kimg=20.0),
        run=dict(total_kimg=2000.0, log_every_kimg=20.0, ckpt_every_kimg=500.0, sample_every_kimg=500.0),
    ),
    # The shipped MNIST teacher (EDM U-Net, 28x28) against full MNIST (make data).
    "mnist": _preset(
        model=dict(teacher="edm:assets/mnist_teacher.safetensors", real="mnist:data/mnist"),
        # The stable recipe (bench/tuning/results/mnist_oscillation/README.md): the fake score trained at the
        # generator step's sigma (it lagged exactly there and the generator oscillated), the generator's lr half
        # the critic's, a cosine decay to 0.1 and an EMA of 10 kimg.
        loss=dict(fake_sigma="generator"),
        # Reverse KL: in our run of the paper's Figure 4 on this teacher (bench/results/mnist_sweep.json, 150k
        # images, two seeds) it has the best final FID; LR, forward KL and SBA(1) tie it, SBA(3), SBA(5) and SBA(10)
        # are worse beyond the seed spread. `--divergence sba --set divergence.lam=5` gives the paper's setting.
        divergence=dict(name="rkl"),
        # head_lr_mult: with the head at the fake score's lr the logits stayed flat (std 0.007 after 3.2 kimg,
        # discriminator accuracy 0.50), i.e. every divergence acted as reverse KL; x50 gave std 0.04 (measured).
        optim=dict(
            batch_size=64,
            gen_lr=1e-4,
            fake_lr=2e-4,
            head_lr_mult=50.0,
            lr_schedule="cosine",
            lr_final=0.1,
            ema_halflife_kimg=10.0,
        ),
        run=dict(total_kimg=300.0, log_every_kimg=2.0, ckpt_every_kimg=10.0, sample_every_kimg=10.0),
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
PRESETS["mnist-paper"] = override(PRESETS["mnist"], PAPER_DESIGN)


def from_preset(name: str, pairs: dict) -> DistillConfig:
    """Preset `name` with {"section.key": value} overrides, validated: the one path of the CLI and `api.preset`.

    One rule for a reward with the GAN or the regression term (both pull q to p, a reward tilts it to p r*): a
    reward requested on a preset with such a term drops the term, with a warning; a weight set together with a
    reward is refused."""
    cfg = get_preset(name)
    if pairs.get("reward.name", "none") != "none":
        for key, term in (("gan_weight", "GAN term"), ("regression_weight", "regression term")):
            if getattr(cfg.loss, key) > 0 and f"loss.{key}" not in pairs:
                warnings.warn(f"a reward turns off the {name!r} preset's {term} (loss.{key} -> 0)", stacklevel=2)
                pairs = {**pairs, f"loss.{key}": 0.0}
    return validate(override(cfg, pairs))


def get_preset(name: str) -> DistillConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {sorted(PRESETS)}")
    return PRESETS[name]


__all__ = ["PAPER_DESIGN", "PRESETS", "get_preset", "from_preset"]
