"""FID versus images seen for a user's own run (the view of the Di-Bregman paper's Fig. 4).

    dibregman eval --run runs/mnist-sba --every-ckpt --features inception --protocol clean --num 10000
    evaluate_run("runs/mnist-sba", "mnist:data/mnist:test", num_samples=10_000, feature_net="inception")

Snapshots are the run's kept checkpoints `ckpt-<images>.pt` (their "ema" entry: the EMA generator) and its EMA
exports `ema-<images>.safetensors` (written every `run.keep_ema_every_kimg`, see `generators.export_ema_snapshot`;
`run.keep_ckpts` prunes checkpoints, not these); at equal images the export is used (it needs no teacher file).
Every snapshot draws the same z (one seed: common random numbers, so differences between snapshots are not
sampling noise of z) and is scored against one reference, computed or loaded once. Output: `<out>.json` (one
row per snapshot: images, kimg, every metric, protocol) and `<out>.png` (FID versus kimg).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import dist
from .evaluate import DEFAULT_REFERENCE, evaluate_generator, prepare_reference
from .generators import EMA_SNAPSHOT, load_generator
from .ladder import make_student
from .metrics.features import get_feature_net
from .metrics.progress import note
from .networks.generator import OneStepGenerator

CKPT = re.compile(r"^ckpt-(\d+)\.pt$")


def snapshot_images(path: Path) -> int:
    """Images seen of a `ckpt-<images>.pt` or `ema-<images>.safetensors` file."""
    m = CKPT.match(path.name) or EMA_SNAPSHOT.match(path.name)
    if m is None:
        raise ValueError(f"{path}: not a checkpoint ckpt-<images>.pt nor an EMA export ema-<images>.safetensors")
    return int(m.group(1))


def list_snapshots(run_dir: str | Path) -> list[Path]:
    """Every EMA snapshot of a run, oldest first; one per image count (the export where both exist)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    found = {snapshot_images(p): p for p in ckpt.list_checkpoints(run_dir)}
    found.update({snapshot_images(p): p for p in run_dir.glob("ema-*.safetensors") if EMA_SNAPSHOT.match(p.name)})
    if not found:
        raise FileNotFoundError(f"no ckpt-*.pt or ema-*.safetensors in {run_dir}")
    return [found[k] for k in sorted(found)]


def _in_run(run_dir: str | Path, path: str | Path) -> Path:
    """A snapshot path as given, else inside the run folder."""
    path = Path(path)
    return path if path.exists() or path.is_absolute() else Path(run_dir) / path


def load_snapshot(path: str | Path, device="cpu") -> OneStepGenerator:
    """The EMA generator of a checkpoint (rebuilt from the teacher named in its config) or of an EMA export."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_generator(path, device)[0]
    from .config import DistillConfig
    from .teachers import load_teacher

    state = ckpt.load(path)
    cfg = DistillConfig.from_dict(state["config"])
    teacher = load_teacher(cfg.model.teacher)  # resolves package-relative paths itself
    latent = hasattr(teacher, "encode_prompts") or hasattr(teacher, "decode")  # text or latent-space teachers
    if latent or not any(True for _ in teacher.parameters()):
        raise ValueError(f"{path}: FID curves need an unconditional image generator (teacher {cfg.model.teacher!r})")
    if cfg.model.student_lora_rank:  # a LoRA student: adapters (the checkpoint's) on the teacher's weights
        from .networks.lora import lora_copy

        teacher = lora_copy(teacher, cfg.model.student_lora_rank)
    gen = make_student(teacher, cfg, teacher)  # the generator is a copy of the teacher network (K steps)
    gen.load_state_dict(state["ema"])
    return gen.to(device).eval().requires_grad_(False)


def evaluate_run(
    run_dir: str | Path,
    reference: str = DEFAULT_REFERENCE,  # KIND:PATH[:SPLIT] or stats:FILE.npz
    *,
    snapshots: list[str | Path] | None = None,  # explicit files (default: `list_snapshots(run_dir)`)
    num_samples: int = 10_000,  # samples per snapshot (compare curves only at equal n)
    seed: int = 0,  # z seed, the same for every snapshot
    feature_net: str = "inception",
    protocol: str | None = None,  # Inception: edm | clean
    device: str | torch.device = "cpu",
    out: str | Path | None = None,  # writes <out>.json and <out>.png; default <run_dir>/fid_curve
    progress: bool = False,
    **options,  # evaluate_samples' metric options (metrics, batch_size, num_reference, cache_dir, ...)
) -> dict:
    """Evaluate each snapshot; returns (and on rank 0 writes) the curve."""
    paths = [_in_run(run_dir, p) for p in snapshots] if snapshots else list_snapshots(run_dir)
    net = get_feature_net(feature_net, device, protocol)
    ref_opts = {k: options.pop(k) for k in ("num_reference", "cache_dir", "batch_size") if k in options}
    ref = prepare_reference(reference, net, seed=seed, progress=progress, **ref_opts)
    rows = []
    for i, path in enumerate(paths):
        n_img = snapshot_images(path)
        note(f"snapshot {i + 1}/{len(paths)}: {path.name} ({n_img / 1000:g} kimg)", enabled=progress)
        gen = load_snapshot(path, device)
        res = evaluate_generator(
            gen, num_samples, ref, seed=seed, device=device, feature_net=net, progress=progress,
            batch_size=ref_opts.get("batch_size", 256), **options,
        )  # fmt: skip
        rows.append({"snapshot": path.name, "num_images": n_img, "kimg": n_img / 1000, **res})
    curve = {
        "run_dir": str(run_dir), "protocol": ref.protocol, "feature_net": net.name,
        "reference": rows[0]["reference"], "n_samples": num_samples, "seed": seed, "rows": rows,
    }  # fmt: skip
    if dist.rank() == 0:
        out = Path(out) if out else Path(run_dir) / "fid_curve"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(curve, indent=2))
        plot_curve(curve, out.with_suffix(".png"))
        curve["written"] = [str(out.with_suffix(".json")), str(out.with_suffix(".png"))]
        if out.parent.resolve() == Path(run_dir).resolve():  # the export's model card lists the new FID
            from .modelcard import refresh

            card = refresh(run_dir)
            curve["written"] += [str(card)] if card else []
    return curve


def plot_curve(curve: dict, path: str | Path) -> Path:
    """FID versus kimg of one curve (one protocol) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = curve["rows"]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot([r["kimg"] for r in rows], [r["fid"] for r in rows], "o-")
    ax.set_xlabel("generator images seen (kimg)")
    net, protocol = curve["feature_net"], curve["protocol"]
    ax.set_ylabel(f"FID ({net if protocol == net else f'{net}/{protocol}'}, n={curve['n_samples']})")
    ax.set_title(Path(curve["run_dir"]).name, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def fid_table(rows: list[dict], row_key: str = "kimg") -> str:
    """Markdown table of FID by `row_key`, one column per (feature net, protocol): protocols never share one."""
    cols = sorted({(r["feature_net"], r.get("protocol", r["feature_net"])) for r in rows})
    cells: dict = {}
    for r in rows:
        cells.setdefault(r[row_key], {})[(r["feature_net"], r.get("protocol", r["feature_net"]))] = r
    head = [row_key] + [f"FID ({net}/{proto})" if proto != net else f"FID ({net})" for net, proto in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(cells):
        vals = [f"{cells[key][c]['fid']:.3f} (n={cells[key][c]['n_samples']})" if c in cells[key] else "" for c in cols]
        lines.append(f"| {key} | " + " | ".join(vals) + " |")
    return "\n".join(lines)
