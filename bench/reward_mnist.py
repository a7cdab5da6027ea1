"""Reward-tilted distillation of the MNIST teacher (Appendix G): R(x) = p(y = digit | x) under the shipped
classifier, so p R / Z = p(x | y = digit) when the classifier is calibrated: the student should draw mostly
that digit (class share) while staying on the data manifold (FID against that digit's real test images).

    OMP_NUM_THREADS=2 python bench/reward_mnist.py --digit 3 --kimg 40 --baseline     # full measurement
    python bench/reward_mnist.py --quick                                                # seconds: smoke test

Reports, each with its sample count: the student's class histogram, share of `digit` and mean p(digit | x);
MNIST-feature FID/KID/precision/recall against the real test images of `digit` and against the whole test
set; the same for the teacher (Heun samples: its share of `digit` is Z = E_p[R]) and, with --baseline, for a
plain Di-Bregman student; floors from real training images of `digit` at the same n.  FID at small n is
biased upward: compare only numbers with the same n and reference.  Writes `<out>.json` and `<out>.md`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dibregman.config import override
from dibregman.data import load_dataset
from dibregman.evaluate import evaluate_samples
from dibregman.generators import generate, load_generator
from dibregman.loop import distill
from dibregman.metrics.features import MnistFeatures
from dibregman.presets import get_preset
from dibregman.sample import sample_teacher


def class_stats(clf: MnistFeatures, x: torch.Tensor, digit: int) -> dict:
    """Classifier histogram, share of `digit` (argmax) and mean p(digit | x) over the samples."""
    with torch.no_grad():
        probs = torch.cat([clf.logits(b).softmax(-1) for b in x.split(256)])
    hist = torch.bincount(probs.argmax(-1), minlength=probs.shape[1]).double() / len(x)
    return {"n": len(x), "share": float(hist[digit]), "mean_p": float(probs[:, digit].mean()),
            "histogram": [round(v, 4) for v in hist.tolist()]}  # fmt: skip


def fid_stats(x: torch.Tensor, ref: torch.Tensor, clf: MnistFeatures) -> dict:
    r = evaluate_samples(x, ref, feature_net=clf, metrics=("fid", "kid", "pr"), cache_dir=False,
                         kid_subset_size=min(1000, len(x), len(ref)))  # fmt: skip
    return {k: r[k] for k in ("fid", "kid", "precision", "recall", "n_samples", "n_reference") if k in r}


def train(args, reward: bool) -> tuple[str, float]:
    name, _, lam = args.divergence.partition(":")
    pairs = {
        "model.teacher": args.teacher, "model.real": args.data, "divergence.name": name,
        "optim.batch_size": args.batch, "run.total_kimg": args.kimg, "run.seed": args.seed,
        "run.log_every_kimg": max(args.kimg / 40, args.batch / 1000), "run.tensorboard": False,
        "run.ckpt_every_kimg": max(args.kimg / 4, 0.001), "run.sample_every_kimg": max(args.kimg / 4, 0.001),
    }  # fmt: skip
    if lam:
        pairs["divergence.lam"] = float(lam)
    if reward:
        pairs.update({"reward.name": "mnist_class", "reward.digit": args.digit, "reward.target": args.target,
                      "reward.classifier": args.classifier,
                      "reward.z_init_samples": args.z_init})  # fmt: skip
    pairs.update(dict(kv.split("=", 1) for kv in args.set))
    cfg = override(get_preset("mnist"), pairs)
    t0 = time.time()
    out = distill(cfg, Path(args.runs) / ("reward" if reward else "plain"))
    return out["export"] or str(Path(args.runs) / ("reward" if reward else "plain")), time.time() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="edm:assets/mnist_teacher.safetensors")
    p.add_argument("--data", default="mnist:data/mnist", help="real side of the discriminator and references")
    p.add_argument("--classifier", default="", help="classifier weights (empty: the shipped asset)")
    p.add_argument("--digit", type=int, default=3)
    p.add_argument("--divergence", default="kl", help="NAME or sba:LAMBDA")
    p.add_argument("--target", default="denoised", help="reward.target: denoised | noisy")
    p.add_argument("--kimg", type=float, default=40.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--z-init", type=int, default=4096, help="real samples averaged into Z before step 0")
    p.add_argument("--num-eval", type=int, default=2000, help="one-step samples per student evaluation")
    p.add_argument("--num-teacher", type=int, default=500, help="teacher Heun samples (share = Z estimate)")
    p.add_argument("--teacher-steps", type=int, default=18, help="Heun steps (2n - 1 evaluations)")
    p.add_argument("--baseline", action="store_true", help="also distil without reward (same settings)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, seconds)")
    p.add_argument("--runs", default="runs/bench-reward-mnist", help="run folders (auto-resume)")
    p.add_argument("--out", default="bench/results/reward_mnist", help="output stem (.json and .md)")
    args = p.parse_args()
    if args.quick:
        args.kimg, args.batch, args.z_init, args.num_eval, args.num_teacher, args.teacher_steps = (
            0.016, 8, 64, 64, 16, 2)  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    cmd = "python " + " ".join(sys.argv)
    clf = MnistFeatures(args.classifier or None)
    test_x, test_y = load_dataset(args.data, "test")
    train_x, train_y = load_dataset(args.data, "train")
    ref_k = test_x[test_y == args.digit]
    g = torch.Generator().manual_seed(args.seed)
    real_k = train_x[train_y == args.digit]
    real_k = real_k[torch.randperm(len(real_k), generator=g)[: args.num_eval]]
    res = {"command": cmd, "args": vars(args), "classifier": clf.record.get("test_accuracy")}
    res["real_digit_train"] = {
        **class_stats(clf, real_k, args.digit),
        "fid_digit": fid_stats(real_k, ref_k, clf),
    }

    runs = [("reward", True)] + ([("plain", False)] if args.baseline else [])
    for key, with_reward in runs:
        export, wall = train(args, with_reward)
        gen, meta = load_generator(export)
        x = generate(gen, args.num_eval, seed=args.seed + 1)
        res[key] = {"wall_sec": wall, "kimg": meta["num_images"] / 1000, **class_stats(clf, x, args.digit),
                    "fid_digit": fid_stats(x, ref_k, clf), "fid_all": fid_stats(x, test_x, clf)}  # fmt: skip
    from dibregman.teachers import load_teacher

    teacher = load_teacher(args.teacher).eval()
    xt = sample_teacher(teacher, args.num_teacher, num_steps=args.teacher_steps, generator=g)
    res["teacher"] = {**class_stats(clf, xt, args.digit), "fid_all": fid_stats(xt, test_x, clf)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    out.with_suffix(".md").write_text(markdown(res, args))
    print(markdown(res, args))


def markdown(res: dict, args) -> str:
    rows = [("real train digit", res["real_digit_train"])] + [
        (k, res[k]) for k in ("reward", "plain", "teacher") if k in res
    ]
    lines = [f"# Reward-tilted MNIST distillation: R = p(y = {args.digit} | x)", "",
             f"Command: `{res['command']}`", "",
             f"{args.divergence}, target {args.target}, {args.kimg:g} kimg at batch {args.batch}; "
             f"classifier test accuracy {res['classifier']}.", "",
             "| samples | n | share of digit | mean p(digit) | FID vs digit (n_ref) | FID vs all | precision "
             "| recall |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in rows:
        fd, fa = r.get("fid_digit", {}), r.get("fid_all", {})
        f_d = f"{fd['fid']:.2f} ({fd['n_reference']})" if fd else "-"
        f_a = f"{fa['fid']:.2f}" if fa else "-"
        pr = fd or fa
        prec, rec = pr.get("precision", float("nan")), pr.get("recall", float("nan"))
        lines.append(
            f"| {name} | {r['n']} | {r['share']:.3f} | {r['mean_p']:.3f} | {f_d} | {f_a} | {prec:.3f} | {rec:.3f} |"
        )
    lines += ["", "Class histograms: " + "; ".join(f"{n}: {r['histogram']}" for n, r in rows), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
