"""Ratio calibration: does the engine's discriminator logit l_t(x) recover the exact log p_t(x) / q_t(x)?

On an analytic pair, teacher p and a *fixed* "student" q (both `GaussianMixture`s, so every noisy marginal has an
exact log-density), the fake score psi and the discriminator eta are built and trained exactly as the engine does:

- networks: the MLP fitted to p's exact denoiser (`build.pretrain_mlp`), psi = its trainable copy, eta = a
  `DiscriminatorHead` on psi (`fake_score`), on a small network of its own (`separate_backbone`, `separate`)
  or on frozen teacher features (`teacher`). An analytic teacher has no features, so `build_models` refuses that
  placement; here `teacher` reads the *frozen fitted MLP* instead, the stand-in that a network teacher would be;
- one critic step = `draws.draw_batch` (same sigma samplers: EDM log-normal for the DSM, S(t) with S the
  loss.sigma_schedule (Karras by default), t ~ U[0, disc_t_max] for the BCE), real side = exact p samples
  (label 1), fake side = exact q samples (label 0), loss = `fake_score_loss` + disc_weight *
  `discriminator_loss` (Eq. 5), AdamW with the config's lrs, betas, weight decay, head lr multiplier, lr schedule
  (mapped onto the calibration's steps) and global grad-norm clip.

Only psi and eta train; q never moves. The evaluation draws fresh samples x0 ~ p and x0 ~ q, noises them at sigma
per bin (bins of equal width in t, i.e. of equal mass under the discriminator's sampler) and compares l(x_t, sigma)
with l*(x_t) = log p_sigma(x_t) - log q_sigma(x_t), both clamped to +-divergence.logit_clamp (the weights never see
more). SBA(lambda) weights e^{-lambda l} are evaluated at generator samples (the q side) only, so the error of the
log-weight is lambda x the q-side logit error; the per-bin normalisation (`sigma_bins`) cancels a constant offset
per bin, hence also the centred (offset-removed) error.
"""

from __future__ import annotations

import copy
import math

import torch

from .build import Models, _frozen, _trainable_copy, pretrain_mlp
from .config import DistillConfig
from .engine import Engine
from .methods.critic import CriticOnly
from .monitor import Monitor
from .networks.discriminator import build_critic
from .networks.mlp import MLPDenoiser
from .noise import schedule_of
from .teachers.gmm import GaussianMixture

SBA_LAMBDAS = (1.0, 3.0, 5.0, 10.0)
PLACEMENTS = ("fake_score", "teacher", "separate")
HEADS = ("linear", "mean")


def exact_log_ratio(p: GaussianMixture, q: GaussianMixture, x: torch.Tensor, sigma) -> torch.Tensor:
    """l*(x) = log p_sigma(x) - log q_sigma(x), float64 [N]: the optimal logit of Eq. 5 (r = q / p = e^{-l*})."""
    return p.log_prob(x, sigma) - q.log_prob(x, sigma)


def trainable(placement: str, head: str) -> bool:
    """False for the one combination with nothing to train: the parameter-free `mean` head on frozen teacher
    features (its logit is a fixed function of x and sigma)."""
    return not (placement == "teacher" and head == "mean")


def sigma_range(cfg: DistillConfig, teacher) -> tuple[float, float]:
    """(sigma_min, sigma_max) of the schedule the engine draws both generator and discriminator sigma on."""
    L = cfg.loss
    return (L.gen_sigma_min or teacher.sigma_min, L.gen_sigma_max or teacher.sigma_max)


