"""Resumable sweep runs, shared by `mnist_sweep.py` and `gmm_sweep.py`.

Every (setting, seed) is its own run folder under `--work`: the Trainer's checkpoints, `config.json` and
`log.jsonl` (in-loop metrics are logged there by hooks, so `dibregman compare` reads the runs too) and, once the
run is trained and evaluated, `result.json` (config, evaluation sizes, final metrics). Running the same sweep
command again

- skips a run whose `result.json` was written by the same config and evaluation sizes,
- resumes an unfinished run from its newest checkpoint (the Trainer's resume is bitwise exact),
- records a run that diverged (`run.max_bad_steps` non-finite steps in a row) as `failed` and goes on; the
  summaries over seeds leave it out and say so,
- skips a run another process holds (the Trainer's run lock): two processes given disjoint `--only` subsets
  may share one work folder; every shared file (result JSON, figures) is written atomically through a temp file of
  its own process, and the aggregate is rebuilt from all finished runs, so the last process to finish sees them all.

Objectives whose log-weights are bitwise equal (SBA(lambda = -1) and forward KL: both e^l) train bitwise equal
runs; `identical_weights` finds them, and a sweep trains one and reports it under both names.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from dibregman import divergences
from dibregman.config_help import config_diff

RESULT = "result.json"
FIGURE4 = (  # (label, divergence, parameters): the paper's Figure 4 (reverse KL, SBA(lambda)), LR (= JS), forward KL
    ("rkl", "rkl", {}),
    ("sba(lam=-1)", "sba", {"lam": -1.0}),
    ("sba(lam=1)", "sba", {"lam": 1.0}),
    ("sba(lam=3)", "sba", {"lam": 3.0}),
    ("sba(lam=5)", "sba", {"lam": 5.0}),
    ("sba(lam=10)", "sba", {"lam": 10.0}),
    ("lr (= js)", "lr", {}),
    ("fkl", "fkl", {}),
)
PLACEBOS = (  # controls for SBA(5) (issue: signal or variance?): the same weight spread in the opposite direction,
    # and SBA(5)'s own weights assigned to random samples within each sigma bin (divergence.shuffle_weights)
    ("sba(lam=-5)", "sba", {"lam": -5.0}),
    ("sba(lam=5) shuffled", "sba", {"lam": 5.0, "shuffle_weights": True}),
)
# config keys a finished run may differ in and still count (where and how it ran, not what it computed)
REPORTING_KEYS = {
    "run.threads",
    "run.device",
    "run.tensorboard",
    "run.keep_ckpts",
    "run.ckpt_every_kimg",
    "run.sample_every_kimg",
    "run.max_bad_steps",
}
Spec = tuple[str, str, dict]  # (label, divergence name, its parameters)


def slug(label: str) -> str:
    """A label as a folder name: `sba(lam=-1)` -> `sba_lam_-1`."""
    out = "".join(c if c.isalnum() or c in "-." else "_" for c in label)
    return "_".join(filter(None, out.split("_")))


def run_folder(work: Path, sizes: dict, label: str, seed: int) -> Path:
    """`<work>/<kimg>kimg-b<batch>/<label>-s<seed>`: a run of another length is another run (a cosine schedule
    cannot be stretched), so sweeps of several lengths share one work folder and its teacher row."""
    return Path(work) / f"{sizes['kimg']:g}kimg-b{sizes['batch']}" / f"{slug(label)}-s{seed}"


def select(specs: list[Spec], only: str) -> list[Spec]:
    """The specs named in the comma-separated `only` (labels or divergence names); all when empty."""
    keep = [x.strip() for x in only.split(",") if x.strip()]
    known = {s[0] for s in specs} | {s[1] for s in specs}
    unknown = [x for x in keep if x not in known]
    if unknown:
        raise ValueError(f"{unknown} not among the objectives {[s[0] for s in specs]} (see --objectives)")
    return [s for s in specs if not keep or s[0] in keep or s[1] in keep]


def divergence_of(name: str, params: dict):
    """The divergence of a spec: its parameters without the stabiliser's options (`shuffle_weights`)."""
    return divergences.get(name, **{k: v for k, v in params.items() if k in ("lam", "alpha")})


def formula(name: str, params: dict) -> str:
    """The weight of a spec as written in the reports (a shuffled placebo says so)."""
    f = divergence_of(name, params).formula
    return f"{f}, shuffled within sigma bins" if params.get("shuffle_weights") else f


