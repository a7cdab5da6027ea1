"""Weights of Di-Bregman (Zhu et al. 2025, "One-step Diffusion Models with Bregman Density Ratio Matching",
arXiv 2510.16983) and f-distill (Xu, Nie, Vahdat 2025, arXiv 2502.15681) as maps logit -> weight.

Symbols (used throughout the package):
    p = p_t      teacher marginal at noise level sigma (EDM: x_t = x0 + sigma * eps)
    q = q_t      student (generator) marginal at the same sigma
    l            discriminator logit, sigmoid(l) = p / (p + q) at the optimum of Eq. 5, so l = log(p / q)
    r = q / p    density ratio of Di-Bregman, r = e^{-l}
    u = p / q    density ratio of f-distill,  u = 1 / r = e^{l}
    h            strictly convex function of r (Bregman entries);  f  convex function of u with f(1) = 0

Theorem 1 (Eq. 4): grad_theta D_h(r_t || 1) = -E_eps[w(t) h''(r_t) r_t (s_p(x_t) - s_q(x_t)) dG_theta/dtheta]
with D_h(r || 1) = int p [h(r) - h(1) - h'(1)(r - 1)] dx (Eq. 3).  The weight of a Bregman entry is
h''(r) r (Table 1); f-distill's weight is f''(u) u^2 for D_f(p || q) = int q f(p / q) dx.  Every weight is
returned as a function of l, and computed in log space (`log_weight`), so it is finite and exact for
|l| <= 50 in float64 (and finite in float32).

Perspective identity: with h(r) = r f(1/r), int p h(q/p) = int q f(p/q), hence D_h(r || 1) = D_f(p || q) when
f(1) = 0, and h''(r) r = f''(1/r) / r^2 = f''(u) u^2.  So the f-distill gradient has the same sign and
normalisation as Eq. 4: grad_theta D_f(p_t || q_t) = -E[f''(u) u^2 (s_p - s_q) dG/dtheta].  Derived (and
tested) equivalences of weights, exact including the constant factor:
    SBA(0)  = KL  = rkl = 1                       (h -> r log r - r; f = -log u is VSD/DMD's reverse KL)
    SBA(-1) = BE  = fkl = e^{l}                   (h -> -log r;      f = u log u, forward KL)
    SBA(1)  = LS  = e^{-l} = neyman / 2           (neyman f = (1-u)^2/u has h = (r-1)^2)
    LR      = js  = sigmoid(l) = 1 / (1 + r)      (js f = u log u - (1+u) log((1+u)/2): D_f = 2 JS(p || q))
    pearson = 2 e^{2l} = 2 SBA(-2)                (f = (u-1)^2 has h = (1-r)^2 / r)
    hellinger = e^{l/2} / 2 = SBA(-1/2) / 2       (f = (sqrt(u)-1)^2 has h = (1-sqrt(r))^2; D_f = 2 H^2)
    jeffreys  = 1 + e^{l} = KL + BE               (f = (u-1) log u has h = r log r - log r)
    alpha(a)  = e^{a l} = SBA(-a)                 (h = r f(1/r) is SBA's h plus an affine term)
Parameter domains: SBA's lam and alpha's a may be any finite real.  h'' = r^{lam-1} > 0 and f'' = u^{a-2} > 0,
so both are strictly convex everywhere; SBA's h is singular at lam in {0, -1} and alpha's f at a in {0, 1},
but the weights are not: there h (or f) is its limit up to affine terms (which leave D_h, D_f unchanged).
Whether D_h is finite for a given pair p, q is a property of the pair, not of h (see tests/test_theorem1.py).

Stabilisation (`Stabilizer`, `stabilized_log_weight`, `stabilized_weight`) is kept separate from the maths:
logit clamp, ratio clip, self-normalisation (batch or per log-sigma bin) and a weight cap, all computed from log
weights.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

Fn = Callable[[Tensor], Tensor]
LOG2 = math.log(2.0)


def _as_float(logits) -> Tensor:
    """Logits as a float tensor: float64 stays float64, everything else becomes float32."""
    l = torch.as_tensor(logits)
    return l if l.dtype in (torch.float32, torch.float64) else l.to(torch.float32)


def _check_nan(l: Tensor) -> None:
    if torch.isnan(l).any():
        n = int(torch.isnan(l).sum())
        raise ValueError(f"{n} of {l.numel()} logits are NaN (Stabilizer(nan='zero') gives them weight 0)")


@dataclass(frozen=True)
class Divergence:
    """One registry entry: h(r) (kind 'bregman') or f(u) (kind 'f') and its weight as a function of l."""

    name: str
    kind: str  # "bregman" (weight h''(r) r) | "f" (weight f''(u) u^2)
    params: dict  # e.g. {"lam": 5.0}
    formula: str  # weight in terms of the logit l
    h_or_f: str  # h(r) or f(u), human readable
    fn: Fn = field(repr=False)  # the torch h(r) or f(u) itself
    _log_weight: Fn = field(repr=False)  # l -> log weight, in log space

    def log_weight(self, logits: Tensor) -> Tensor:
        """log of the weight at logits l = log(p/q); raises ValueError on NaN logits."""
        l = _as_float(logits)
        _check_nan(l)
        return self._log_weight(l)

    def weight(self, logits: Tensor) -> Tensor:
        """h''(r) r with r = e^{-l} (or f''(u) u^2 with u = e^{l}); may overflow where log_weight does not."""
        return self.log_weight(logits).exp()


# ---- Bregman h(r) of Table 1 and f(u) of f-distill (used by tests and plots; weights are closed forms) ----
def _h_lr(r: Tensor) -> Tensor:
    return r * torch.log(r) - (1 + r) * torch.log1p(r)


def _h_kl(r: Tensor) -> Tensor:
    return r * torch.log(r) - r


def _h_be(r: Tensor) -> Tensor:
    return -torch.log(r)


def _h_ls(r: Tensor) -> Tensor:
    return r * r / 2


def _f_js(u: Tensor) -> Tensor:
    return u * torch.log(u) - (1 + u) * torch.log((1 + u) / 2)


def _f_hellinger(u: Tensor) -> Tensor:
    return (u.sqrt() - 1) ** 2


def _sba(lam: float) -> Divergence:
    if lam == 0:  # limit lam -> 0: r log r, i.e. KL's h up to the affine term -r
        fn, h = _h_kl, "r log r - r  (lam -> 0 limit, = KL)"
    elif lam == -1:  # limit lam -> -1: -log r plus a diverging affine term, i.e. BE's h
        fn, h = _h_be, "-log r  (lam -> -1 limit, = BE)"
    else:  # Table 1 as written (loses ~1e-16 / |lam log r| relative precision in h for lam near 0)

        def fn(r: Tensor) -> Tensor:
            return (r ** (1 + lam) - r) / (lam * (lam + 1))

        h = "(r^(1+lam) - r) / (lam (lam+1))"
    return Divergence("sba", "bregman", {"lam": lam}, f"exp(-lam*l), lam={lam:g}", h, fn, lambda l: -lam * l)


def _alpha(alpha: float) -> Divergence:
    if alpha == 0:  # limit alpha -> 0: reverse KL
        fn, f = (lambda u: u - 1 - torch.log(u)), "u - 1 - log u  (alpha -> 0 limit, = rkl)"
    elif alpha == 1:  # limit alpha -> 1: forward KL
        fn, f = (lambda u: u * torch.log(u) - u + 1), "u log u - u + 1  (alpha -> 1 limit, = fkl)"
    else:

        def fn(u: Tensor) -> Tensor:
            return (u**alpha - alpha * u - (1 - alpha)) / (alpha * (alpha - 1))

        f = "(u^alpha - alpha u - (1 - alpha)) / (alpha (alpha - 1))"
    return Divergence("alpha", "f", {"alpha": alpha}, f"exp(alpha*l), alpha={alpha:g}", f, fn, lambda l: alpha * l)


def _zero(l: Tensor) -> Tensor:
    return l * 0.0  # keeps NaN/inf visible


def _log_jeffreys(l: Tensor) -> Tensor:
    return torch.logaddexp(l, torch.zeros_like(l))  # log(1 + e^l)


_FIXED = [  # name, kind, weight in l, h(r) or f(u), torch h or f, log weight in l
    ("lr", "bregman", "sigmoid(l)", "r log r - (1+r) log(1+r)", _h_lr, F.logsigmoid),
    ("kl", "bregman", "1", "r log r - r", _h_kl, _zero),
    ("be", "bregman", "exp(l)", "-log r", _h_be, lambda l: l.clone()),
    ("ls", "bregman", "exp(-l)", "r^2 / 2", _h_ls, lambda l: -l),
    ("rkl", "f", "1", "-log u", lambda u: -torch.log(u), _zero),
    ("fkl", "f", "exp(l)", "u log u", lambda u: u * torch.log(u), lambda l: l.clone()),
    ("js", "f", "sigmoid(l)", "u log u - (1+u) log((1+u)/2)", _f_js, F.logsigmoid),
    ("hellinger", "f", "exp(l/2) / 2", "(sqrt(u) - 1)^2", _f_hellinger, lambda l: l / 2 - LOG2),
    ("jeffreys", "f", "1 + exp(l)", "(u - 1) log u", lambda u: (u - 1) * torch.log(u), _log_jeffreys),
    ("pearson", "f", "2 exp(2l)", "(u - 1)^2", lambda u: (u - 1) ** 2, lambda l: 2 * l + LOG2),
    ("neyman", "f", "2 exp(-l)", "(1 - u)^2 / u", lambda u: (1 - u) ** 2 / u, lambda l: LOG2 - l),
]
# name -> (default parameters, factory(**params) -> Divergence)
_REGISTRY: dict[str, tuple[dict[str, float], Callable[..., Divergence]]] = {
    e[0]: ({}, lambda e=e: Divergence(e[0], e[1], {}, *e[2:])) for e in _FIXED
}
_REGISTRY.update({"sba": ({"lam": 5.0}, _sba), "alpha": ({"alpha": 0.5}, _alpha)})


def divergence_params(d) -> dict:
    """The keyword parameters of the divergence a `config.DivergenceConfig` chooses (lam for sba, alpha for alpha,
    none otherwise)."""
    return {"sba": {"lam": d.lam}, "alpha": {"alpha": d.alpha}}.get(d.name, {})


def names() -> list[str]:
    """Registered divergence names, sorted."""
    return sorted(_REGISTRY)


def get(name: str, **params) -> Divergence:
    """Registered divergence `name` with parameters (`lam` for sba, `alpha` for alpha); ValueError if bad."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown divergence {name!r}; valid names: {names()}")
    defaults, factory = _REGISTRY[name]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"divergence {name!r} got unknown parameter(s) {unknown}; it accepts {sorted(defaults)}")
    values = {**defaults, **params}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"divergence {name!r}: {key}={value!r} must be a finite real number")
    return factory(**{k: float(v) for k, v in values.items()})


