"""Many GMM tuning runs in parallel, one CPU thread each (used to choose the `gmm` preset on a many-core box).

    python bench/tuning/gmm_grid.py GRID.json OUT_DIR [--workers 15] [--every 100]

GRID.json maps a run name to its `--set` overrides on the `gmm` preset, e.g.
{"base": {}, "b64": {"optim.batch_size": 64}}. Each finished run appends one JSON line to OUT_DIR/grid.jsonl:
its overrides, wall time, and the history [(kimg, modes covered, fraction within 3 std)] of 4000 EMA samples
every `--every` kimg (a mode counts as covered with at least 1/32 of the samples); OUT_DIR/summary.md
is rewritten after every run, best final "within 3 std" first.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
import traceback
from pathlib import Path


def run_one(item):
    name, pairs, every = item
    import torch

    torch.set_num_threads(1)
    from dibregman.config import override
    from dibregman.generators import generate
    from dibregman.loop import distill
    from dibregman.presets import get_preset
    from dibregman.teachers.gmm import ring_mixture

    ring, hist = ring_mixture(), []
    base = {"run.tensorboard": False, "run.sample_every_kimg": 0.0, "run.threads": 1, "run.device": "cpu"}
    t0 = time.time()
    try:
        cfg = override(get_preset("gmm"), {**base, **pairs})
        cfg = override(cfg, {"run.log_every_kimg": every, "run.ckpt_every_kimg": cfg.run.total_kimg})

        def hook(trainer, num_images: int) -> dict:
            x = generate(trainer.ema, 4000, seed=1)
            labels = ring.mode_assignment(x, 3.0)
            within = float((labels >= 0).float().mean())
            modes = int((torch.bincount(labels[labels >= 0], minlength=8) >= 4000 / 32).sum())
            hist.append((round(num_images / 1000), modes, round(within, 4)))
            return {}

        with tempfile.TemporaryDirectory() as d:
            distill(cfg, d, hooks=[hook])
        return {"name": name, "set": pairs, "wall_s": round(time.time() - t0), "hist": hist}
    except Exception as e:  # a bad grid entry must not stop the others
        return {"name": name, "set": pairs, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-800:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid")
    p.add_argument("out")
    p.add_argument("--workers", type=int, default=max(1, mp.cpu_count() - 1))
    p.add_argument("--every", type=float, default=100.0, help="kimg between measurements")
    a = p.parse_args()
    grid = json.loads(Path(a.grid).read_text())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with mp.get_context("spawn").Pool(a.workers) as pool:
        for r in pool.imap_unordered(run_one, [(k, v, a.every) for k, v in grid.items()]):
            results.append(r)
            with open(out / "grid.jsonl", "a") as f:
                f.write(json.dumps(r) + "\n")
            ok = sorted((x for x in results if "hist" in x and x["hist"]), key=lambda x: -x["hist"][-1][2])
            lines = ["| run | set | final modes | final within 3 std | best within (kimg) | wall s |", "|---" * 6 + "|"]
            for x in ok:
                best = max(x["hist"], key=lambda h: (h[1] == 8, h[2]))
                lines.append(
                    f"| {x['name']} | {json.dumps(x['set'])} | {x['hist'][-1][1]} | {x['hist'][-1][2]:.3f} "
                    f"| {best[1]}/8 {best[2]:.3f} ({best[0]}) | {x['wall_s']} |"
                )
            lines += [f"- {x['name']}: {x['error']}" for x in results if "error" in x]
            (out / "summary.md").write_text("\n".join(lines) + "\n")
            print(r["name"], r.get("hist", r.get("error"))[-3:] if "hist" in r else r.get("error"), flush=True)


if __name__ == "__main__":
    main()
