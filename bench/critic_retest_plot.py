"""The .png of `critic_retest.py`: per sigma bin, the logit spread against the test-retest noise and the retest
correlations (MNIST and the analytic pair), and the training BCE with its band over the two seeds."""

from __future__ import annotations

import math
from pathlib import Path

from critic_retest_report import LABELS, _f, _mean, at_kimg, gmm_heads


def plot(d: dict, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 2 if gmm_heads(d) else 1
    fig, ax = plt.subplots(rows, 3, figsize=(16, 4.25 * rows), squeeze=False)
    x = [math.sqrt(b["sigma"][0] * b["sigma"][1]) for b in d["bins"]]
    colours = dict(zip(LABELS, ("C0", "C1", "C2"), strict=True))
    for label, res in d["mnist"].items():
        b, c = res["points"][-1]["bins"], colours.get(label, "C3")
        ax[0, 0].plot(x, [_mean(v["std"]) for v in b], "o-", c=c, label=f"{LABELS[label]}: sd(l)")
        ax[0, 0].plot(x, [v["delta_centred"] for v in b], "s--", c=c, label=f"{LABELS[label]}: δ centred")
        ax[0, 1].plot(x, [v["corr"] for v in b], "o-", c=c, label=f"{LABELS[label]}: logits")
        ax[0, 1].plot(x, [v["weight_corr"]["5"] for v in b], "s--", c=c, label=f"{LABELS[label]}: weights λ=5")
        _band(ax[0, 2], res["runs"], c, LABELS[label])
    for label, res in gmm_heads(d):
        b, c = at_kimg(res, d["sizes"]["kimg"])["bins"], colours.get(label, "C3")
        ax[1, 0].plot(x, [_mean(v["rmse_centred"]) for v in b], "o-", c=c, label=f"{LABELS[label]}: true error")
        ax[1, 0].plot(x, [v["delta_centred"] for v in b], "s--", c=c, label=f"{LABELS[label]}: δ centred")
        ax[1, 1].plot(x, [_mean(v["corr_exact"]) for v in b], "o-", c=c, label=f"{LABELS[label]}: r(l, l*)")
        ax[1, 1].plot(x, [v["corr"] for v in b], "s--", c=c, label=f"{LABELS[label]}: retest r")
        _band(ax[1, 2], res["runs"], c, LABELS[label])
    if gmm_heads(d):
        first = at_kimg(gmm_heads(d)[0][1], d["sizes"]["kimg"])["bins"]
        ax[1, 0].plot(x, [v["exact_std"] for v in first], "k:", label="sd(l*) exact")
    sigma_axes = [(ax[0, 0], "MNIST: logit spread and noise"), (ax[0, 1], "MNIST: retest correlation")]
    kimg_axes = [(ax[0, 2], "MNIST: training BCE (seed band)")]
    if rows == 2:
        sigma_axes += [(ax[1, 0], "d=784 pair: true error vs retest δ"), (ax[1, 1], "d=784 pair: correlations")]
        kimg_axes += [(ax[1, 2], "d=784 pair: training BCE")]
    for a, t in sigma_axes:
        a.set_xscale("log")
        a.set_xlabel("σ (bin centre)")
        a.set_title(t, fontsize=10)
        a.grid(alpha=0.3)
        a.legend(fontsize=6)
    for a, t in kimg_axes:
        a.set_xlabel("kimg")
        a.set_title(t, fontsize=10)
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(f"Critic test-retest, two seeds per head, {_f(d['sizes']['kimg'], 3)} kimg of critic training")
    fig.tight_layout()
    fig.savefig(out / f"{d['benchmark']}.png", dpi=80)
    plt.close(fig)
    return f"{d['benchmark']}.png"


def _band(ax, runs: list[dict], c: str, label: str) -> None:
    """Mean and min-max band over seeds of the training BCE."""
    curves = [r["curve"] for r in runs]
    n = min(len(cv) for cv in curves)
    if n == 0:
        return
    k = [curves[0][i]["kimg"] for i in range(n)]
    v = [[cv[i]["bce"] for cv in curves] for i in range(n)]
    ax.plot(k, [_mean(r) for r in v], c=c, label=label)
    ax.fill_between(k, [min(r) for r in v], [max(r) for r in v], color=c, alpha=0.25)
