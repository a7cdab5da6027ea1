"""Rewards for reward-tilted distillation (Di-Bregman, arXiv 2510.16983, App. G, Eqs. 13-14): distil p* = p r*.

Symbols: p = p_t teacher marginal and q = q_t student marginal at noise level sigma (x_t = x0 + sigma eps),
r = q / p = e^{-l} (l the discriminator logit), R(x0) >= 0 a reward, Z = E_p[R] its normaliser, target
ratio r* = R / Z, tilted target p* = p r*, and w(r) = h''(r) r the Table-1 weight (`divergences`).

Derivation implemented here.  D_h(r_t || r*_t) = int p_t [h(r_t) - h(r*_t) - h'(r*_t)(r_t - r*_t)] dx; only
r_t depends on theta, so (Eq. 13)  grad D = int [h'(r_t) - h'(r*_t)] grad_theta q_t dx.  For any fixed f,
int f grad_theta q_t = grad_theta E_eps[f(x_t)] = E_eps[grad_x f(x_t) dG/dtheta] (Appendix B's integration
by parts).  f = h'(r_t) gives Theorem 1, since grad_x h'(r) = w(r) grad log r = -w(r)(s_p - s_q); f = h'(r*_t)
gives the extra term:
    grad D = -E_eps[ (w(r_t)(s_p - s_q) + h''(r*_t) grad_x r*_t(x_t)) dG/dtheta ]                      (*)
           = -E_eps[ (w(r_t)(s_p - s_q) + w(r*_t) grad_x log R_t(x_t)) dG/dtheta ].
(*) is the printed Eq. 14 once its "h''(r*_t) grad_theta r*_t(x_t)" is read as the total derivative
h''(r*_t) grad_x r*_t(x_t) dG/dtheta (r*_t itself has no theta); the signs agree: the extra term moves
samples up the reward.  Differences with the printed formula: (i) Eq. 14 drops Theorem 1's w(t); the engine
multiplies BOTH terms by the same w(t) (`loss.weighting`, `distill.time_weight`) and the same batch/sigma-bin
normalisation of the weights (`divergences.stabilized_log_weight`), because the fixed point r_t = r*_t, where the two
terms cancel pointwise, needs their ratio intact (a weight clip that binds breaks this, as it breaks Eq. 4).
(ii) The printed extra term has no dG/dtheta factor; with it, its units are those of Theorem 1's term.
For KL (w = 1) Z drops out and (*) is VSD towards the tilted score s_p + grad log r*_t = grad log p*_t.
The extra term's loss is `distill.target_ratio_loss`, beside Eq. 4's; this module holds the reward registry,
the noisy-level target (`target_term`), the normaliser estimator and the Trainer's binding (`TargetRatio`).
tests/test_reward.py checks (*) against finite differences of D_h(r_t || r*_t) (1-D Gaussian, exponential
tilt) and that the library's Eq. 4 + Eq. 14 gradient vanishes at r_t = r*_t for every weighting and
normalisation.

Noisy-level target.  Exactly, p*_t = int p R / Z N(x_t; x0, sigma^2) dx0, so r*_t(x_t) = E_p[R(x0) | x_t] / Z
=: R_t(x_t) / Z, with E_{p_t}[r*_t] = 1 at every sigma.  `target` chooses R_t:
    sigma     the reward takes sigma and returns R_t itself (exact for `gmm_modes`: sum_k c_k gamma_k(x, s))
    denoised  R_t(x) ~ R(D_phi(x, sigma)): plug-in posterior mean (Jensen gap; gradient through the teacher)
    noisy     R_t(x) ~ R(x): only sensible for small sigma or noise-robust rewards
Normaliser.  Z = E_p[R(x0)] is estimated online on clean real/teacher samples (`NormalizerEstimator`):
cumulative mean (unbiased, standard error sqrt(var / n)) or EMA; 1 / Z_hat is biased upwards by ~ CV^2 / n
(Jensen), and Z enters only through w(r*) = w(R_t / Z) (not at all for KL).  Limits: R must be > 0 wherever
p has mass (R is floored at `floor` before the log, and the floor has no gradient); the approximate targets
do not keep E_{p_t}[r*_t] = 1; a reward of the condition needs a normaliser per condition (not estimated
here: exact only for KL); the GAN term's optimum is q = p, so it is refused together with a reward.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import divergences
from .distill import NonFiniteError
from .draws import generator_for
from .runguard import UserCodeError

LogRewardFn = Callable[[Tensor, Tensor, object], Tensor]  # (x [N, *shape], sigma [N], cond) -> log R [N]
TARGETS = ("auto", "sigma", "denoised", "noisy")
ESTIMATORS = ("mean", "ema", "fixed")


class NonFiniteReward(NonFiniteError, ValueError):
    """A reward returned NaN/+Inf on some samples: a ValueError when called directly, a skipped and counted step
    inside the engine (a NonFiniteError)."""


@dataclass
class Reward:
    """A reward R(x, sigma, cond) >= 0, held as log R (checked on every call)."""

    name: str
    log_fn: LogRewardFn = field(repr=False)
    sigma_aware: bool  # log_fn(x, sigma) is already the noisy-level R_t(x) = E[R(x0) | x_t = x]
    floor: float = 1e-6  # R is clamped below at this value before the log (no gradient there)
    module: nn.Module | None = field(default=None, repr=False)  # a network inside (moved by `.to`)

    def to(self, device) -> Reward:
        if self.module is not None:
            self.module.to(device)
        return self

    def log_value(self, x: Tensor, sigma: Tensor | float = 0.0, cond=None) -> Tensor:
        """log R(x, sigma, cond), [N], floored at log(floor); ValueError for NaN, +inf or a wrong shape."""
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        out = _checked(self.name, self.log_fn(x, s, cond), x.shape[0])
        if torch.isposinf(out).any():
            raise NonFiniteReward(f"reward {self.name!r} returned {int(torch.isposinf(out).sum())} infinite values")
        return out.clamp_min(math.log(self.floor))

    def __call__(self, x: Tensor, sigma: Tensor | float = 0.0, cond=None) -> Tensor:
        return self.log_value(x, sigma, cond).exp()


def _checked(name: str, out, n: int) -> Tensor:
    if not isinstance(out, Tensor) or out.shape != (n,):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"reward {name!r} must return a tensor of shape [{n}], got {got}")
    if torch.isnan(out).any():
        raise NonFiniteReward(f"reward {name!r} returned {int(torch.isnan(out).sum())} NaN values")
    return out


def _log_of_values(name: str, fn: Callable[..., Tensor], num_args: int) -> LogRewardFn:
    """log of a user R(x[, sigma[, cond]]) >= 0, with clear errors for negative / NaN / misshaped values."""

    def log_fn(x, sigma, cond):
        try:
            out = fn(*(x, sigma, cond)[:num_args])
        except Exception as e:  # the user's bug: shown with the user's traceback (cli), never as an internal error
            raise UserCodeError(f"reward {name!r} raised {type(e).__name__}: {e}") from e
        r = _checked(name, out, x.shape[0])
        if (r < 0).any():
            raise ValueError(f"reward {name!r} must be >= 0; got min {float(r.min()):.4g}")
        return torch.log(r)

    return log_fn


# ---- registry: name -> factory(cfg, teacher) -> Reward --------------------------------------------------
REWARDS: dict[str, Callable[..., Reward]] = {}


def register(name: str):
    """Decorator adding `factory(cfg: RewardConfig, teacher) -> Reward` to the registry under `name`."""

    def deco(factory):
        REWARDS[name] = factory
        return factory

    return deco


@register("constant")
def _constant(cfg, teacher) -> Reward:
    if not cfg.value > 0:
        raise ValueError(f"reward.value must be > 0 for 'constant', got {cfg.value}")
    log_c = math.log(cfg.value)
    return Reward(
        "constant",
        lambda x, s, c: torch.full((x.shape[0],), log_c, dtype=x.dtype, device=x.device),
        sigma_aware=True,
        floor=cfg.floor,
    )


def mode_factors(cfg, num_modes: int) -> torch.Tensor:
    """c_k of `gmm_modes`: `boost` for the components listed in `modes` ("0,3"), 1 for the others, [K]."""
    try:
        modes = [int(m) for m in str(cfg.modes).strip("[]() ").replace(" ", "").split(",") if m != ""]
    except ValueError as e:
        raise ValueError(f"reward.modes must be comma-separated integers, got {cfg.modes!r}") from e
    bad = [m for m in modes if not 0 <= m < num_modes]
    if not modes or bad:
        raise ValueError(f"reward.modes={cfg.modes!r}: need indices in [0, {num_modes}), got {modes}")
    if not cfg.boost > 0:
        raise ValueError(f"reward.boost must be > 0, got {cfg.boost}")
    c = torch.ones(num_modes, dtype=torch.float64)
    c[modes] = cfg.boost
    return c


@register("gmm_modes")
def _gmm_modes(cfg, teacher) -> Reward:
    if not hasattr(teacher, "responsibilities"):
        raise ValueError(f"reward 'gmm_modes' needs a Gaussian-mixture teacher, got {type(teacher).__name__}")
    c = mode_factors(cfg, teacher.num_modes)

    def log_fn(x, sigma, cond):  # log sum_k c_k gamma_k(x, sigma) = log(E[c_K | x_t = x]): exact R_t
        return torch.log(teacher.responsibilities(x.double(), sigma, cond) @ c.to(x.device)).to(x.dtype)

    return Reward("gmm_modes", log_fn, sigma_aware=True, floor=cfg.floor)


@register("mnist_class")
def _mnist_class(cfg, teacher) -> Reward:
    from .metrics.features import MnistFeatures  # lazy: weights are a package asset

    net = MnistFeatures(cfg.classifier or None)
    if not 0 <= cfg.digit < net.net.config.num_classes:
        raise ValueError(f"reward.digit must lie in [0, {net.net.config.num_classes}), got {cfg.digit}")

    def log_fn(x, sigma, cond):  # log p(y = k | x)
        return net.logits(x).float().log_softmax(-1)[:, cfg.digit].to(x.dtype)

    return Reward(f"mnist_class:{cfg.digit}", log_fn, sigma_aware=False, floor=cfg.floor, module=net)


def _python_reward(spec: str, cfg) -> Reward:
    _, module_name, fn_name = (spec.split(":", 2) + ["", ""])[:3]
    if not module_name or not fn_name:
        raise ValueError(f"reward {spec!r}: expected python:MODULE:FUNCTION")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward {spec!r}: cannot load {module_name}.{fn_name}: {e}") from e
    try:
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        num = sum(p.kind in kinds for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        num = 1
    num = min(max(num, 1), 3)  # R(x) | R(x, sigma) | R(x, sigma, cond)
    return Reward(spec, _log_of_values(spec, fn, num), sigma_aware=num > 1, floor=cfg.floor)


def names() -> list[str]:
    return ["none", *sorted(REWARDS), "python:MODULE:FUNCTION"]


def build_reward(cfg, teacher=None) -> Reward | None:
    """The reward of a `RewardConfig` (None for 'none'); ValueError for unknown names or bad parameters."""
    if cfg.name == "none":
        return None
    if cfg.name.startswith("python:"):
        return _python_reward(cfg.name, cfg)
    if cfg.name not in REWARDS:
        raise ValueError(f"unknown reward {cfg.name!r}; valid: {names()}")
    return REWARDS[cfg.name](cfg, teacher)


def resolve_target(target: str, reward: Reward) -> str:
    """'auto' -> 'sigma' for sigma-aware rewards, 'denoised' otherwise; 'sigma' needs a sigma-aware reward."""
    if target == "auto":
        return "sigma" if reward.sigma_aware else "denoised"
    if target == "sigma" and not reward.sigma_aware:
        raise ValueError(f"reward.target='sigma' needs a reward of (x, sigma); {reward.name!r} ignores sigma")
    return target


# ---- the normaliser Z = E_p[R] --------------------------------------------------------------------------
class NormalizerEstimator:
    """Online Z = E_p[R(x0)] from real samples: `mean` (cumulative), `ema` (half-life in samples) or `fixed`.

    Keeps weighted sums S0 = sum a_i, S00 = sum a_i^2, S1 = sum a_i R_i, S2 = sum a_i R_i^2 (a_i = 1: `mean`;
    for `ema` a batch of n gets total weight 1 - beta and older sums decay by beta = 0.5^(n / half-life)),
    so Z = S1 / S0, var = S2 / S0 - Z^2, n_eff = S0^2 / S00 and stderr = sqrt(var / n_eff); all in float64.
    `fixed` reports `value` as Z but still tracks the empirical mean (`empirical`) for the log."""

    def __init__(self, kind: str = "mean", *, value: float = 0.0, halflife: float = 50_000.0):
        if kind not in ESTIMATORS:
            raise ValueError(f"reward.z_estimator={kind!r} is not valid; choose one of {list(ESTIMATORS)}")
        if kind == "fixed" and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"reward.z_value must be finite and > 0 for z_estimator='fixed', got {value}")
        if kind == "ema" and not halflife > 0:
            raise ValueError(f"the EMA half-life must be > 0 samples, got {halflife}")
        self.kind, self.value, self.halflife = kind, float(value), float(halflife)
        self.sums = [0.0, 0.0, 0.0, 0.0]  # S0, S00, S1, S2
        self.count = 0  # samples seen

    def update(self, rewards: Tensor) -> None:
        r = rewards.detach().double().reshape(-1)
        n = len(r)
        beta = 0.5 ** (n / self.halflife) if self.kind == "ema" else 1.0  # decay of the old sums
        a = (1 - beta) / n if self.kind == "ema" else 1.0  # weight of each new sample
        new = (a * n, a * a * n, a * float(r.sum()), a * float(r.square().sum()))
        decay = (beta, beta * beta, beta, beta)
        self.sums = [d * old + v for d, old, v in zip(decay, self.sums, new, strict=True)]
        self.count += n

    @property
    def empirical(self) -> float:
        if self.sums[0] == 0:
            raise ValueError("the normaliser has seen no samples (set reward.z_init_samples > 0)")
        return self.sums[2] / self.sums[0]

    @property
    def z(self) -> float:
        z = self.value if self.kind == "fixed" else self.empirical
        if not z > 0:
            msg = f"Z = E_p[R] estimated as {z:.4g} on {self.count} real samples"
            raise ValueError(msg + "; R must be > 0 where p has mass")
        return z

    @property
    def stderr(self) -> float:
        if self.kind == "fixed" or self.sums[0] == 0:
            return 0.0
        s0, s00, s1, s2 = self.sums
        var = max(s2 / s0 - (s1 / s0) ** 2, 0.0)
        return math.sqrt(var * s00 / s0**2)  # sqrt(var / n_eff)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "sums": list(self.sums), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"normaliser state is {state['kind']!r}, this run uses {self.kind!r}")
        self.sums, self.count = [float(v) for v in state["sums"]], int(state["count"])


# ---- Eq. 14's noisy-level target ----------------------------------------------------------------------
def log_target_reward(reward: Reward, x_t: Tensor, sigma: Tensor, cond=None, *, target: str, teacher=None):
    """log R_t(x_t), [N], differentiable in x_t: r*_t = R_t / Z at noise level sigma (module docstring)."""
    if target == "sigma":
        return reward.log_value(x_t, sigma, cond)
    zero = torch.zeros_like(sigma)
    if target == "denoised":
        return reward.log_value(teacher(x_t, sigma, cond), zero, cond)
    if target == "noisy":
        return reward.log_value(x_t, zero, cond)
    raise ValueError(f"target={target!r} is not valid; choose one of {list(TARGETS[1:])}")


def target_term(
    reward: Reward,
    x_t: Tensor,  # [N, *shape] noisy generator samples (their graph is not used)
    sigma: Tensor,  # [N] noise levels
    cond=None,
    *,
    log_z: float,  # log of the normaliser Z = E_p[R]
    div: divergences.Divergence,
    target: str = "sigma",  # sigma | denoised | noisy (see resolve_target)
    teacher=None,  # D_phi, for target='denoised'
    stab: divergences.Stabilizer | None = None,  # logit clamp / ratio clip also applied to l* = -log r*
) -> tuple[Tensor, Tensor]:
    """(grad_x log R_t(x_t) [N, *shape], log w(r*_t) [N]); their product is h''(r*_t) grad_x r*_t(x_t), the
    extra term of Eq. 14 before w(t).  Uses no gradient of the caller's graph."""
    with torch.enable_grad():
        xr = x_t.detach().requires_grad_(True)
        log_r = log_target_reward(reward, xr, sigma, cond, target=target, teacher=teacher)
        g = torch.autograd.grad(log_r.sum(), xr, allow_unused=True)[0] if log_r.requires_grad else None
    g = torch.zeros_like(xr) if g is None else g  # a reward constant in x
    l_star = (log_z - log_r.detach().double()).reshape(-1)  # l* = log(p/p*) = -log r*_t
    if stab is not None:
        l_star = divergences.clamped_logits(l_star, stab)
    return g.detach(), div.log_weight(l_star)


