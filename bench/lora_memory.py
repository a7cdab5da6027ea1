"""LoRA students (issue 33): adapter file size versus the full-weight export, and memory with and without one shared
frozen base, measured on the tiny Stable-Diffusion components of the tests; the SD1.5-size figures computed from
SD1.5's parameter counts (its UNet built on the meta device: no weights needed).

    python bench/lora_memory.py [--rank 4] [--steps 2] [--out bench/results]

Three text-to-image runs on the tiny SD pipeline (`tests/tiny_hf.py`: UNet 0.79 M parameters), each in its own
process, one CPU thread, `--steps` training steps at batch 2, then the export:
- `full`: full-weight G and psi (the default before LoRA students);
- `lora_own`: LoRA G and LoRA psi (rank R), each with its own copy of the frozen base (`share_lora_base=false`);
- `lora_shared`: the same with one frozen base for teacher, G, G's EMA and psi (the default).
Per configuration: the bytes of distinct tensor storages held by the trainer (teacher with VAE and text encoder,
G, EMA, psi, head, optimiser states) after training; the peak of CPU tensor memory during build + training (the
torch profiler's memory timeline, in a second process: every tensor allocated and freed, activations and gradients
included); and the peak resident set size of build + training above the process's RSS before it (Linux:
/proc/self/clear_refs resets the high-water mark; it also counts Python objects and allocator caches, which
dominate at this size). Writes `<out>/lora_memory.json` and `.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "full": {},
    "lora_own": {"model.student_lora_rank": "R", "model.fake_lora_rank": "R", "model.share_lora_base": False},
    "lora_shared": {"model.student_lora_rank": "R", "model.fake_lora_rank": "R"},
}
SD15_UNET = dict(cross_attention_dim=768, sample_size=64)  # UNet2DConditionModel's defaults are SD1.5's otherwise


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _held_bytes(tr) -> dict:
    """Bytes of distinct storages: networks (teacher + G + EMA + psi + head) and optimiser states."""
    import torch

    def storages(tensors) -> dict:
        return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if torch.is_tensor(t)}

    nets = [tr.m.teacher, tr.m.generator, tr.ema, tr.m.fake, tr.m.disc]
    weights = storages(t for n in nets for t in [*n.parameters(), *n.buffers()])
    opt = storages(v for o in (tr.opt_g, tr.opt_c) for s in o.state.values() for v in s.values())
    return {"weights_mib": sum(weights.values()) / 2**20, "optimizer_mib": sum(opt.values()) / 2**20,
            "total_mib": sum({**weights, **opt}.values()) / 2**20}  # fmt: skip


def one(name: str, rank: int, steps: int, work: Path, profiled: bool) -> dict:
    """One configuration in this process: build, train, export; its measurements (profiled: the peak of tensor
    memory only, as the profiler's own memory spoils the RSS)."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "tests"))
    from dibregman.config import override
    from dibregman.export import file_size
    from dibregman.loop import Trainer
    from dibregman.presets import get_preset
    from tiny_hf import tiny_sd_components

    sd = work / "sd"
    if not sd.exists():
        tiny_sd_components(sd, seed=0)
    (work / "prompts.txt").write_text("a cat\ndog on a mat\na red house\ntwo birds\n")
    pairs = {k: (rank if v == "R" else v) for k, v in CONFIGS[name].items()}
    cfg = override(get_preset("sd15"), {
        "model.teacher": f"sd:{sd}", "model.prompts": str(work / "prompts.txt"), "model.teacher_pool": 4,
        "model.teacher_pool_steps": 2, "optim.batch_size": 2, "optim.accum_steps": 1,
        "run.total_kimg": steps * 2 / 1000, "run.sample_every_kimg": 0.0, "run.tensorboard": False, **pairs,
    })  # fmt: skip
    import peft  # noqa: F401  (imported before the measurement: the full run does not need it)

    before = _rss_mib()
    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: the high-water mark restarts from the current RSS
    except OSError:
        reset = False
    t0 = time.time()
    if profiled:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                                    record_shapes=True, with_stack=True) as prof:  # fmt: skip
            Trainer(cfg, work / f"profiled-{name}").train()
        timeline = work / f"timeline-{name}.json"
        with warnings.catch_warnings():  # deprecated for CUDA (memory snapshots replace it); the CPU has nothing else
            warnings.simplefilter("ignore", FutureWarning)
            prof.export_memory_timeline(str(timeline), device="cpu")
        _, sizes = json.loads(timeline.read_text())
        return {"peak_tensor_mib": max(sum(s) for s in sizes) / 2**20}
    tr = Trainer(cfg, work / f"run-{name}")
    out = tr.train()
    peak = _rss_mib()
    export = Path(out["export"])
    student = export / "pytorch_lora_weights.safetensors" if export.name == "lora" else export / "unet"
    return {
        "config": name, "pairs": pairs, "steps": out["steps"], "wall_sec": time.time() - t0,
        "held": _held_bytes(tr), "peak_rss_above_start_mib": peak - before,
        "rss_before_mib": before,
        "rss_scope": "build + training" if reset else "process lifetime",
        "export": {"path": export.name, "student_weights_bytes": file_size(student), "folder_bytes": file_size(export)},
        "unet_parameters": sum(p.numel() for p in tr.m.teacher.unet.parameters()),
    }  # fmt: skip