def bregman(h: Fn, name: str = "custom", h_str: str | None = None) -> Divergence:
    """A Bregman divergence for a user-supplied elementwise torch h(r); weight h''(r) r by double autograd.

    Computed in float64 and cast back; exact only where r = e^{-l} and h'' are representable (no log-space
    guarantee).  Raises ValueError where h''(r) <= 0 (h not strictly convex there) or on NaN logits."""

    def log_w(l: Tensor) -> Tensor:
        with torch.enable_grad():
            r = torch.exp(-l.detach().double()).requires_grad_(True)
            (dh,) = torch.autograd.grad(h(r).sum(), r, create_graph=True)
            d2h = torch.autograd.grad(dh.sum(), r)[0] if dh.requires_grad else torch.zeros_like(r)
        if not bool((d2h > 0).all()):
            bad = r.detach()[~(d2h > 0)][:3].tolist()
            raise ValueError(f"bregman {name!r}: h''(r) <= 0 at r = {bad}; h must be strictly convex")
        return (torch.log(d2h) - l.double()).to(l.dtype)

    return Divergence(name, "bregman", {}, "h''(exp(-l)) exp(-l)  (autograd)", h_str or "user h(r)", h, log_w)


# ---- stabilisation ----
Normalize = Literal["none", "batch_mean", "softmax", "sigma_bins"]  # w/mean(w) over the batch = N softmax(log w)
NORMALIZE_MODES = get_args(Normalize)


