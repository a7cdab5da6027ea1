"""`dibregman compare RUN [RUN ...]`: read several runs' `log.jsonl` and draw their curves side by side.

Runs whose resolved configs differ only in `run.seed` (and other `run.*` reporting keys) form one *setting*;
a setting with several seeds is drawn as its mean with a min/max band. Panels: in-loop FID (any logged key
starting with `fid`), Bregman weight ESS fraction, weight max, discriminator accuracy, each versus thousands of
images seen. The Markdown table gives, per setting, the number of seeds, images seen, final and best FID
(mean and spread over seeds) and the last logged ESS / weight max / accuracy. `until_kimg` (`--kimg`) reads every
run only up to that many thousand images, so runs of different lengths (a 40k probe against a 150k run) are
compared at equal images.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

PANELS = {  # panel title -> log key (FID: the first key starting with "fid" that is not a sample count)
    "FID": None,
    "weight ESS / batch": "weight/ess_frac",
    "weight max": "weight/max",
    "discriminator accuracy": "disc/disc_acc",
}


@dataclass
class Setting:
    label: str
    runs: list[Path] = field(default_factory=list)
    curves: list[dict[str, list[tuple[float, float]]]] = field(default_factory=list)  # per run: key -> [(kimg, v)]


def read_run(run: Path) -> tuple[dict, dict[str, list[tuple[float, float]]]]:
    """(resolved config, {key: [(kimg, value)]}) of one run folder; a clear error when it is not one."""
    run = Path(run)
    log = run / "log.jsonl"
    if not log.is_file():
        raise FileNotFoundError(f"{run} is not a run folder: {log} is missing")
    cfg_path = run / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    curves: dict[str, list[tuple[float, float]]] = {}
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill: the rest of the log is still read
        kimg = rec.get("kimg")
        for k, v in rec.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and kimg is not None and math.isfinite(v):
                curves.setdefault(k, []).append((float(kimg), float(v)))
    return cfg, curves


def fid_key(curves: dict, chosen: str | None = None) -> str | None:
    """The FID key to read: `chosen` if this run logged it, else fid_ema or the first logged key starting with fid."""
    if chosen is not None:
        return chosen if chosen in curves else None
    keys = sorted(k for k in curves if k.startswith("fid") and not k.endswith("_n"))
    return "fid_ema" if "fid_ema" in keys else (keys[0] if keys else None)


def setting_label(cfg: dict, others: list[dict]) -> str:
    """The config keys in which this run differs from the most common value among all runs that have the key
    (`run.*`, i.e. the seed and reporting keys, excluded; None, 0 and '' all read as "off"). Where the runs use
    different divergences (an objective sweep) every label starts with its own objective, e.g. `sba(lam=5)`, and
    the divergences' parameters are read only through it: reverse KL's unused `lam` names nothing."""
    from .config import saved_divergence_params  # here, not at import: config pulls in torch

    flat, all_flat = _flatten(cfg), [_flatten(o) for o in others]
    diff = [k for k in sorted(flat) if not k.startswith("run.") and _uncommon(flat, k, all_flat)]
    if len({o.get("divergence", {}).get("name") for o in others}) < 2:
        return ", ".join(f"{k.split('.', 1)[1]}={flat[k]}" for k in diff) or "base"
    taken = {f"divergence.{p}" for o in others for p in saved_divergence_params(o.get("divergence", {}))}
    rest = [f"{k.split('.', 1)[1]}={flat[k]}" for k in diff if k != "divergence.name" and k not in taken]
    params = saved_divergence_params(cfg.get("divergence", {}))
    head = str(cfg.get("divergence", {}).get("name"))
    head += f"({', '.join(f'{k}={v:g}' for k, v in params.items())})" if params else ""
    return ", ".join([head, *rest])


def _uncommon(flat: dict, key: str, all_flat: list[dict]) -> bool:
    """Whether `flat[key]` is not the single most common value of `key` (a tie for the most common: none is)."""
    values = [repr(_off(f[key])) for f in all_flat if key in f]  # runs written before a key existed: not counted
    counts = sorted((values.count(v) for v in set(values)), reverse=True)
    common = max(set(values), key=values.count) if counts[0] > (counts[1:] or [0])[0] else None
    return repr(_off(flat[key])) != common


def _off(v):
    return None if v in (None, 0, 0.0, "") and not isinstance(v, bool) else v


def group(runs: list[Path], until_kimg: float | None = None) -> list[Setting]:
    read = [(Path(r), *read_run(r)) for r in runs]
    if until_kimg is not None:
        read = [(p, cfg, _upto(curves, until_kimg)) for p, cfg, curves in read]
    configs = [c for _, c, _ in read]
    out: dict[str, Setting] = {}
    for path, cfg, curves in read:
        label = setting_label(cfg, configs) if len(read) > 1 else path.name
        s = out.setdefault(label, Setting(label))
        s.runs.append(path)
        s.curves.append(curves)
    return list(out.values())


def _upto(curves: dict[str, list[tuple[float, float]]], kimg: float) -> dict[str, list[tuple[float, float]]]:
    cut = {k: [(x, v) for x, v in c if x <= kimg + 1e-9] for k, c in curves.items()}
    return {k: c for k, c in cut.items() if c}


def band(curves: list[list[tuple[float, float]]]) -> tuple[list[float], list[float], list[float], list[float]]:
    """Mean, min and max over runs at the images-seen points every run logged."""
    common = sorted(set.intersection(*(set(k for k, _ in c) for c in curves))) if curves else []
    by_run = [dict(c) for c in curves]
    vals = [[r[k] for r in by_run] for k in common]
    return common, [sum(v) / len(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def summary(settings: list[Setting], fid: str | None = None) -> list[dict]:
    rows = []
    for s in settings:
        fk = [fid_key(c, fid) for c in s.curves]
        fids = [c[k] for c, k in zip(s.curves, fk, strict=True) if k]
        row = {"setting": s.label, "seeds": len(s.runs), "kimg": max(c["kimg"][-1][1] for c in s.curves if "kimg" in c)}
        if fids:
            finals, bests = [f[-1][1] for f in fids], [min(v for _, v in f) for f in fids]
            row.update(fid_key=fk[0], fid_final=_stat(finals), fid_best=_stat(bests))
        for key in ("weight/ess_frac", "weight/max", "disc/disc_acc"):
            last = [c[key][-1][1] for c in s.curves if key in c]
            if last:
                row[key] = _stat(last)
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    head = "| setting | seeds | kimg | final FID | best FID | ESS/batch | weight max | disc. acc. |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        cells = [r["setting"], r["seeds"], f"{r['kimg']:g}"]
        cells += [_fmt(r.get(k)) for k in ("fid_final", "fid_best", "weight/ess_frac", "weight/max", "disc/disc_acc")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    key = next((r["fid_key"] for r in rows if "fid_key" in r), None)
    note = f"FID: logged key `{key}`; mean over seeds, [min, max] when several." if key else "No FID was logged."
    return "\n".join(lines) + "\n\n" + note + "\n"


def plot(settings: list[Setting], path: Path, fid: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for ax, (title, key) in zip(axes, PANELS.items(), strict=True):
        for s in settings:
            keys = [key or fid_key(c, fid) for c in s.curves]
            curves = [c[k] for c, k in zip(s.curves, keys, strict=True) if k and k in c]
            if not curves:
                continue
            x, mean, lo, hi = band(curves)
            (line,) = ax.plot(x, mean, label=f"{s.label} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
        ax.set_title(title if key or not fid else f"FID ({fid})")
        ax.set_xlabel("thousands of images seen")
        if title == "FID":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(runs: list[str | Path], out: str | Path, fid: str | None = None, until_kimg: float | None = None) -> dict:
    """Write `<out>.png` and `<out>.md` for the given run folders; returns the summary rows. fid: the logged FID key
    to draw (e.g. `fid_raw`); default the first key starting with `fid`. until_kimg: read each run only up to
    that many thousand images seen."""
    if not runs:
        raise ValueError("compare needs at least one run folder")
    if until_kimg is not None and not until_kimg > 0:
        raise ValueError(f"until_kimg must be > 0, got {until_kimg}")
    settings = group([Path(r) for r in runs], until_kimg)
    rows = summary(settings, fid)
    out = Path(out)
    plot(settings, out.with_suffix(".png"), fid)
    out.with_suffix(".md").write_text(markdown(rows))
    return {"rows": rows, "png": str(out.with_suffix(".png")), "md": str(out.with_suffix(".md"))}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _stat(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "n": len(values)}


def _fmt(s: dict | None) -> str:
    if not s:
        return "n/a"
    if s["n"] == 1:
        return f"{s['mean']:.3g}"
    return f"{s['mean']:.3g} [{s['min']:.3g}, {s['max']:.3g}]"


__all__ = ["compare", "read_run", "group", "summary", "markdown", "plot"]