# ---- engine binding -------------------------------------------------------------------------------------
class TargetRatio:
    """The Trainer's reward binding: reward, normaliser estimate, noisy-level target (see `build_target`)."""

    def __init__(self, reward: Reward, estimator: NormalizerEstimator, *, target: str, teacher=None):
        self.reward, self.estimator, self.target, self.teacher = reward, estimator, target, teacher

    @torch.no_grad()
    def observe(self, x_real: Tensor, gather=None) -> dict:
        """Critic step: update Z with R on clean real samples (all ranks' samples when `gather` is given)."""
        r = self.reward(x_real.float(), 0.0)
        r = gather(r) if gather is not None else r
        self.estimator.update(r)
        z, se = self.estimator.z, self.estimator.stderr
        return {"reward/z": z, "reward/z_stderr": se, "reward/real_R": float(r.mean())}

    def warm_up(self, real: Callable, *, seed: int, num_samples: int, chunk: int = 1024) -> None:
        """Average R over `num_samples` real samples drawn with their own seeded generator before step 0."""
        g = generator_for(seed, "reward_z")
        for i in range(0, num_samples, chunk):
            self.observe(real(g, min(chunk, num_samples - i))[0])  # a real-side sampler: (samples, conditions)

    def term(self, x_t: Tensor, sigma: Tensor, cond, *, div, stab) -> tuple[Tensor, Tensor]:
        """(grad_x log R_t(x_t), log w(r*_t)) at the generator step's x_t, with this run's Z (`target_term`)."""
        kw = dict(log_z=math.log(self.estimator.z), div=div, target=self.target, teacher=self.teacher, stab=stab)
        return target_term(self.reward, x_t, sigma, cond, **kw)

    @torch.no_grad()
    def stats(self, x: Tensor, cond, coef: Tensor, grad_log_r: Tensor) -> dict:
        """What the generator step logs about the reward: R and r* of G(z), the Eq. 14 coefficient, |grad log R|."""
        gen_r = float(self.reward(x.detach(), 0.0, cond).mean())
        return {
            "reward/gen_R": gen_r,
            "reward/gen_r_star": gen_r / self.estimator.z,
            "reward/coef": float(coef.mean()),
            "reward/grad_rms": float(grad_log_r.square().mean().sqrt()),
        }

    def state_dict(self) -> dict:
        return self.estimator.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.estimator.load_state_dict(state)