class Critic:
    """psi + eta + the critic's AdamW, built by `networks.discriminator.build_critic` / `critic_optimizer` and
    stepped by the engine (`methods.critic.CriticOnly`), as a distillation run builds and steps them."""

    def __init__(self, cfg: DistillConfig, teacher: GaussianMixture, device=None, init=None, total_steps: int = 1):
        device = torch.device("cpu") if device is None else device
        placement, head = cfg.model.disc_placement, cfg.model.disc_head
        if placement not in PLACEMENTS or head not in HEADS:
            raise ValueError(f"placement {placement!r} / head {head!r}: valid {PLACEMENTS} / {HEADS}")
        self.cfg, self.teacher, self.device = cfg, teacher, device
        torch.manual_seed(cfg.run.seed)  # as the distillation does before build_models
        if init is None:
            init = pretrain_mlp(teacher, cfg, device)
        else:  # a shared fitted MLP: leave the global RNG where pretrain_mlp leaves it (it draws its init only)
            torch.manual_seed(cfg.run.seed)
            MLPDenoiser(init.cfg)
        fake = _trainable_copy(init).to(device)
        # an analytic teacher has no features: placement `teacher` reads the frozen fitted MLP, its stand-in
        frozen = _frozen(copy.deepcopy(init))
        critic = build_critic(fake, head, placement, teacher=frozen, init=init).to(device)
        self.models = Models(
            teacher=teacher,
            generator=None,
            critic=critic,
            shape=tuple(teacher.shape),
            sigma_data=float(teacher.sigma_data),
            real=lambda g, n: (teacher.sample(n, generator=g).to(device), None),
            export=None,
            preview=None,
        )
        self.q: GaussianMixture | None = None  # the fixed student of `train`
        self.method = CriticOnly(cfg, self.models, lambda g, n: self.q.sample(n, generator=g), total_steps, device)
        self.engine = Engine(self.method, None)

    @property
    def fake(self):
        return self.models.fake

    @property
    def disc(self):
        return self.models.disc

    @property
    def critic(self):
        return self.models.critic

    def train(self, q: GaussianMixture, steps: int, total: int | None = None) -> list[dict]:
        """`steps` more critic steps against fixed q samples (label 0), of a run of `total` steps (the cosine
        schedule's length; default: these steps); returns per-step losses, accuracy and gradient norm."""
        self.q = q
        self.method.total_steps = total or self.engine.state.step + steps
        log = []
        for _ in range(steps):
            mon = Monitor(".", enabled=False, initial=0, total=1)
            self.engine.step(mon)
            rec = {k: sum(v) / len(v) for k, v in mon.values.items() if k in ("dsm", "bce", "acc")}
            if "critic/grad_norm" in mon.values:
                rec["grad_norm"] = mon.values["critic/grad_norm"][0]
            log.append(rec)
        return log


def sigma_bins(cfg: DistillConfig, teacher, num_bins: int) -> list[tuple[float, float, float, float]]:
    """(t_lo, t_hi, sigma_lo, sigma_hi) per bin: equal widths in t over [0, max(disc_t_max, gen_t_max)], highest
    sigma first, so each bin inside the discriminator's range carries equal training mass."""
    lo, hi = sigma_range(cfg, teacher)
    t_max = max(cfg.loss.disc_t_max, cfg.loss.gen_t_max)
    ts = [t_max * i / num_bins for i in range(num_bins + 1)]
    schedule = schedule_of(cfg.loss)  # the discriminator's sigma map (Karras by default)
    sig = [float(schedule.sigma_at(torch.tensor(t, dtype=torch.float64), lo, hi)) for t in ts]
    return [(ts[i], ts[i + 1], sig[i + 1], sig[i]) for i in range(num_bins)]


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 1e-12 * len(a) else float("nan")