def identical_weights(specs: list[Spec]) -> dict[str, str]:
    """{label: label of the first spec with a bitwise-equal log-weight} for the specs that repeat an earlier one.

    Equal log-weights on a dense logit grid (float32 and float64, clamped range and beyond) mean equal weights
    everywhere for these closed forms, hence bitwise equal training (tests/test_sweeps.py checks one pair)."""
    noise = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grid64 = torch.cat([torch.linspace(-30, 30, 6001, dtype=torch.float64), 5 * noise])
    seen: list[tuple[str, list[torch.Tensor]]] = []
    alias = {}
    for label, name, params in specs:
        if params.get("shuffle_weights"):  # random assignment: equal to no other spec
            continue
        div = divergence_of(name, params)
        lw = [div.log_weight(grid64), div.log_weight(grid64.float())]
        first = next((lab for lab, ref in seen if all(torch.equal(a, b) for a, b in zip(lw, ref, strict=True))), None)
        if first is None:
            seen.append((label, lw))
        else:
            alias[label] = first
    return alias


def read_log(run_dir: Path) -> list[dict]:
    """The records of `<run_dir>/log.jsonl` (a line cut by a kill is skipped)."""
    path = Path(run_dir) / "log.jsonl"
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def series(logs: list[dict], key: str) -> list[tuple[float, float]]:
    """[(kimg, value)] of one logged key."""
    return [(float(r["kimg"]), float(r[key])) for r in logs if isinstance(r.get(key), int | float) and "kimg" in r]


def weight_stats(logs: list[dict]) -> dict:
    """Last logged value and mean over the second half of training of the Bregman weight's ESS fraction, its max
    and the discriminator's accuracy (None where never logged)."""
    from seedstats import tail_mean

    out = {}
    for name, key in (("ess_frac", "weight/ess_frac"), ("weight_max", "weight/max"), ("disc_acc", "disc/disc_acc")):
        s = series(logs, key)
        out[f"{name}_last"] = s[-1][1] if s else None
        out[f"{name}_half"] = tail_mean(s)
    return out


def train_seconds(logs: list[dict]) -> float:
    """Optimisation time summed over every (resumed) segment of a run: mean step time x steps per log interval
    (no evaluation, no checkpoint writing)."""
    total, prev = 0.0, 0
    for r in logs:
        if "time/step_sec" in r:
            total += r["time/step_sec"] * (r["step"] - prev)
        prev = r.get("step", prev)
    return total


def state_of(trainer) -> dict:
    """`Trainer.train()`'s counters for a run that stopped early (e.g. `TooManyBadSteps`: its weights are the last
    healthy ones, so it is still evaluated, and its result is marked `failed`)."""
    s = trainer.state
    return {"num_images": s.num_images, "steps": s.step, "bad_steps": s.bad_steps}


def train(make_trainer, tag: str, prepare=None, until_images: int | None = None):
    """Build a run's Trainer with `make_trainer()`, call `prepare(trainer)` (e.g. log the initial generator), train
    (to `until_images` of the run's schedule only, when given: the steps up to it, then stop after that step's
    checkpoint where it crosses one; a later call without it continues the same run).

    Returns `(trainer, counters, failed)`: `counters` as `state_of`, `failed` None, or the reason when the run
    diverged (`runguard.TooManyBadSteps`: its weights are the last healthy ones, so the sweep still evaluates it
    and marks it failed). Returns None when another process holds the run (`runguard.RunLocked`): skipped."""
    from dibregman import runguard

    try:
        trainer = make_trainer()
        if prepare is not None:
            prepare(trainer)
        steps = None
        if until_images is not None:
            steps = max(0, math.ceil((until_images - trainer.state.num_images) / trainer.cfg.optim.batch_size))
        trainer.train(max_steps=steps)
        return trainer, state_of(trainer), None
    except runguard.RunLocked as e:
        print(f"{tag}: skipped, {e}", flush=True)
        return None
    except (runguard.TooManyBadSteps, runguard.StopRun) as e:  # diverged: recorded as such (a rerun skips it)
        return trainer, state_of(trainer), str(e)


DIVERGED_FACTOR, DIVERGED_PATIENCE = 2.0, 3


def diverged(curve: list[tuple[float, float]]) -> str | None:
    """The early-stopping rule of `--stop-diverged`: why the run diverged, or None. `curve` is (kimg, in-loop FID);
    the run diverged when each of its last DIVERGED_PATIENCE FIDs exceeds DIVERGED_FACTOR times the best FID before
    them (the initial generator's, at kimg 0, not counted). Checked on every committed MNIST curve: the healthy runs'
    worst FID was at most 1.41 times their best so far; the paper design's SBA(5) seed 0 met the rule at 45 kimg."""
    fids = [v for k, v in curve if k > 0]
    if len(fids) <= DIVERGED_PATIENCE:
        return None
    best, tail = min(fids[:-DIVERGED_PATIENCE]), fids[-DIVERGED_PATIENCE:]
    if all(v > DIVERGED_FACTOR * best for v in tail):
        shown = ", ".join(f"{v:.1f}" for v in tail)
        return (
            f"diverged: in-loop FID {shown} at the last {len(tail)} evaluations, each above {DIVERGED_FACTOR:g}x "
            f"its best {best:.1f} before them"
        )
    return None