@dataclass(frozen=True)
class Stabilizer:
    """Explicit numerical choices applied on top of the exact weight (order: see `stabilized_weight`)."""

    logit_clamp: float | None = None  # clamp l to [-c, c] first (SiDA/FastGen use 10); None = off
    ratio_clip: tuple[float, float] | None = None  # clip r = e^{-l} to [r_min, r_max] (FastGen (0.1, 20))
    normalize: str = "none"  # none | batch_mean | softmax (equal: w/mean(w) = N softmax(log w)) | sigma_bins
    num_sigma_bins: int = 8  # sigma_bins: number of bins in log sigma
    sigma_range: tuple[float, float] | None = None  # sigma_bins: log-uniform bins; None = batch quantiles
    weight_clip: float | None = None  # cap the final weights (after normalisation, where their mean is 1)
    nan: str = "raise"  # NaN logits: "raise" ValueError | "zero" weight 0, excluded from normalisation

    def __post_init__(self):
        if self.logit_clamp is not None and not self.logit_clamp > 0:
            raise ValueError(f"logit_clamp must be > 0 or None, got {self.logit_clamp}")
        if self.ratio_clip is not None and not 0 <= self.ratio_clip[0] < self.ratio_clip[1] < math.inf:
            raise ValueError(f"ratio_clip must be (r_min, r_max) with 0 <= r_min < r_max < inf, got {self.ratio_clip}")
        if self.normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize={self.normalize!r} is not valid; choose one of {list(NORMALIZE_MODES)}")
        if self.num_sigma_bins < 1:
            raise ValueError(f"num_sigma_bins must be >= 1, got {self.num_sigma_bins}")
        if self.sigma_range is not None and not 0 < self.sigma_range[0] < self.sigma_range[1] < math.inf:
            raise ValueError(f"sigma_range must be (min, max) with 0 < min < max < inf, got {self.sigma_range}")
        if self.weight_clip is not None and not self.weight_clip > 0:
            raise ValueError(f"weight_clip must be > 0 or None, got {self.weight_clip}")
        if self.nan not in ("raise", "zero"):
            raise ValueError(f"nan={self.nan!r} is not valid; choose 'raise' or 'zero'")


