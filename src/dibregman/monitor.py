"""Progress bar, JSONL log and TensorBoard scalars of a run (rank 0 only).

Logged every `run.log_every_kimg`: losses, discriminator accuracy/logits, Bregman weight mean/max, effective
sample size ESS = (sum w)^2 / sum w^2 (as a fraction of the batch), per sigma bin the generator step's logit mean,
the discriminator's accuracy and the fake score's weighted DSM loss, img/s, skips.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from . import divergences

SIGMA_BIN_EDGES = (0.0, 0.1, 0.5, 1.0, 2.0, 5.0, 20.0, float("inf"))  # logit statistics per sigma bin


class Monitor:
    def __init__(
        self,
        run_dir: Path,
        cfg=None,  # unused; kept so that Monitor(run_dir, cfg, ...) still reads
        *,
        enabled: bool,
        initial: int,
        total: int,
        tensorboard: bool = False,  # also write TensorBoard scalars (when tensorboard is installed)
        desc: str = "distill",  # progress-bar label
    ):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.values = defaultdict(list)
        self.bins = defaultdict(list)
        self.t_last, self.n_last = time.time(), initial
        self.bar = self.log = self.tb = None
        if not enabled:
            return
        from tqdm import tqdm

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.bar = tqdm(total=total, initial=initial, unit="img", unit_scale=True, desc=desc, smoothing=0.1)
        self.log = open(self.run_dir / "log.jsonl", "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:
                self.tb = None

    def add(self, d: dict) -> None:
        for k, v in d.items():
            self.values[k].append(float(v))

    def add_weights(self, st: dict) -> None:
        w, logits, sigma = st["weight"].detach().float(), st["logits"].detach().float(), st["sigma"].float()
        self.add(
            {
                "weight/mean": w.mean(),
                "weight/max": w.max(),
                "weight/ess_frac": divergences.ess(w) / len(w),
                "logit/mean": logits.mean(),
                "logit/std": logits.std() if len(logits) > 1 else 0.0,
                "gen/score_gap": st["gap"].mean(),
            }
        )
        if "gan" in st:
            self.add({"loss/gen_gan": st["gan"].mean()})
        if "regression" in st:
            self.add({"loss/gen_regression": st["regression"].mean()})
        self.add_by_sigma("logit_by_sigma", logits, sigma)

    def add_by_sigma(self, prefix: str, values: torch.Tensor, sigma: torch.Tensor) -> None:
        """Per-sample values [N] averaged per sigma bin (SIGMA_BIN_EDGES), logged as `<prefix>/<lo>-<hi>`."""
        values, sigma = values.detach().float().cpu(), sigma.detach().float().cpu()
        for lo, hi in zip(SIGMA_BIN_EDGES[:-1], SIGMA_BIN_EDGES[1:], strict=True):
            sel = (sigma >= lo) & (sigma < hi)
            if sel.any():
                self.bins[f"{prefix}/{lo:g}-{hi:g}"].extend(values[sel].tolist())

    def progress(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def flush(self, num_images: int, step: int, extra: dict) -> dict:
        now = time.time()
        rec = {
            "kimg": num_images / 1000,
            "step": step,
            "img_per_sec": (num_images - self.n_last) / max(now - self.t_last, 1e-9),
        }
        rec.update({k: sum(v) / len(v) for k, v in self.values.items() if v})
        rec.update({k: sum(v) / len(v) for k, v in self.bins.items() if v})
        rec.update(extra)
        self.values.clear()
        self.bins.clear()
        self.t_last, self.n_last = now, num_images
        if not self.enabled:
            return rec
        self.log.write(json.dumps(rec) + "\n")
        self.log.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, int | float):
                    self.tb.add_scalar(k, v, num_images)
        post = {k: f"{rec[k]:.3g}" for k in ("loss/fake_dsm", "disc/disc_acc", "weight/ess_frac") if k in rec}
        self.bar.set_postfix(post)
        return rec

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.log is not None:
            self.log.close()
        if self.tb is not None:
            self.tb.close()
