"""What the Bregman weights do to the generator's gradient: its direction and its noise, objective by objective,
at one checkpoint of a distillation run.

    python bench/grad_noise.py CKPT [CKPT ...] [--batches 32] [--objectives rkl,sba(lam=5),...] [--out DIR]

For each checkpoint (any run's `ckpt-*.pt`; the run's generator, fake score and discriminator as they were
there), the same K fresh generator batches (the run's batch size, draws of steps 10^7 + k, never seen in
training) go through the engine's own generator step (`DiBregman.generator_round`: Eq. 4 with the run's weighting,
normalisation and clip) once per objective. Only the weights differ between objectives, so the comparison is
paired. Per objective, with g_k the flattened generator gradient of batch k and g the mean over batches:

- `noise` = E ||g_k - g||^2 (the trace of one batch's gradient covariance) and `signal` = ||E g||^2, estimated
  without bias as <mean of the even batches, mean of the odd ones>;
- `rel_noise` = noise / signal, and `batch_equiv` = reverse KL's rel_noise / this one's: the fraction of a
  reverse-KL batch whose gradient would be as noisy relative to its signal (1 for reverse KL itself);
- `cos_rkl`: the cosine between this objective's mean gradient and reverse KL's, from independent halves
  (<a_even, b_odd> + <a_odd, b_even>) / 2 over sqrt(<a_even, a_odd> <b_even, b_odd>), so noise does not shrink it;
- the weights' ESS / batch and max, as training logs them.

Writes `<out>/grad_noise.json` and `grad_noise.md` (default bench/results, where `verdict.py` reads the JSON for
its "why" lines; `--append` adds to the checkpoints already there). Nothing is trained and the checkpoint is only
read (it is copied into a temporary run folder).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import sweeprun  # noqa: E402
from dibregman import checkpoint, divergences  # noqa: E402
from dibregman.build import objective  # noqa: E402
from dibregman.config import DistillConfig, override, parse_set  # noqa: E402
from dibregman.draws import draw_batch  # noqa: E402
from dibregman.loop import Trainer  # noqa: E402

NAME = "grad_noise"
TITLE = "The generator's gradient under each objective's weights: direction and noise"
NOTE = (
    "Same batches for every objective (paired). noise / signal = E||g_k - g||^2 / ||E g||^2 for one batch; "
    "reverse-KL batch equivalent = reverse KL's noise / signal over this one's (0.5: as noisy as reverse KL with half "
    "the batch); cos to reverse KL from independent halves of the batches (an estimate: it can exceed 1 by its error)."
)
DRAW_STEP = 10**7  # far past any training step: batches the run never drew
DEFAULT_OBJECTIVES = "rkl,sba(lam=1),sba(lam=3),sba(lam=5),sba(lam=10),lr (= js),fkl"


def objectives(text: str) -> list[tuple[str, str, dict]]:
    specs = sweeprun.select(list(sweeprun.FIGURE4), text)
    if specs[0][0] != "rkl":
        specs = [s for s in sweeprun.FIGURE4 if s[0] == "rkl"] + [s for s in specs if s[0] != "rkl"]
    return specs  # reverse KL first: every ratio is taken against it


def trainer_at(ckpt: Path, tmp: Path, threads: int) -> Trainer:
    """A Trainer holding `ckpt`'s networks, built in a temporary copy of the run folder."""
    state = checkpoint.peek(ckpt)  # the config only: tensors stay memory-mapped, the Trainer verifies the file
    if not isinstance(state, dict) or "config" not in state:
        raise ValueError(f"{ckpt} is not a readable dibregman checkpoint")
    cfg = DistillConfig.from_dict(state["config"])
    cfg = override(cfg, {"run.device": "cpu", "run.threads": threads} if threads else {"run.device": "cpu"})
    tmp.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ckpt, tmp / ckpt.name)
    return Trainer(cfg, tmp)


def flat_grad(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]).double()


def measure(tr: Trainer, specs: list[tuple[str, str, dict]], batches: int, sets: dict | None = None) -> dict:
    """Per objective label: noise, signal, rel_noise, batch_equiv, cos_rkl, ess_frac, weight_max (see the module
    docstring). `sets`: divergence.* keys applied to every objective's weights (the networks stay the run's). A
    regression term, where the run has one, draws its pairs by the checkpoint's step: the same in every batch, so
    it adds no noise here (the same for every objective)."""
    cfg, B = tr.cfg, tr.cfg.optim.batch_size
    kimg = tr.state.num_images / 1000
    gan_w = cfg.loss.gan_weight if kimg >= cfg.loss.gan_warmup_kimg else 0.0
    objs = {}
    for label, name, params in specs:
        obj = {"divergence.name": name, **{f"divergence.{k}": v for k, v in params.items()}}
        objs[label] = objective(override(cfg, {**(sets or {}), **obj}))
    sums = {lab: [None, None] for lab in objs}  # per objective: sum of g over even / odd batches
    sq = dict.fromkeys(objs, 0.0)  # sum of ||g_k||^2
    ess = {lab: [] for lab in objs}
    wmax = dict.fromkeys(objs, 0.0)
    for k in range(batches):
        b, _ = draw_batch(cfg, tr.m, DRAW_STEP + k, 0, B, tr.device, tr.sigma_range, real=False)
        for lab, (div, stab) in objs.items():
            tr.div, tr.stab = div, stab
            tr.opt_g.zero_grad(set_to_none=True)
            loss, st = tr.method.generator_round(b, gan_w, norm=B, rnd=0, n=B)
            loss.backward()
            g = flat_grad(tr.gen_params)
            half = sums[lab]
            half[k % 2] = g if half[k % 2] is None else half[k % 2] + g
            sq[lab] += float(g @ g)
            ess[lab].append(divergences.ess_fraction(st["weight"]))
            wmax[lab] = max(wmax[lab], float(st["weight"].max()))
    for p in tr.critic_params:
        p.grad = None
    n_even, n_odd = (batches + 1) // 2, batches // 2
    out = {}
    for lab in objs:
        even, odd = sums[lab][0] / n_even, sums[lab][1] / n_odd
        mean = (sums[lab][0] + sums[lab][1]) / batches
        noise = (sq[lab] - batches * float(mean @ mean)) / (batches - 1)
        signal = float(even @ odd)
        out[lab] = {"noise": noise, "signal": signal, "rel_noise": noise / signal if signal > 0 else math.inf}
        out[lab] |= {"ess_frac": sum(ess[lab]) / batches, "weight_max": wmax[lab], "_halves": (even, odd)}
    ref = out["rkl"]
    for r in out.values():
        r["batch_equiv"] = ref["rel_noise"] / r["rel_noise"] if r["rel_noise"] > 0 else math.nan
        (a0, a1), (b0, b1) = r["_halves"], ref["_halves"]
        cross = (float(a0 @ b1) + float(a1 @ b0)) / 2
        r["cos_rkl"] = cross / math.sqrt(r["signal"] * ref["signal"]) if r["signal"] > 0 < ref["signal"] else math.nan
    for r in out.values():
        del r["_halves"]
    return out