@torch.no_grad()
def evaluate(
    critic, cfg: DistillConfig, p: GaussianMixture, q: GaussianMixture, num_bins: int = 6, n: int = 2000, seed: int = 1
) -> list[dict]:
    """Per sigma bin: the learned logit against the exact log p_t/q_t on n fresh noisy samples from each side."""
    g = torch.Generator().manual_seed(seed)
    clamp = cfg.divergence.logit_clamp or math.inf
    lo, hi = sigma_range(cfg, p)
    out = []
    for t_lo, t_hi, s_lo, s_hi in sigma_bins(cfg, p, num_bins):
        t = t_lo + (t_hi - t_lo) * torch.rand(2 * n, generator=g, dtype=torch.float64)
        sigma = schedule_of(cfg.loss).sigma_at(t, lo, hi)
        x0 = torch.cat([p.sample(n, generator=g), q.sample(n, generator=g)]).double()
        x = (x0 + sigma[:, None] * torch.randn(x0.shape, generator=g, dtype=torch.float64)).float()
        device = next(iter(p.buffers())).device
        x, sigma = x.to(device), sigma.to(device)
        exact = exact_log_ratio(p, q, x, sigma).cpu()
        raw = critic(x, sigma.float(), logit=True).double().cpu()
        ref, logit = exact.clamp(-clamp, clamp), raw.clamp(-clamp, clamp)
        err = logit - ref
        is_q = torch.arange(2 * n) >= n
        label = (~is_q).double()
        rmse_q = float(err[is_q].square().mean().sqrt())
        rmse_q_c = float(err[is_q].std(unbiased=False))
        out.append(
            {
                "t": [t_lo, t_hi],
                "sigma": [s_lo, s_hi],
                "n": 2 * n,
                "rmse": float(err.square().mean().sqrt()),  # both sides
                "corr": _pearson(logit, ref),
                "bias": float(err.mean()),
                "rmse_centred": float(err.std(unbiased=False)),
                "rmse_q": rmse_q,  # generator side: where the weights are evaluated
                "rmse_q_centred": rmse_q_c,
                "exact_std": float(ref.std(unbiased=False)),  # the scale of what is to be learned
                "exact_rms": float(ref.square().mean().sqrt()),  # = the rmse of the constant logit 0
                "exact_clamped_frac": float((exact.abs() > clamp).double().mean()),
                "acc": float(((raw > 0).double() == label).double().mean()),
                "acc_bayes": float(((exact > 0).double() == label).double().mean()),
                "logw_rmse": {f"{lam:g}": lam * rmse_q for lam in SBA_LAMBDAS},
                "logw_rmse_centred": {f"{lam:g}": lam * rmse_q_c for lam in SBA_LAMBDAS},
            }
        )
    return out


def calibrate(
    cfg: DistillConfig,
    p: GaussianMixture,
    q: GaussianMixture,
    steps: int,
    *,
    num_bins: int = 6,
    n_eval: int = 2000,
    eval_at: tuple[int, ...] = (),
    init=None,
    device=None,
) -> dict:
    """Build the critic of `cfg` (placement, head), train it `steps` steps on p (1) vs q (0), evaluate per bin
    at the end (`bins`) and after each of `eval_at` steps (`curve`)."""
    if not trainable(cfg.model.disc_placement, cfg.model.disc_head):
        raise ValueError(f"{cfg.model.disc_placement} + {cfg.model.disc_head} head has no trainable parameters")
    critic, log, curve = Critic(cfg, p, device, init=init), [], []
    for stop in sorted({k for k in eval_at if 0 <= k < steps} | {steps}):
        log += critic.train(q, stop - len(log), total=steps)
        curve.append({"steps": stop, "bins": evaluate(critic.critic, cfg, p, q, num_bins, n_eval, cfg.run.seed + 1)})
    tail = log[-max(1, len(log) // 10) :]

    def mean(key):
        return sum(r[key] for r in tail) / len(tail) if tail else None

    return {
        "placement": cfg.model.disc_placement,
        "head": cfg.model.disc_head,
        "steps": steps,
        "images": steps * cfg.optim.batch_size,
        "final_bce": mean("bce"),  # mean over the last 10 % of steps
        "final_train_acc": mean("acc"),
        "bins": curve[-1]["bins"],
        "curve": curve,
    }


__all__ = ["Critic", "calibrate", "evaluate", "exact_log_ratio", "sigma_bins", "sigma_range", "trainable"]
