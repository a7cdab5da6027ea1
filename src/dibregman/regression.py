"""DMD's regression term (Yin et al. 2024, one-step DMD): keep the one-step generator near the teacher's ODE map.

Once per run, `loss.regression_pairs` latents z are drawn from their own seeded stream and the teacher's
deterministic Heun sampler (`loss.regression_steps` intervals, the Karras schedule) solves the probability-flow
ODE from sigma_max z; (z, condition, ODE(z)) are kept in `<run_dir>/regression_pairs.pt`, written like a checkpoint
(atomically, with a checksum), reused on resume, made again with a warning when corrupt, refused when they were made
for another config. Every generator step draws a micro-batch of pair indices from the stream ("regression", step,
round) -- the engine's other draws are untouched -- and adds

    regression_weight * mean_i mean_d (G(z_i) - ODE(z_i))_d^2

to Eq. 4's loss (the mean over dimensions makes the weight independent of resolution; DMD uses LPIPS on images).
Why: the score-difference gradient only acts where the generator already puts mass, so a mode it has dropped
stays dropped; the ODE map carries every mode with its weight, and the pairs point the generator at all of them
(bench/results/gmm_coverage/README.md measures it). Cost: the pairs' sampler calls once, plus one generator forward
and backward on a micro-batch per step.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .draws import generator_for, local_slice
from .sample import sample_teacher

FILE = "regression_pairs.pt"
_CHUNK = 256  # pairs per sampler batch (and per condition embedding: text embeddings of every pair at once
# could outgrow memory)


class Regression:
    """The pairs of one run and the term they give (`loss`)."""

    def __init__(self, z: torch.Tensor, x: torch.Tensor, cond_index: torch.Tensor | None, weight: float, seed: int):
        self.z, self.x, self.cond_index, self.weight, self.seed = z, x, cond_index, weight, seed

    def batch(self, step: int, rnd: int, n: int):
        """This rank's slice of the global micro-batch `rnd` of step `step`: (z, ODE(z), condition indices)."""
        g = generator_for(self.seed, "regression", step, rnd)
        idx = torch.randint(len(self.z), (n,), generator=g)[local_slice(n)]
        c = self.cond_index[idx] if self.cond_index is not None else None
        return self.z[idx], self.x[idx], c

    def loss(self, models, step: int, rnd: int, n: int, norm: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight x the summed per-sample MSE / norm, the per-sample MSE for the log)."""
        z, x, c = self.batch(step, rnd, n)
        cond = models.conditions.embed(c, device) if c is not None else None
        out = models.generator(z.to(device), cond).float()
        mse = (out - x.to(device)).square().flatten(1).mean(1)
        return self.weight * mse.sum() / norm, mse.detach()


def _key(cfg) -> dict:
    """What the pairs depend on: a stored file made under another key is refused."""
    L = cfg.loss
    return {
        "teacher": cfg.model.teacher,
        "seed": cfg.run.seed,
        "pairs": L.regression_pairs,
        "steps": L.regression_steps,
    }


def make_pairs(cfg, models, device) -> dict:
    """Draw the latents (and conditions) from their own stream and solve the teacher's ODE from them
    (`sample_teacher`: Heun on its Karras schedule, `loss.regression_steps` intervals)."""
    L = cfg.loss
    g = generator_for(cfg.run.seed, "regression-pairs")
    z = torch.randn(L.regression_pairs, *models.shape, generator=g)
    cond_index = models.conditions.draw(g, L.regression_pairs) if models.conditions is not None else None
    out = []
    with torch.no_grad():
        for i in range(0, len(z), _CHUNK):
            zc = z[i : i + _CHUNK]
            c = None if cond_index is None else models.conditions.embed(cond_index[i : i + _CHUNK], device)
            x = sample_teacher(
                models.teacher,
                len(zc),
                num_steps=L.regression_steps,
                cond=c,
                shape=models.shape,
                noise=zc,
                batch_size=_CHUNK,
            )
            out.append(x.float().cpu())
    return {"key": _key(cfg), "z": z, "x": torch.cat(out), "cond_index": cond_index}


def build_regression(cfg, models, run_dir: Path, device) -> Regression | None:
    """The Trainer's regression term for `loss.regression_weight` > 0 (None otherwise), pairs loaded or made."""
    L = cfg.loss
    if L.regression_weight <= 0:
        return None
    path = Path(run_dir) / FILE
    data = _stored_pairs(path, cfg) if path.is_file() else None
    if data is None:
        data = make_pairs(cfg, models, device)
        ckpt.save_atomic(data, path)  # checksummed, through a temp file (a stale one is removed on start)
    return Regression(data["z"], data["x"], data["cond_index"], L.regression_weight, cfg.run.seed)


def _stored_pairs(path: Path, cfg) -> dict | None:
    """The verified pairs of `path`; None, with a one-line warning naming the file, for a corrupt or truncated file
    (the pairs are a deterministic function of the config: they are made again); ValueError for another config's."""
    try:
        data = ckpt.load(path, what="regression pairs file")
        if missing := sorted({"key", "z", "x", "cond_index"} - set(data)):
            raise ValueError(f"regression pairs file {path} lacks {missing}")
    except ValueError as e:
        warnings.warn(f"{e}; regenerating it", stacklevel=3)
        return None
    if data["key"] != _key(cfg):
        raise ValueError(
            f"{path} holds pairs made for {data['key']}, this config needs {_key(cfg)}: "
            "delete the file or use another run folder"
        )
    return data


__all__ = ["FILE", "Regression", "build_regression", "make_pairs"]