def markdown(data: dict) -> str:
    lines = [f"# {data['title']}", "", data["note"], ""]
    for c in data["checkpoints"]:
        sets = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in (c.get("set") or {}).items())
        with_sets = f", weights with {sets}" if sets else ""
        lines += [f"## {c['run']} at {c['kimg']:g} kimg ({c['batches']} batches of {c['batch']}{with_sets})", ""]
        lines += [common.header_line(c), ""]
        head = ["objective", "ESS / batch", "weight max", "noise / signal", "reverse-KL batch equivalent"]
        lines += ["| " + " | ".join([*head, "cos to reverse KL"]) + " |", "|---" * 6 + "|"]
        for lab, r in c["objectives"].items():
            cells = [f"{r['ess_frac']:.3f}", f"{r['weight_max']:.2f}"]
            if r["signal"] > 0 < c["objectives"]["rkl"]["signal"]:
                cells += [f"{r['rel_noise']:.3g}", f"{r['batch_equiv']:.2f}", f"{r['cos_rkl']:.3f}"]
            else:  # the unbiased ||E g||^2 came out <= 0: the mean gradient is not resolved from the noise
                cells += ["unresolved (more --batches)"] * 3
            lines.append(f"| {lab} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpts", nargs="+", help="checkpoint files (ckpt-*.pt) of distillation runs")
    p.add_argument("--batches", type=int, default=32, help="fresh generator batches per checkpoint (>= 4)")
    p.add_argument("--objectives", default=DEFAULT_OBJECTIVES, help="Figure-4 labels, comma-separated")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", default=str(common.RESULTS), help="folder for grad_noise.json / .md (bench/results)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="divergence.* key for every objective's weights, e.g. divergence.weight_clip=2")  # fmt: skip
    p.add_argument("--append", action="store_true", help="add to the checkpoints already in <out>/grad_noise.json")
    args = p.parse_args(argv)
    command = " ".join(["bench/grad_noise.py", *(sys.argv[1:] if argv is None else argv)])
    if args.batches < 4:
        raise ValueError(f"--batches must be >= 4 (two halves of >= 2 batches), got {args.batches}")
    specs = objectives(args.objectives)
    sets = parse_set(args.set)
    if any(not k.startswith("divergence.") for k in sets):
        raise ValueError(f"--set takes divergence.* keys only (the weights; the networks are the run's): {list(sets)}")
    ckpts = [Path(c).resolve() for c in args.ckpts]
    for c in ckpts:
        if not c.is_file():
            raise FileNotFoundError(f"{c} is not a checkpoint file")
    out = Path(args.out).resolve()
    common.setup(argparse.Namespace(out=out, work=out, threads=args.threads, device="cpu"))
    machine = common.machine(torch.device("cpu"))
    rows = []
    for c in ckpts:
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            tr = trainer_at(c, Path(tmp) / c.parent.name, args.threads)
            res = measure(tr, specs, args.batches, sets)
            kimg, batch = tr.state.num_images / 1000, tr.cfg.optim.batch_size
        rows.append({"run": c.parent.name, "ckpt": str(c), "kimg": kimg, "batch": batch, "batches": args.batches})
        rows[-1]["set"] = sets
        when = {"date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)), "git_commit": common.git_commit()}
        rows[-1] |= {"objectives": res, "wall_sec": time.time() - t0, "command": command, "machine": machine, **when}
        print(f"[grad_noise] {c.parent.name} at {kimg:g} kimg: {time.time() - t0:.0f} s")
    path = out / f"{NAME}.json"
    if args.append and path.is_file():  # keep the checkpoints measured before, unless measured again now
        again = {(r["ckpt"], json.dumps(r["set"], sort_keys=True)) for r in rows}
        old = json.loads(path.read_text())["checkpoints"]
        rows = [r for r in old if (r["ckpt"], json.dumps(r.get("set", {}), sort_keys=True)) not in again] + rows
    data = {"title": TITLE, "note": NOTE, "checkpoints": rows}
    common.write_json(path, data)
    (out / f"{NAME}.md").write_text(markdown(data))
    print(markdown(data))
    return data


if __name__ == "__main__":
    main()
