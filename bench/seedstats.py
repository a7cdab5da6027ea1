"""Numbers over seeds for the objective sweeps (`mnist_sweep.py`, `gmm_sweep.py`) and their verdict
(`verdict.py`): pure functions of plain numbers, no I/O.

A *setting* (one objective on one teacher) runs with several seeds. Its numbers are summarised as the mean with
the seed spread [min, max] (`stat`); a curve of several seeds as the mean with a min/max band at the images-seen
points every seed logged (`band`, the one `dibregman compare` draws). Two settings are compared at equal images by
their spreads (`compare`): "better" or "worse" only when the two [min, max] ranges do not overlap, else "within
seed spread". With two or three seeds a range is the honest statement of run-to-run variation; a standard error
would claim more than three numbers can tell.
"""

from __future__ import annotations

import math

import common
from dibregman.compare import band  # mean, min, max over runs at the points every run logged

BETTER, WORSE, TIE, ONE_SEED = "better", "worse", "within seed spread", "one seed (no spread)"

Curve = list[tuple[float, float]]  # [(kimg, value)] of one run, kimg increasing


def stat(values) -> dict | None:
    """{"mean", "min", "max", "n"} of the finite numbers among `values` (None where there is none)."""
    vals = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)]
    if not vals:
        return None
    return {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def fmt_stat(s: dict | None, digits: int = 3) -> str:
    """`mean [min, max]` (several seeds), `mean` (one), `n/a` (none); `digits` significant digits."""
    if not s:
        return "n/a"
    f = common.fmt
    return (
        f(s["mean"], digits)
        if s["n"] == 1
        else f"{f(s['mean'], digits)} [{f(s['min'], digits)}, {f(s['max'], digits)}]"
    )


def common_points(curves: list[Curve]) -> list[float]:
    """The images-seen points (kimg) that every curve logged, sorted."""
    if not curves:
        return []
    return sorted(set.intersection(*(set(k for k, _ in c) for c in curves)))


def checkpoints(points: list[float], fractions=(0.25, 0.5, 1.0)) -> list[float]:
    """The logged points nearest to each fraction of the last one (unique, sorted): "equal images" columns."""
    if not points:
        return []
    last = points[-1]
    return sorted({min(points, key=lambda k: (abs(k - f * last), k)) for f in fractions})


def value_at(curve: Curve, kimg: float) -> float | None:
    """The value a curve logged at exactly `kimg` (None if it did not log there)."""
    return next((v for k, v in curve if math.isclose(k, kimg, rel_tol=1e-9, abs_tol=1e-9)), None)


def stat_at(curves: list[Curve], kimg: float) -> dict | None:
    """`stat` over seeds of the values logged at `kimg`."""
    return stat(value_at(c, kimg) for c in curves)


def kimg_to_target(curve: Curve, target: float, lower_is_better: bool = True) -> float | None:
    """Images seen (kimg) at the first logged point that reaches `target` (<= it, or >= it for a score); None if
    no logged point does. Resolution: the logging period."""
    for k, v in curve:
        if (v <= target) if lower_is_better else (v >= target):
            return k
    return None


def reach(curves: list[Curve], target: float | None, lower_is_better: bool = True) -> dict | None:
    """Per seed `kimg_to_target`, how many seeds reached the target, and the mean kimg of those that did."""
    if target is None:
        return None
    per_seed = [kimg_to_target(c, target, lower_is_better) for c in curves]
    hit = [k for k in per_seed if k is not None]
    return {
        "target": target,
        "per_seed": per_seed,
        "reached": len(hit),
        "n": len(per_seed),
        "kimg": stat(hit),
    }


def fmt_reach(r: dict | None) -> str:
    """`12.5 kimg [10, 15] (2/2 seeds)`, `not reached (0/2)`, or `n/a` (no target)."""
    if not r:
        return "n/a"
    if not r["reached"]:
        return f"not reached (0/{r['n']})"
    return f"{fmt_stat(r['kimg'], 3)} kimg ({r['reached']}/{r['n']} seeds)"


def tail_mean(curve: Curve, fraction: float = 0.5) -> float | None:
    """Mean of the values logged in the last `fraction` of training (images seen >= (1 - fraction) x the last):
    a weight statistic of the late run that one noisy log interval does not decide."""
    if not curve:
        return None
    start = (1 - fraction) * curve[-1][0]
    vals = [v for k, v in curve if k >= start]
    return sum(vals) / len(vals)


def compare(a: dict | None, b: dict | None, lower_is_better: bool = True) -> str:
    """Setting `a` against setting `b` (both `stat`s at equal images): better / worse when their [min, max]
    ranges are disjoint, within seed spread when they overlap, one seed when either has no spread."""
    if a is None or b is None:
        return "n/a"
    if a["n"] < 2 or b["n"] < 2:
        return ONE_SEED
    if a["max"] < b["min"]:
        return BETTER if lower_is_better else WORSE
    if a["min"] > b["max"]:
        return WORSE if lower_is_better else BETTER
    return TIE


__all__ = [
    "BETTER",
    "WORSE",
    "TIE",
    "ONE_SEED",
    "band",
    "stat",
    "fmt_stat",
    "common_points",
    "checkpoints",
    "value_at",
    "stat_at",
    "kimg_to_target",
    "reach",
    "fmt_reach",
    "tail_mean",
    "compare",
]
