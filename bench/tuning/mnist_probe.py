"""Short MNIST runs used to choose the `mnist` preset's learning rate (cited in config.py).

    python bench/tuning/mnist_probe.py NAME '{"run.total_kimg": 6, "optim.gen_lr": 3e-4, "optim.fake_lr": 3e-4}'

Prints [(images seen, FID with the MNIST feature net on 500 EMA samples against the 10k test set)].
"""

import json
import sys
import time

import torch

from dibregman.config import get_preset, override
from dibregman.evaluate import evaluate_samples
from dibregman.generators import generate
from dibregman.loop import Trainer


def main() -> None:
    torch.set_num_threads(1)
    name, pairs = sys.argv[1], json.loads(sys.argv[2])
    cfg = override(get_preset("mnist"), {"run.tensorboard": False, **pairs})
    hist = []

    def hook(trainer, num_images: int) -> dict:
        x = generate(trainer.ema, 500, seed=1)
        r = evaluate_samples(x, "mnist:data/mnist:test", feature_net="mnist", metrics=("fid",))
        hist.append((num_images, round(r["fid"], 2)))
        return {"fid": r["fid"]}

    t0 = time.time()
    Trainer(cfg, f"/tmp/mnisttry/{name}", hooks=[hook]).train()
    print(name, pairs, "wall", round(time.time() - t0), hist, flush=True)


if __name__ == "__main__":
    main()
