"""Command-line interface: thin wrappers that turn flags into configs and call the library.

dibregman train-teacher | distill | sample | eval | bench | divergences | import-edm | demo | compare | plan
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def cmd_train_teacher(args) -> None:
    from dataclasses import asdict

    from . import dist
    from .config import parse_set
    from .config_help import describe_keys
    from .train_teacher import teacher_config, train_teacher

    if args.list_keys:
        print(describe_keys(teacher_config(args.preset)))
        return
    options = {"data": args.data} if args.data else {}
    cfg = teacher_config(args.preset, **{**options, **parse_set(args.set)})  # --set wins over --data
    run_dir = _writable(args.run_dir, "--run-dir", folder=True)
    if args.print_config:
        print(json.dumps(asdict(cfg), indent=2))
        return
    out = train_teacher(cfg, run_dir)
    dist.print0(f"teacher EMA weights: {out}")
    dist.destroy()  # under torchrun: end the process group while the interpreter is alive (dist.destroy)


# The common `distill` flags and the config keys they set (everything else: --set section.key=value).
FLAG_KEYS = {
    "divergence": "divergence.name",
    "teacher": "model.teacher",
    "data": "model.real",
    "prompts": "model.prompts",
    "kimg": "run.total_kimg",
    "batch": "optim.batch_size",
    "reward": "reward.name",
}


def resolve_config(args):
    """--preset + common flags + --set section.key=value -> a validated DistillConfig."""
    from .config import parse_set
    from .presets import from_preset

    for flag in ("kimg", "batch"):  # 0 or less is a mistake, not "use the preset's value"
        if getattr(args, flag, None) is not None and getattr(args, flag) <= 0:
            raise ValueError(f"--{flag} must be > 0, got {getattr(args, flag):g}; omit it for the preset's value")
    pairs = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items() if getattr(args, flag, None)}
    return from_preset(args.preset, {**pairs, **parse_set(args.set)})


def cmd_distill(args) -> None:
    from . import dist
    from .config_help import describe_keys
    from .loop import distill
    from .presets import get_preset

    if args.list_keys:
        print(describe_keys(get_preset(args.preset)))
        return
    cfg = resolve_config(args)
    run_dir = _writable(args.run_dir or f"runs/{args.preset}-{cfg.divergence.name}", "--run-dir", folder=True)
    if args.print_config:
        print(cfg.to_json())
        return
    out = distill(cfg, run_dir)
    dist.print0(json.dumps(out, indent=2))
    dist.destroy()


def cmd_export(args) -> None:
    from .loop import export_run

    print(export_run(args.run_dir))


def cmd_sample(args) -> None:
    import torch

    from . import teacher_samples
    from .generators import sample_export
    from .networks.student import check_steps
    from .viz import save_image_grid, save_scatter

    _positive(args, "num", "batch")
    if args.steps < 0:
        raise ValueError(f"--steps must be >= 1 (or 0: all the student's steps), got {args.steps}")
    _writable(args.out, "--out")
    if bool(args.checkpoint) == bool(args.teacher):
        raise ValueError("give one of --checkpoint RUN_OR_EXPORT (a student) or --teacher SPEC --nfe N (its teacher)")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available; use --device cpu or auto")
    gen, meta = teacher_samples.load_sampler(args, device)
    steps = None if args.teacher else (args.steps or None)  # 0: every step the student was trained with
    k = 1 if args.teacher else check_steps(gen, steps)  # more steps than trained: refused before any write
    prompts = _sample_prompts(args)
    x, ncol = sample_export(gen, meta, args.num, prompts, seed=args.seed, batch_size=args.batch, steps=steps)
    what = f"teacher samples ({args.sampler}, {args.nfe} evaluations)" if args.teacher else f"{k}-step samples"
    out = args.out
    if out.endswith(".npz"):
        import numpy as np

        np.savez_compressed(out, samples=x.numpy())
    elif x.ndim == 4:
        save_image_grid(x[: min(len(x), 256)], out, ncol=ncol)
    else:
        save_scatter(x, out)
    finite = torch.isfinite(x.flatten(1)).all(1)
    print(f"wrote {len(x)} {what} to {out} ({int((~finite).sum())} non-finite)")


def _sample_prompts(args) -> list[str]:
    """--prompt (repeatable) then the lines of --prompts FILE."""
    prompts = list(args.prompt or [])
    if args.prompts:
        from .conditions import read_prompts

        prompts += read_prompts(args.prompts)
    return prompts


def cmd_eval(args) -> None:
    from . import dist

    try:  # torchrun: one rank per GPU (NCCL) or CPU process (gloo), each extracts a slice
        _eval(args, dist.init(args.device))
    finally:
        dist.destroy()


def _eval(args, device) -> None:
    from . import dist, evaluate, teacher_samples

    _positive(args, "num", "trials", "batch")
    if args.out:
        _writable(args.out, "--out")
    kw = dict(feature_net=args.features, protocol=args.protocol, device=device, progress=not args.quiet)
    kw["num_reference"] = args.num_reference or None
    opts = dict(metrics=args.metrics.split(","), num_trials=args.trials, batch_size=args.batch)
    if args.write_stats:  # the reference's mu/sigma in the EDM / clean-fid .npz format
        from .metrics import get_feature_net, save_stats

        net = get_feature_net(args.features, device, args.protocol)
        ref = evaluate.prepare_reference(
            args.reference, net, num_reference=kw["num_reference"], batch_size=args.batch, progress=not args.quiet
        )
        if dist.rank() == 0:
            print(f"wrote {ref.protocol} statistics to {save_stats(ref, args.write_stats)}", file=sys.stderr)
    sources = sum(map(bool, (args.samples, args.checkpoint, args.run, args.teacher)))
    if sources == 0 and args.write_stats:
        return
    if sources != 1 or bool(args.run) != bool(args.every_ckpt or args.ckpt):
        raise ValueError(
            "give one of --samples PATH, --checkpoint PATH, --teacher SPEC --nfe N or --run RUN with "
            "--every-ckpt / --ckpt FILE"
        )
    if args.run:
        from .evaluate_run import evaluate_run, fid_table

        out = evaluate_run(args.run, args.reference, snapshots=args.ckpt or None, num_samples=args.num,
                           seed=args.seed, out=args.out or None, **kw, **opts)  # fmt: skip
        dist.print0(fid_table(out["rows"]) + "\n" + "\n".join(f"wrote {p}" for p in out.get("written", [])))
        return
    if args.checkpoint or args.teacher:
        gen, meta = teacher_samples.load_sampler(args, device)
        steps = None if args.teacher else (args.steps or None)
        res = evaluate.evaluate_generator(gen, args.num, args.reference, seed=args.seed, steps=steps, **kw, **opts)
        res.update({k: meta[k] for k in ("teacher", "sampler", "nfe") if k in meta})
    else:
        samples = evaluate.load_samples(args.samples)
        res = evaluate.evaluate_samples(samples, args.reference, seed=args.seed, **kw, **opts)
    dist.print0(json.dumps(res, indent=2))
    if args.out and dist.rank() == 0:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
        if args.checkpoint and Path(args.out).parent.is_dir():  # written into a run folder: the card lists it
            from .modelcard import refresh

            refresh(Path(args.out).parent)


def cmd_divergences(args) -> None:
    from . import divergences, viz

    if args.plot:
        _writable(args.plot, "--plot")
    print(divergences.describe())
    if args.plot:
        viz.plot_log_weights(args.plot)
        print(f"plot written to {args.plot}")


def cmd_import_edm(args) -> None:
    from .teachers.edm import import_edm_state_dict

    out = import_edm_state_dict(args.state_dict, args.kwargs, _writable(args.out, "--out"))
    print(f"imported EDM teacher: {out}")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(_writable(args.out, "--out", folder=True), quick=args.quick)


def cmd_bench(args) -> None:
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / "run_all.py"
    if not script.exists():
        raise FileNotFoundError(f"{script} not found: `dibregman bench` runs from a source checkout")
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")


def cmd_compare(args) -> None:
    from .compare import compare

    r = compare(args.runs, args.out, fid=args.fid or None, until_kimg=args.kimg)
    print(open(r["md"]).read(), end="")
    print(f"curves: {r['png']}  table: {r['md']}")


def cmd_plan(args) -> None:
    from .config import parse_set
    from .plan import plan, render

    kw = dict(parallel=args.parallel, batch=args.batch, lora_rank=args.lora_rank, pairs=parse_set(args.set))
    print(render(plan(args.preset, gpus=args.gpus, gpu_mem_gib=args.gpu_mem, **kw)))


COMMANDS = {
    "train-teacher": cmd_train_teacher,
    "distill": cmd_distill,
    "export": cmd_export,
    "sample": cmd_sample,
    "eval": cmd_eval,
    "divergences": cmd_divergences,
    "import-edm": cmd_import_edm,
    "demo": cmd_demo,
    "bench": cmd_bench,
    "compare": cmd_compare,
    "plan": cmd_plan,
}


def _positive(args, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}")


def _writable(path: str, flag: str, folder: bool = False) -> str:
    """`path` if it can be written: ValueError naming `flag` if it (for a folder) or a parent is a file."""
    p = Path(path)
    if p.exists() and p.is_dir() != folder:
        raise ValueError(
            f"{flag} {path} is a {'file' if folder else 'folder'}; give a {'folder' if folder else 'file'}"
        )
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {path}: {parent} is a file, not a folder")
            break
    return path


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .teacher_samples import add_teacher_flags

    p = _Parser(prog="dibregman", description="Di-Bregman one-step diffusion distillation")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train-teacher", help="train a native U-Net teacher (EDM or rectified flow) on a local dataset")
    t.add_argument("--preset", default="mnist", help="named teacher config: mnist | mnist-flow | digits")
    t.add_argument("--data", default="", help="dataset spec KIND:PATH, e.g. mnist:data/mnist")
    t.add_argument("--run-dir", default="runs/teacher", help="run folder (auto-resumes from its newest checkpoint)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a TeacherConfig field")
    t.add_argument("--print-config", action="store_true", help="print the resolved TeacherConfig (JSON) and exit")
    t.add_argument("--list-keys", action="store_true", help="print every key: type, the preset's value, help")

    d = sub.add_parser("distill", help="distil a teacher into a one-step generator (Algorithm 1)")
    d.add_argument("--preset", default="gmm", help="named config: gmm | mnist | mnist-paper | cifar10 | sd15")
    d.add_argument("--divergence", default="", help="registered divergence (see `dibregman divergences`)")
    d.add_argument("--teacher", default="", help="teacher spec: edm:FILE, diffusers:DIR, python:MODULE:FUNCTION, ...")
    d.add_argument("--data", default="", help="real side of the discriminator: KIND:PATH or 'teacher'")
    d.add_argument("--prompts", default="", help="text-to-image: prompts file (.txt/.csv/.jsonl)")
    d.add_argument("--kimg", type=float, default=None, help="training length in thousands of images")
    d.add_argument("--batch", type=int, default=None, help="global batch size")
    d.add_argument(
        "--reward",
        default="",
        help="distil p R / Z (Appendix G): none | constant | gmm_modes | "
        "mnist_class | python:MODULE:FUNCTION; parameters via --set reward.KEY=VALUE",
    )
    d.add_argument("--run-dir", default="", help="run folder (auto-resumes); default runs/<preset>-<divergence>")
    d.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="any config field")
    d.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    d.add_argument("--list-keys", action="store_true", help="print every key: type, the preset's value, help")

    x = sub.add_parser("export", help="export a run's newest checkpoint (also a sharded one) as its generator file")
    x.add_argument("run_dir", help="distillation run folder")

    s = sub.add_parser("sample", help="one- or few-step samples from an exported generator, or its teacher's")
    s.add_argument("--checkpoint", default="", help="run or export folder (LoRA, diffusers) or generator.safetensors")
    add_teacher_flags(s)
    s.add_argument("--num", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch", type=int, default=256)
    s.add_argument("--out", default="samples.png", help=".png grid/scatter or .npz array")
    s.add_argument("--prompt", action="append", default=[], help="text-to-image: a prompt (repeatable)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto | cpu | cuda")
    s.add_argument("--prompts", default="", help="text-to-image: prompts file (--num images cycle)")
    s.add_argument("--steps", type=int, default=0, help="student steps, 1..K (0 = all K it was trained with)")

    e = sub.add_parser("eval", help="FID/KID/precision-recall of samples, a generator or a run's snapshots")
    e.add_argument("--samples", default="", help=".npz or image folder")
    e.add_argument("--checkpoint", default="", help="run folder or generator.safetensors")
    e.add_argument("--run", default="", help="run folder: FID versus images of its EMA snapshots (JSON + PNG)")
    add_teacher_flags(e)
    e.add_argument("--every-ckpt", action="store_true", help="with --run: every ckpt-*.pt and ema-*.safetensors")
    e.add_argument("--ckpt", action="append", default=[], help="with --run: only these snapshot files (repeatable)")
    e.add_argument("--reference", default="mnist:data/mnist:test", help="KIND:PATH[:split] or stats:FILE.npz")
    e.add_argument("--num-reference", type=int, default=0, help="fixed random subset of the reference (0 = all)")
    e.add_argument("--features", default="inception", choices=["inception", "mnist"])
    e.add_argument("--protocol", choices=["edm", "clean"], help="Inception FID pipeline (default edm), see README")
    e.add_argument("--metrics", default="fid,kid,pr,score", help="comma-separated subset of fid,kid,pr,score")
    e.add_argument("--num", type=int, default=2000, help="samples drawn from --checkpoint / each --run snapshot")
    e.add_argument("--trials", type=int, default=1)
    e.add_argument("--steps", type=int, default=0, help="with --checkpoint: student steps 1..K (0 = all K)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch", type=int, default=256, help="images per feature-net batch")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda (as for training; torchrun: one per rank)")
    e.add_argument("--write-stats", default="", help="also write the reference's mu/sigma .npz (EDM/clean-fid)")
    e.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    e.add_argument("--out", default="", help="write the JSON result here (--run: <out>.json + <out>.png)")

    v = sub.add_parser("divergences", help="list the registered divergences and their weights")
    v.add_argument("--plot", default="", help="write a PNG of log-weight versus logit")

    i = sub.add_parser("import-edm", help="convert a state dict exported from an official EDM checkpoint")
    i.add_argument("state_dict", help="file written by torch.save(net.state_dict()) where EDM is installed")
    i.add_argument("kwargs", help="JSON of the network's init_kwargs")
    i.add_argument("--out", required=True, help="output .safetensors (a .json is written beside it)")

    m = sub.add_parser("demo", help="distil the shipped MNIST teacher and write a report")
    m.add_argument("--out", default="runs/demo")
    m.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for smoke tests")

    c = sub.add_parser("compare", help="curves of several runs in one PNG + Markdown table (seeds as a band)")
    c.add_argument("runs", nargs="+", help="run folders (with log.jsonl); same config but the seed = one band")
    c.add_argument("--out", default="compare", help="output path without suffix: writes OUT.png and OUT.md")
    c.add_argument("--fid", default="", help="logged FID key to draw (default: the first key starting with fid)")
    c.add_argument("--kimg", type=float, default=None, help="read every run only up to this many kimg (equal images)")

    pl = sub.add_parser("plan", help="GPU memory per rank under none / ddp / fsdp, and which settings fit")
    pl.add_argument(
        "--preset", required=True, help="gmm | mnist | mnist-paper | cifar10 | sd15, or a size: sdxl | sd3 | flux"
    )
    pl.add_argument("--gpus", type=int, default=1, help="GPUs, one rank each (ddp, fsdp)")
    pl.add_argument("--gpu-mem", type=float, default=80.0, help="memory of one GPU in GiB")
    pl.add_argument("--parallel", default="all", help="none | ddp | fsdp | all")
    pl.add_argument("--batch", type=int, default=None, help="global batch (default: the preset's)")
    pl.add_argument("--lora-rank", type=int, default=None, help="text-to-image: LoRA rank of psi (0 = full weights)")
    pl.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="any config field")

    b = sub.add_parser("bench", help="run the benchmark scripts under bench/ (source checkout)")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run a command; every failure is one line on stderr after the progress bar is closed (`console.run_reported`):
    exit 2 for bad input, 1 for a failed run, 128 + signal for a stop by SIGINT/SIGTERM (during start-up too)."""
    from .console import run_reported

    args = build_parser().parse_args(argv)
    run = args.command in ("distill", "train-teacher")
    return run_reported(COMMANDS[args.command], args, prefix=f"dibregman {args.command}", starts_a_run=run)


if __name__ == "__main__":
    sys.exit(main())
