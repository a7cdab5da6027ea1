"""What every benchmark script shares: the common flags, sizes (default x --scale, or the --quick smoke
sizes), the machine record written into every JSON, JSON I/O, and the Markdown header line of each table.

Every script under bench/ exposes `NAME`, `TITLE`, `build_parser()`, `run(args) -> dict` (writes
`<out>/<NAME>.json` and its PNGs) and `render(data, all_data) -> str` (its BENCHMARKS.md section, every
number read from the JSON).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "runs" / "bench"
MNIST_TEACHER = "edm:assets/mnist_teacher.safetensors"  # the shipped teacher (as the `mnist` preset and the demo)


def add_common_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("common (every bench script)")
    g.add_argument("--out", default=str(RESULTS), help="folder for the JSON / PNG results (default bench/results)")
    g.add_argument("--work", default=str(WORK), help="folder for run directories and checkpoints (runs/bench)")
    g.add_argument("--quick", action="store_true", help="smoke run of seconds: tiny sizes, numbers meaningless")
    g.add_argument("--scale", type=float, default=1.0, help="multiply every default size (kimg, sample counts)")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run")
    g.add_argument("--seed", type=int, default=0, help="seed of every run and sample set")
    return p


def parse(parser: argparse.ArgumentParser, argv: list[str] | None, name: str) -> argparse.Namespace:
    """Parse a script's flags and remember the exact command line (written into its JSON)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command = " ".join([f"bench/{name}.py", *argv])
    return args


def setup(args: argparse.Namespace) -> torch.device:
    """Absolute paths, then cwd = repository root (presets name data/, assets/ relatively); threads; device"""
    args.out, args.work = Path(args.out).resolve(), Path(args.work).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    os.chdir(ROOT)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def size(args: argparse.Namespace, name: str, default: float, quick: float, integer: bool = True):
    """The size `name`: an explicit flag wins, else the quick size under --quick, else default * --scale."""
    given = getattr(args, name, None)
    if given is not None:
        return given
    value = quick if args.quick else default * args.scale
    if not integer:
        return float(value)
    return 0 if value == 0 else max(1, int(round(value)))  # 0 means "off" (e.g. no Inception FID)


def machine(device: torch.device) -> dict:
    """Where the numbers were measured (written into every JSON and every table header)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "load_avg_1min_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def git_commit() -> str:
    """HEAD's short hash, with "+dirty" when bench/ or src/ differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "src", "bench"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    except OSError:
        return "unknown"
    return (head.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else "")


def record(name: str, args: argparse.Namespace, device: torch.device, sizes: dict) -> dict:
    """The header of a result JSON; `finish()` adds the wall time."""
    return {
        "benchmark": name,
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": bool(args.quick),
        "scale": args.scale,
        "seed": args.seed,
        "sizes": sizes,
        "command": getattr(args, "command", " ".join(sys.argv)),
        "git_commit": git_commit(),
        "machine": machine(device),
        "_t0": time.time(),
    }


def finish(data: dict, out: Path, render=None) -> Path:
    """Stamp the wall time and write BENCHMARK.json; given `render(data) -> str`, also BENCHMARK.md beside it (one
    final newline) and say so on stdout. Returns the JSON's path."""
    name = data["benchmark"]
    data["wall_sec"] = round(time.time() - data.pop("_t0"), 1)
    path = write_json(out / f"{name}.json", data)
    if render is not None:
        (out / f"{name}.md").write_text(render(data).rstrip("\n") + "\n")
        print(f"[{name}] wrote {path} and {name}.md ({data['wall_sec']:g} s)", flush=True)
    return path