def sigma_bin_index(
    sigma: Tensor,  # [N] noise levels, > 0
    num_bins: int,  # number of bins in log sigma
    sigma_range: tuple[float, float] | None = None,  # log-uniform bins on [min, max]; None = quantiles
) -> Tensor:
    """Bin index in [0, num_bins) per sample.  None: equal-count bins from the batch quantiles of log sigma
    (ties may leave bins empty); a range: log-uniform edges, sigmas outside it go to the first/last bin."""
    log_s = sigma.reshape(-1).double().log()
    if sigma_range is None:
        q = torch.linspace(0, 1, num_bins + 1, dtype=log_s.dtype, device=log_s.device)[1:-1]
        edges = torch.quantile(log_s, q)
    else:
        lo, hi = math.log(sigma_range[0]), math.log(sigma_range[1])
        edges = torch.linspace(lo, hi, num_bins + 1, dtype=log_s.dtype, device=log_s.device)[1:-1]
    return torch.bucketize(log_s, edges)


def _normalize_log(log_w: Tensor, bins: Tensor, num_bins: int) -> Tensor:
    """log_w minus the log of the mean weight of its bin; weight-0 entries (-inf) do not count."""
    m = torch.full((num_bins,), -math.inf, dtype=log_w.dtype, device=log_w.device)
    m = m.scatter_reduce(0, bins, log_w, "amax")
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    shifted = log_w - m[bins]  # <= 0; subtracting the bin maximum first keeps float32 precision
    s = torch.zeros_like(m).scatter_add(0, bins, shifted.exp())
    n = torch.zeros_like(m).scatter_add(0, bins, (log_w > -math.inf).to(log_w.dtype))
    log_mean_over_max = torch.where((s > 0) & (n > 0), s.log() - n.log(), torch.zeros_like(m))
    return shifted - log_mean_over_max[bins]


