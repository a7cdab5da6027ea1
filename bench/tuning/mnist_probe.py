"""MNIST tuning runs with FID-versus-images curves of both the EMA and the raw generator (used to find why the
`mnist` preset's training oscillated, and to choose its recipe; cited in config.py).

    python bench/tuning/mnist_probe.py GRID.json OUT_DIR [--every 3] [--n 1000] [--only a,b]

GRID.json maps a run name to its `--set` overrides on the `mnist` preset, e.g.
{"base": {"divergence.name": "kl", "run.total_kimg": 30}, "ge5": {..., "optim.gen_every": 5}}. Runs go one after
the other, one CPU thread each; each finished run appends one JSON line to OUT_DIR/grid.jsonl: overrides, wall
time, and the history [kimg, FID(EMA), FID(raw G), discriminator accuracy, fake DSM loss] with the MNIST feature
net on `--n` samples against the 10k test set. A run already in grid.jsonl is skipped (the grid resumes).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dibregman.config import override
from dibregman.evaluate import evaluate_samples
from dibregman.generators import generate
from dibregman.loop import Trainer
from dibregman.presets import get_preset

REFERENCE = "mnist:data/mnist:test"


def _fid(gen, n: int) -> float:
    x = generate(gen, n, seed=1)
    return round(float(evaluate_samples(x, REFERENCE, feature_net="mnist", metrics=("fid",))["fid"]), 2)


def run_one(name: str, pairs: dict, out: Path, every: float, n: int) -> dict:
    base = {"run.tensorboard": False, "run.sample_every_kimg": 0.0, "run.threads": 1, "run.device": "cpu"}
    cfg = override(get_preset("mnist"), {**base, **pairs})
    ckpt_every = pairs.get("run.ckpt_every_kimg", cfg.run.total_kimg)  # a long run gives its own: it resumes
    cfg = override(cfg, {"run.log_every_kimg": every, "run.ckpt_every_kimg": ckpt_every})
    hist = []

    def hook(trainer, num_images: int) -> dict:
        fe, fr = _fid(trainer.ema, n), _fid(trainer.m.generator, n)
        hist.append([round(num_images / 1000, 2), fe, fr])
        print(f"  {name} {num_images / 1000:.1f} kimg: FID ema {fe} raw {fr}", flush=True)
        return {"fid_ema": fe, "fid_raw": fr}

    t0 = time.time()
    run_dir = out / "runs" / name
    Trainer(cfg, run_dir, hooks=[hook]).train()
    logs = [json.loads(line) for line in open(run_dir / "log.jsonl")]
    for h, rec in zip(hist, logs[-len(hist) :], strict=True):
        h += [round(rec.get("disc/disc_acc", float("nan")), 3), round(rec.get("loss/fake_dsm", float("nan")), 4)]
    return {"name": name, "overrides": pairs, "wall_sec": round(time.time() - t0), "history": hist}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("grid", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--every", type=float, default=3.0, help="FID period, thousands of images")
    p.add_argument("--n", type=int, default=1000, help="samples per FID")
    p.add_argument("--only", default="", help="comma-separated run names")
    args = p.parse_args()
    torch.set_num_threads(1)
    grid = json.loads(args.grid.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    done_file = args.out / "grid.jsonl"
    done = {json.loads(line)["name"] for line in open(done_file)} if done_file.exists() else set()
    names = [s for s in args.only.split(",") if s] or list(grid)
    for name in names:
        if name in done:
            continue
        rec = run_one(name, grid[name], args.out, args.every, args.n)
        with open(done_file, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(name, json.dumps(rec["history"]), flush=True)


if __name__ == "__main__":
    main()
