"""Test-retest statistics of two critics' logits on the same samples (`critic_retest.py`): pure functions of
tensors. SBA(lambda) reads a logit l as the weight e^{-lambda l}, so an error delta in l is a factor e^{lambda delta}
on the weight; the per-sigma-bin normalisation (`divergence.normalize=sigma_bins`) cancels a bin's offset, hence the
centred statistics."""

from __future__ import annotations

import math

import torch

from dibregman.calibration import SBA_LAMBDAS


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 1e-12 * len(a) else float("nan")


def ess_frac(log_w: torch.Tensor) -> float:
    """(sum w)^2 / (n sum w^2) of weights e^{log_w}: 1 for equal weights."""
    w = (log_w - log_w.max()).exp()
    return float(w.sum().square() / (len(w) * w.square().sum()))


def retest_stats(l1: torch.Tensor, l2: torch.Tensor, lambdas=SBA_LAMBDAS, clamp: float = 10.0) -> dict:
    """Test-retest of two critics' logits on the same samples of one bin (both clamped as the weights see them)."""
    l1, l2 = l1.double().clamp(-clamp, clamp), l2.double().clamp(-clamp, clamp)
    d = l1 - l2
    delta, delta_c = float(d.square().mean().sqrt()) / math.sqrt(2), float(d.std(unbiased=False)) / math.sqrt(2)
    cov = float(((l1 - l1.mean()) * (l2 - l2.mean())).mean())
    out = {
        "n": len(l1),
        "mean": [float(l1.mean()), float(l2.mean())],
        "std": [float(l1.std(unbiased=False)), float(l2.std(unbiased=False))],  # the spread within the bin
        "corr": pearson(l1, l2),
        "delta": delta,  # RMSE(l1 - l2) / sqrt(2)
        "delta_centred": delta_c,  # the same after removing each critic's bin mean
        "signal_var": cov,  # cov(l1, l2): the reproducible variance
        "noise_var": delta_c**2,
        "snr": cov / delta_c**2 if delta_c > 0 else float("inf"),
    }
    keys = ("factor", "factor_uncentred", "signal_factor", "weight_corr", "ess")
    per = {k: {} for k in keys}
    for lam in lambdas:
        k = f"{lam:g}"
        per["factor"][k] = math.exp(lam * delta_c)  # one-std multiplicative error of a weight
        per["factor_uncentred"][k] = math.exp(lam * delta)
        per["signal_factor"][k] = math.exp(lam * math.sqrt(max(cov, 0.0)))  # one-std spread of the reproducible part
        per["weight_corr"][k] = pearson((-lam * (l1 - l1.max())).exp(), (-lam * (l2 - l2.max())).exp())
        per["ess"][k] = 0.5 * (ess_frac(-lam * l1) + ess_frac(-lam * l2))
    return {**out, **per}


def heldout(l_real: torch.Tensor, l_fake: torch.Tensor) -> dict:
    """Accuracy and BCE of one critic on held-out real (label 1) and generator (label 0) samples of a bin; gain =
    log 2 - BCE (> 0: better than the constant 0)."""
    l_real, l_fake = l_real.double(), l_fake.double()
    bce = 0.5 * float(torch.nn.functional.softplus(-l_real).mean() + torch.nn.functional.softplus(l_fake).mean())
    acc = 0.5 * float((l_real > 0).double().mean() + (l_fake < 0).double().mean())
    return {"acc": acc, "bce": bce, "gain": math.log(2) - bce}


def exact_stats(l: torch.Tensor, exact: torch.Tensor, clamp: float = 10.0) -> dict:
    """One critic against the exact logit on the same samples."""
    err = l.double().clamp(-clamp, clamp) - exact.double().clamp(-clamp, clamp)
    return {
        "rmse": float(err.square().mean().sqrt()),
        "rmse_centred": float(err.std(unbiased=False)),
        "corr": pearson(l, exact),
        "bias": float(err.mean()),
    }


def exact_retest_stats(l1: torch.Tensor, l2: torch.Tensor, exact: torch.Tensor) -> dict:
    """`retest_stats` of two critics plus each one's error against the exact logit, and the part of the error they
    share (invisible to a test-retest): shared^2 = var((e1 + e2) / 2) - delta^2 / 2 for independent noises."""
    e1, e2 = exact_stats(l1, exact), exact_stats(l2, exact)
    shared = float((0.5 * ((l1 - exact) + (l2 - exact))).var(unbiased=False))
    row = retest_stats(l1, l2)
    row.update(
        exact_std=float(exact.std(unbiased=False)),
        rmse=[e1["rmse"], e2["rmse"]],
        rmse_centred=[e1["rmse_centred"], e2["rmse_centred"]],
        corr_exact=[e1["corr"], e2["corr"]],
        shared_centred=math.sqrt(max(shared - row["noise_var"] / 2, 0.0)),
    )
    return row
