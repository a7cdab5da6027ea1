"""Why the one-step MNIST student's Inception FID trails its teacher's: the near-black background.

MNIST's background is exactly -1 (82 % of the test pixels are below -0.99). The converged student leaves a faint
noise there (about 55 % below -0.99, std 0.016 on the near-black pixels), flat from 40k to 300k images. The MNIST
feature net ignores it; Inception, reading the image upsampled to 299 x 299, does not. Three probes:

    python bench/tuning/background_probe.py stats [GEN.safetensors | teacher | real] ...  # background statistics
    python bench/tuning/background_probe.py snap [--n 500]            # Inception FID, raw and background-snapped
    python bench/tuning/background_probe.py finetune NAME --from CKPT.pt [--kimg 10] [--set key=value ...]

`stats`: on n samples (seed 0) the fraction of pixels below -0.99, and the mean and std of the near-black pixels
(< -0.9). `snap`: Inception FID (n against n test images) of the shipped student and the shipped teacher (Heun,
35 evaluations), each raw and with every pixel below -0.95 set to -1: a diagnosis, never a way to report a
number. `finetune`: the networks of a distillation checkpoint continued for --kimg under the `mnist` preset with
reverse KL, no GAN term, constant lr 1e-5 / 2e-5 (the cosine's end value), EMA half-life 2 kimg, and the
overrides; it appends background statistics and the MNIST-feature FID (n = 2000) of its EMA and raw generator
to OUT/results.jsonl. Numbers: bench/tuning/results/student_background/README.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dibregman import checkpoint as ckpt
from dibregman.config import parse_set
from dibregman.evaluate import evaluate_samples
from dibregman.generators import generate, load_generator
from dibregman.loop import Trainer
from dibregman.presets import from_preset
from dibregman.sample import sample_teacher
from dibregman.teachers import load_teacher

REFERENCE = "mnist:data/mnist:test"
STUDENT = "src/dibregman/assets/mnist_student.safetensors"
TEACHER = "edm:assets/mnist_teacher.safetensors"


def samples(spec: str, n: int, seed: int = 0) -> torch.Tensor:
    """n images [-1, 1] of a generator file, the teacher (Heun, 35 evaluations) or the test set ("real")."""
    if spec == "real":
        from dibregman.data import load_dataset

        x, _ = load_dataset(REFERENCE.rpartition(":")[0], "test")
        return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]].float()
    if spec == "teacher":
        return sample_teacher(load_teacher(TEACHER), n, num_steps=18, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return generate(load_generator(spec)[0], n, seed=seed)


def background(x: torch.Tensor) -> dict:
    x = x.float().clamp(-1, 1)
    dark = x[x < -0.9]
    return {
        "frac_below_-0.99": round((x < -0.99).float().mean().item(), 4),
        "dark_mean": round(dark.mean().item(), 5),
        "dark_std": round(dark.std().item(), 5),
    }


def snapped(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x < -0.95, torch.full_like(x, -1.0), x)


def cmd_stats(args) -> None:
    for spec in args.specs:
        print(json.dumps({"samples": spec, "n": args.n, **background(samples(spec, args.n))}), flush=True)


def cmd_snap(args) -> None:
    out = {}
    for name, spec in (("student", STUDENT), ("teacher", "teacher")):
        x = samples(spec, args.n)
        for tag, y in ((name, x), (f"{name}_snapped", snapped(x))):
            r = evaluate_samples(y, REFERENCE, feature_net="inception", num_reference=args.n, metrics=("fid",))
            out[tag] = round(r["fid"], 2)
            print(tag, out[tag], flush=True)
    print(json.dumps({"inception_fid": out, "n": args.n, "n_reference": args.n}))


def cmd_finetune(args) -> None:
    pairs = {
        "divergence.name": "kl", "loss.gan_weight": 0, "optim.gen_lr": 1e-5, "optim.fake_lr": 2e-5,
        "optim.lr_schedule": "constant", "optim.ema_halflife_kimg": 2.0, "run.total_kimg": args.kimg,
        "run.threads": 1, "run.device": "cpu", "run.ckpt_every_kimg": args.kimg, "run.sample_every_kimg": 0.0,
        "run.tensorboard": False,
        **parse_set(args.set),
    }  # fmt: skip
    tr = Trainer(from_preset("mnist", pairs), args.out / args.name)
    if tr.state.step == 0:  # a fresh run starts from the checkpoint's networks (optimisers fresh)
        st = ckpt.load(args.start)  # verified against its checksum, no code executed
        for key, net in (("generator", tr.m.generator), ("ema", tr.ema), ("fake", tr.m.fake), ("disc", tr.m.disc)):
            net.load_state_dict(st[key])
    t0 = time.time()
    tr.train()
    res = {"name": args.name, "from": str(args.start), "overrides": pairs, "train_sec": round(time.time() - t0)}
    for which, net in (("ema", tr.ema), ("raw", tr.m.generator)):
        with torch.no_grad():
            x = generate(net, 2000, seed=0)
        fid = evaluate_samples(x, REFERENCE, feature_net="mnist", metrics=("fid",))["fid"]
        res[which] = {**background(x), "fid_mnist_2000": round(fid, 2)}
    print(json.dumps(res), flush=True)
    with open(args.out / "results.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stats", help="background statistics of generator files / teacher / real")
    s.add_argument("specs", nargs="+")
    s.add_argument("--n", type=int, default=500)
    s = sub.add_parser("snap", help="Inception FID of student and teacher, raw and background-snapped")
    s.add_argument("--n", type=int, default=500)
    s = sub.add_parser("finetune", help="continue a checkpoint's networks under overrides")
    s.add_argument("name")
    s.add_argument("--from", dest="start", type=Path, required=True)
    s.add_argument("--kimg", type=float, default=10.0)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--out", type=Path, default=Path("runs/background_probe"))
    args = p.parse_args()
    torch.set_num_threads(1)
    {"stats": cmd_stats, "snap": cmd_snap, "finetune": cmd_finetune}[args.cmd](args)


if __name__ == "__main__":
    main()