def clamped_logits(l: Tensor, stab: Stabilizer) -> Tensor:
    """The logit clamp and ratio clip of `stab` applied to l (r = e^{-l} in [r_min, r_max] <=> l in
    [-log r_max, -log r_min]; r_min = 0: no lower clip)."""
    if stab.logit_clamp is not None:
        l = l.clamp(-stab.logit_clamp, stab.logit_clamp)
    if stab.ratio_clip is not None:
        r_min, r_max = stab.ratio_clip
        l = l.clamp(-math.log(r_max), -math.log(r_min) if r_min > 0 else math.inf)
    return l


def stabilized_log_weight(
    div: Divergence,
    logits: Tensor,  # discriminator logits l = log(p/q), any shape
    sigma: Tensor | None = None,  # noise level per logit (same number of elements); needed for sigma_bins
    stab: Stabilizer = Stabilizer(),
) -> tuple[Tensor, Tensor]:
    """(log w, log n), both detached and shaped like `logits`; never overflows.

    log w is the log of the stabilised weight before the weight clip (NaN handling -> logit clamp -> ratio clip ->
    log weight -> normalisation, all in log space; -inf for NaN logits under nan='zero'); log n = log w minus the
    exact log weight at the clamped logit: the normalisation's log factor (0 for normalize='none'), which Eq. 14's
    target-ratio term shares.  Raises ValueError for NaN logits (unless nan='zero')."""
    l = _as_float(logits).detach()
    isnan = torch.isnan(l)
    if stab.nan == "raise":
        _check_nan(l)
    l = clamped_logits(torch.where(isnan, torch.zeros_like(l), l), stab)
    exact = div.log_weight(l).detach()
    log_w = torch.where(isnan, torch.full_like(l, -math.inf), exact).reshape(-1)
    if stab.normalize in ("batch_mean", "softmax"):
        log_w = _normalize_log(log_w, torch.zeros_like(log_w, dtype=torch.long), 1)
    elif stab.normalize == "sigma_bins":
        if sigma is None:
            raise ValueError("normalize='sigma_bins' needs sigma (one noise level per logit)")
        sigma = torch.as_tensor(sigma, device=l.device).detach()
        if sigma.numel() != l.numel() or not bool((sigma > 0).all()) or not bool(torch.isfinite(sigma).all()):
            raise ValueError(f"sigma must hold {l.numel()} finite positive values, got shape {tuple(sigma.shape)}")
        log_w = _normalize_log(
            log_w, sigma_bin_index(sigma, stab.num_sigma_bins, stab.sigma_range), stab.num_sigma_bins
        )
    log_w = log_w.reshape(l.shape)
    log_n = torch.where(isnan | (stab.normalize == "none"), torch.zeros_like(l), log_w - exact)
    return log_w, log_n