def write_json(path: Path, data: dict) -> Path:
    """Atomic write through a temp file of this process: two processes writing `path` never share a temp file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float) + "\n")
    tmp.replace(path)
    return path


def fresh_dir(path: Path) -> Path:
    """An empty run folder (a leftover checkpoint would make the Trainer resume instead of measuring)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def teacher_info(spec: str) -> dict:
    """Which teacher file was measured: path, sha256 prefix, images it was trained on (from its metadata)."""
    from dibregman.checkpoint import load_safetensors
    from dibregman.teachers import resolve_path

    path = Path(resolve_path(spec).partition(":")[2])
    info = {"spec": spec, "path": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)}
    if path.is_file():
        info["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        info["num_images"] = load_safetensors(path)[1].get("num_images")
    return info


def mnist_available() -> bool:
    return (ROOT / "data" / "mnist" / "t10k-images-idx3-ubyte").is_file()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fid(x: torch.Tensor, reference, net, n_ref: int | None, device) -> dict:
    """FID (+ KID, precision/recall) of samples x [N, C, H, W] against the reference, as in the demo's report;
    `n_ref` takes a fixed random subset of the reference (the Inception rows use as many as samples)."""
    from dibregman.evaluate import evaluate_samples

    r = evaluate_samples(
        x,
        reference,
        feature_net=net,
        num_reference=n_ref,
        metrics=("fid", "kid", "pr"),
        kid_subset_size=min(1000, len(x)),
        device=device,
    )
    keep = ("fid", "kid", "precision", "recall", "n_samples", "n_reference", "n_nonfinite", "reference")
    return {k: r[k] for k in keep if k in r}


# ---- Markdown -----------------------------------------------------------------------------------------
def fmt(x, digits: int = 3) -> str:
    """A JSON number as table text: `digits` significant digits, integers as integers, None as n/a."""
    if x is None:
        return "n/a"
    if isinstance(x, bool | int | str):
        return str(x)
    if x != x:
        return "nan"
    if x == 0 or abs(x) < 1e-3 or abs(x) >= 1e6:
        return f"{x:.{digits}g}"
    if abs(x) >= 10**digits:
        return f"{x:.0f}"
    return f"{x:#.{digits}g}".rstrip("0").rstrip(".")


def plural(n: int, word: str) -> str:
    """'seed' for 1, 'seeds' otherwise."""
    return f"{word}{'s' * (n != 1)}"


def count(n: int, word: str) -> str:
    """'1 seed', '2 seeds': a count with its noun."""
    return f"{n} {plural(n, word)}"


def unfinished(missing: list[dict], keys: tuple[str, ...], aliases: dict | None = None) -> str:
    """'Not finished (3 runs): `a` seeds 0, 1; `b` seed 0': a sweep's missing runs, seeds grouped per setting (the
    setting is the values of `keys`, in order of first appearance). An alias's entries (`fkl` for `sba(lam=-1)`)
    are its target's runs, listed under the target only."""
    missing = [m for m in missing if m.get("label") not in (aliases or {})]
    seeds: dict[tuple, list] = {}
    for m in missing:
        seeds.setdefault(tuple(m[k] for k in keys), []).append(m["seed"])
    parts = [
        " ".join(f"`{v}`" for v in setting) + f" {plural(len(s), 'seed')} " + ", ".join(map(str, s))
        for setting, s in seeds.items()
    ]
    return f"Not finished ({count(len(missing), 'run')}): " + "; ".join(parts)


def header_line(d: dict) -> str:
    m = d["machine"]
    dev = m.get("gpu", m["device"])
    quick = " **SMOKE RUN (--quick): tiny sizes, the numbers mean nothing.**" if d.get("quick") else ""
    return (
        f"Measured {d['date_utc']} on {m['platform']}, {m['cpu']} ({m['cpus_usable']} usable of "
        f"{m['cpu_count']} CPUs, load {fmt(m['load_avg_1min_at_start'], 2)} at start), torch {m['torch']}, "
        f"device {dev}, torch threads {m['threads']}; commit {d['git_commit']}; "
        f"wall time {fmt(d['wall_sec'], 4)} s; "
        f"command `{d['command']}`.{quick}"
    )


def table(head: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