def sd15_sizes(ranks: list[int]) -> dict:
    """SD1.5's UNet (meta device): parameters, the adapters of a LoRA student and of a LoRA psi (attention only) of
    each rank, and the float32 weights + Adam moments the three layouts hold (computed: 4 bytes a parameter)."""
    import torch
    from diffusers import UNet2DConditionModel

    from dibregman.networks.lora import PSI_TARGETS, lora_copy, lora_parameter_count

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    n = sum(p.numel() for p in unet.parameters())
    gib = 4 / 2**30
    rows = {}
    for r in ranks:
        with torch.device("meta"):
            a_g = lora_parameter_count(lora_copy(unet, r, share_base=False))
            a_psi = lora_parameter_count(lora_copy(unet, r, PSI_TARGETS, share_base=False))
        held = {  # weights (teacher, G, G's EMA, psi) + Adam's two moments of G and psi
            "full": 4 * n + 4 * n,
            "lora_own": 4 * n + 2 * a_g + a_psi + 2 * (a_g + a_psi),
            "lora_shared": n + 2 * a_g + a_psi + 2 * (a_g + a_psi),
        }
        rows[str(r)] = {"adapter_parameters": a_g, "adapter_mib_fp32": a_g * 4 / 2**20, "psi_adapter_parameters": a_psi,
                        "held_gib_fp32": {k: v * gib for k, v in held.items()}}  # fmt: skip
    return {"unet_parameters": n, "unet_gib_fp32": n * gib, "lora": rows}


def render(data: dict) -> str:
    rows = ["| run | G, psi | held after training (MiB): weights + optimiser = total | peak tensor memory (MiB) | "
            "peak RSS above start (MiB) | student weights in the export |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in data["runs"]:
        h, e = r["held"], r["export"]
        kind = "full, full" if r["config"] == "full" else f"LoRA r={data['rank']}, LoRA r={data['rank']}"
        base = {"full": "", "lora_own": " (own bases)", "lora_shared": " (one shared base)"}[r["config"]]
        rows.append(f"| `{r['config']}` | {kind}{base} | {h['weights_mib']:.2f} + {h['optimizer_mib']:.2f} = "
                    f"{h['total_mib']:.2f} | {r['peak_tensor_mib']:.2f} | {r['peak_rss_above_start_mib']:.1f} | "
                    f"{e['path']}: "
                    f"{e['student_weights_bytes'] / 1024:.1f} KiB |")  # fmt: skip
    sd = data["sd15"]
    lines = [f"# LoRA students: export size and memory (`{data['command']}`, {data['date']})", "",
             f"Tiny SD components (UNet {data['runs'][0]['unet_parameters']:,} parameters), {data['steps']} steps "
             "at batch 2, one CPU thread each:", "", *rows, "",
             f"SD1.5 from parameter counts (UNet {sd['unet_parameters']:,} parameters = {sd['unet_gib_fp32']:.2f} GiB "
             "in float32, the full export's new weights):", "",
             "| LoRA rank (G and psi) | G's adapter parameters | adapter file (MiB) | held GiB: full / LoRA own "
             "bases / LoRA one base |", "|---|---|---|---|"]  # fmt: skip
    for r, v in sd["lora"].items():
        h = v["held_gib_fp32"]
        lines.append(f"| {r} | {v['adapter_parameters']:,} | {v['adapter_mib_fp32']:.1f} | {h['full']:.1f} / "
                     f"{h['lora_own']:.1f} / {h['lora_shared']:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=4, help="LoRA rank of G and psi in the tiny runs")
    p.add_argument("--steps", type=int, default=2, help="training steps per tiny run")
    p.add_argument("--sd15-ranks", default="4,16,64", help="ranks of the SD1.5 adapter sizes")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    p.add_argument("--work", default="", help=argparse.SUPPRESS)
    p.add_argument("--profiled", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.rank, args.steps, Path(args.work), args.profiled)))
        return
    with tempfile.TemporaryDirectory() as work:
        runs = []
        for name in CONFIGS:  # a process per measurement: plain (RSS, held, export), then profiled (tensor peak)
            run = {}
            for extra in ([], ["--profiled"]):
                cmd = [sys.executable, __file__, "--one", name, "--rank", str(args.rank), "--steps", str(args.steps),
                       "--work", work, *extra]  # fmt: skip
                env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
                res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
                run.update(json.loads(res.stdout.strip().splitlines()[-1]))
            runs.append(run)
    data = {
        "command": " ".join(["python bench/lora_memory.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"), "rank": args.rank, "steps": args.steps, "runs": runs,
        "sd15": sd15_sizes([int(r) for r in args.sd15_ranks.split(",")]),
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lora_memory.json").write_text(json.dumps(data, indent=2))
    (out / "lora_memory.md").write_text(render(data))
    print(render(data))


if __name__ == "__main__":
    main()