def shuffle_within_bins(
    log_w: Tensor,  # [N] stabilised log weights
    bins: Tensor,  # [N] bin index per sample (`sigma_bin_index`)
    generator: torch.Generator,  # CPU generator of the permutation (a `draws.seed_for` stream)
) -> Tensor:
    """log_w permuted at random among the samples of each bin: every bin keeps its multiset of weights, each
    sample gets one drawn from its own bin. The placebo control `divergence.shuffle_weights`: the weights' spread
    without their assignment to samples."""
    flat, b = log_w.reshape(-1), bins.reshape(-1).to(torch.float64).cpu()
    u = torch.rand(b.shape, generator=generator, dtype=torch.float64)  # in [0, 1): bins stay apart
    random_order = torch.argsort(b + u).to(flat.device)  # grouped by bin, random within
    slots = torch.argsort(b, stable=True).to(flat.device)  # grouped by bin, in place
    out = torch.empty_like(flat)
    out[slots] = flat[random_order]
    return out.reshape(log_w.shape)


def weight_from_log(log_w: Tensor, stab: Stabilizer = Stabilizer()) -> Tensor:
    """exp(log w) capped at `stab.weight_clip` (after normalisation, where the mean weight is 1); may be inf."""
    w = log_w.exp()
    return w.clamp(max=stab.weight_clip) if stab.weight_clip is not None else w


def stabilized_weight(
    div: Divergence,
    logits: Tensor,  # discriminator logits l = log(p/q), any shape
    sigma: Tensor | None = None,  # noise level per logit (same number of elements); needed for sigma_bins
    stab: Stabilizer = Stabilizer(),
) -> Tensor:
    """Detached weight (a stop-gradient factor in Eq. 4), shaped like `logits`; float32 (float64 if given).

    `stabilized_log_weight`, then exp and the weight clip.  Raises ValueError for NaN logits (unless
    nan='zero') and for weights that overflow."""
    w = weight_from_log(stabilized_log_weight(div, logits, sigma, stab)[0], stab)
    if not bool(torch.isfinite(w).all()):
        msg = f"{div.name}: non-finite weights ({w.dtype} overflow or infinite logits)"
        raise ValueError(msg + "; set logit_clamp or a normalisation")
    return w


def ess(weights: Tensor) -> float:
    """Effective sample size (sum w)^2 / sum w^2 (scale invariant; 0 for all-zero weights)."""
    w = torch.as_tensor(weights).detach().reshape(-1).double()
    w = w / w.abs().max().clamp_min(1e-300)
    return float(w.sum() ** 2 / (w * w).sum().clamp_min(1e-300))


def ess_fraction(weights: Tensor) -> float:
    """ESS / N in (0, 1]: 1 for uniform weights, 1/N when one sample carries all the weight."""
    return ess(weights) / max(torch.as_tensor(weights).numel(), 1)


def weight_diagnostics(weights: Tensor) -> dict[str, float]:
    """Scalars worth logging every step: mean, max, min, max/mean and the ESS fraction of the weights."""
    w = torch.as_tensor(weights).detach().reshape(-1).double()
    mean = float(w.mean())
    ratio = float(w.max()) / mean if mean > 0 else math.inf
    stats = dict(w_mean=mean, w_max=float(w.max()), w_min=float(w.min()), w_max_over_mean=ratio)
    return stats | {"ess_fraction": ess_fraction(w)}


# ---- reporting ----
def describe() -> str:
    """A plain-text table of the registry: name, kind, default parameters, h(r) or f(u), weight in l."""
    rows = [("name", "kind", "params", "h(r) or f(u)", "weight(l)")]
    for n in names():
        d = get(n)
        p = ", ".join(f"{k}={v:g}" for k, v in d.params.items()) or "-"
        rows.append((n, d.kind, p, d.h_or_f, d.formula.split(",")[0]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(wd) for c, wd in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    notes = "l = log(p/q), r = q/p = e^-l, u = p/q = e^l; Bregman weight h''(r) r, f weight f''(u) u^2."
    return "\n".join(lines + ["", notes])