def record(spec: Spec, seed: int, cfg, eval_sizes: dict, run_dir: Path, counters: dict, failed: str | None) -> dict:
    """The fields every sweep's `result.json` shares: what ran (objective, seed, config, evaluation sizes, folder),
    how far it got, and `failed` where it diverged."""
    label, name, params = spec
    return {
        "label": label,
        "seed": seed,
        "divergence": name,
        "params": params,
        "weight": formula(name, params),
        "config": cfg.to_dict(),
        "eval_sizes": eval_sizes,
        "run_dir": str(run_dir),
        "images_seen": counters["num_images"],
        "steps": counters["steps"],
        "bad_steps": counters["bad_steps"],
        **({"failed": failed} if failed else {}),
    }


def read_result(run_dir: Path) -> dict | None:
    path = Path(run_dir) / RESULT
    return json.loads(path.read_text()) if path.is_file() else None


def result_problem(result: dict | None, cfg, eval_sizes: dict, teacher_sha: str | None = None) -> str | None:
    """Why `result` does not answer this config (and teacher file) at these evaluation sizes (None when it does)."""
    if result is None:
        return "not finished"
    diff = config_diff(saved_config(result["config"]), cfg.to_dict()) - REPORTING_KEYS
    if diff:
        return f"finished with another config (differs in {sorted(diff)})"
    if teacher_sha and result.get("teacher_sha256", teacher_sha) != teacher_sha:
        return f"trained from another teacher file (sha256 {result['teacher_sha256']}, now {teacher_sha})"
    if result.get("eval_sizes") != eval_sizes:
        return f"evaluated at other sizes ({result.get('eval_sizes')} != {eval_sizes})"
    return None


def saved_config(config: dict) -> dict:
    """A result's config with the keys added since it was written at their defaults (a key added later, e.g.
    model.student_steps, does not make a finished run another config); as saved when it no longer parses."""
    from dibregman.config import DistillConfig

    try:
        return DistillConfig.from_dict(config).to_dict()
    except (ValueError, TypeError):
        return config


def check_teacher_file(run_dir: Path, sha: str | None) -> None:
    """A run continues only from the teacher file it started with (a teacher still in training rewrites its
    export under the same name): `<run_dir>/teacher_sha256` holds that file's hash, written at the start; another
    hash now is a ValueError."""
    if not sha:
        return
    marker = Path(run_dir) / "teacher_sha256"
    if marker.is_file() and marker.read_text().strip() != sha:
        raise ValueError(
            f"{run_dir} started from a teacher file with sha256 {marker.read_text().strip()}, the file now has "
            f"{sha}: pass the teacher it started with (a frozen copy), or another --work"
        )
    if not marker.is_file():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{sha}\n")


@torch.no_grad()
def add_inception_full(run_dir: Path, result: dict, n: int, ctx: dict) -> bool:
    """Inception FID of a finished MNIST run's exported student (`<run_dir>/generator.safetensors`) at n samples
    against the whole reference `ctx["reference"]` with `ctx["inception_net"]`: the samples of its final
    MNIST-feature FID (seed 20000 + the run's seed, `mnist_sweep.final_metrics`). Kept in result.json as
    final.inception_full; False (nothing done) where it is there at this n already or the run diverged."""
    if result.get("final", {}).get("inception_full", {}).get("n_samples") == n or result.get("failed"):
        return False
    from common import fid, write_json
    from dibregman.generators import generate, load_generator

    gen, _ = load_generator(Path(run_dir) / "generator.safetensors", ctx["device"])
    x = generate(gen, n, seed=20_000 + result["seed"], device=ctx["device"])
    result["final"]["inception_full"] = fid(x, ctx["reference"], ctx["inception_net"], None, ctx["device"])
    write_json(Path(run_dir) / RESULT, result)
    return True


def save_figure(fig, path: Path) -> Path:
    """`fig.savefig(path)` atomically (a temp file of this process, then a rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    fig.savefig(tmp)
    tmp.replace(path)
    return path


def absolute_spec(spec: str) -> str:
    """A `KIND:PATH` spec whose PATH exists relative to the current folder, made absolute (the bench scripts
    change into the repository root before loading it)."""
    kind, sep, path = spec.partition(":")
    if sep and path and Path(path).exists():
        return f"{kind}:{Path(path).resolve()}"
    return spec


__all__ = [
    "RESULT",
    "slug",
    "run_folder",
    "select",
    "identical_weights",
    "read_log",
    "series",
    "weight_stats",
    "train_seconds",
    "state_of",
    "FIGURE4",
    "PLACEBOS",
    "read_result",
    "result_problem",
    "check_teacher_file",
    "save_figure",
    "absolute_spec",
]