def check_config(cfg) -> None:
    """ValueError for a `reward` section that cannot run (called by `config.validate`; no teacher needed)."""
    rc = cfg.reward
    python = rc.name.startswith("python:") and rc.name.count(":") == 2
    if not (rc.name == "none" or rc.name in REWARDS or python):
        raise ValueError(f"unknown reward {rc.name!r}; valid: {names()}")
    NormalizerEstimator(rc.z_estimator, value=rc.z_value, halflife=rc.z_ema_kimg * 1000)  # raises if bad
    if not 0 < rc.floor < 1:
        raise ValueError(f"reward.floor must lie in (0, 1), got {rc.floor}")
    if rc.z_init_samples < 0:
        raise ValueError(f"reward.z_init_samples must be >= 0, got {rc.z_init_samples}")
    for key, term in (("gan_weight", "the GAN term"), ("regression_weight", "the regression term (to the ODE map)")):
        if rc.name != "none" and getattr(cfg.loss, key) > 0:  # both pull q to the untilted p
            raise ValueError(f"loss.{key} must be 0 with a reward: {term} pulls q to p, not to p r*")


def build_target(cfg, models, device) -> TargetRatio | None:
    """The Trainer's reward binding for `cfg.reward` (None for 'none'), with Z warmed up on real samples."""
    rc = cfg.reward
    reward = build_reward(rc, models.teacher)
    if reward is None:
        return None
    est = NormalizerEstimator(rc.z_estimator, value=rc.z_value, halflife=rc.z_ema_kimg * 1000)
    t = TargetRatio(reward.to(device), est, target=resolve_target(rc.target, reward), teacher=models.teacher)
    t.warm_up(models.real, seed=cfg.run.seed, num_samples=rc.z_init_samples)
    return t
