"""Short GMM runs used to choose the `gmm` preset (cited in config.py): modes covered and fraction within 3 std.

    python bench/tuning/gmm_probe.py NAME '{"divergence.name": "rkl", "run.total_kimg": 400}'

Prints the run's history [(images seen, modes covered, fraction within 3 std)] of 4000 EMA samples; a mode
counts as covered with at least 1/32 of the samples. Runs go to /tmp/gmmtry/NAME.
"""

import json
import sys
import time

import torch

from dibregman.config import get_preset, override
from dibregman.generators import generate
from dibregman.loop import distill
from dibregman.teachers.gmm import ring_mixture


def main() -> None:
    torch.set_num_threads(1)
    name, pairs = sys.argv[1], json.loads(sys.argv[2])
    cfg = override(get_preset("gmm"), pairs)
    ring, hist = ring_mixture(), []

    def hook(trainer, num_images: int) -> dict:
        x = generate(trainer.ema, 4000, seed=1)
        labels = ring.mode_assignment(x, 3.0)
        within = float((labels >= 0).float().mean())
        modes = int((torch.bincount(labels[labels >= 0], minlength=8) >= 4000 / 32).sum())
        hist.append((num_images, modes, within))
        return {"modes": modes, "within3": within}

    t0 = time.time()
    distill(cfg, f"/tmp/gmmtry/{name}", hooks=[hook])
    print(name, pairs, "wall", round(time.time() - t0), "hist", hist[-6:], flush=True)


if __name__ == "__main__":
    main()
