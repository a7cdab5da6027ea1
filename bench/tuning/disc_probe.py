"""Does the discriminator learn? 3.2 kimg of the `mnist` preset, printing per log interval
(kimg, discriminator accuracy, logit std, ESS / batch). Used to choose `optim.head_lr_mult` (cited in config.py).

    python bench/tuning/disc_probe.py NAME '{"optim.head_lr_mult": 50}'
"""

import json
import sys

import torch

from dibregman.config import override
from dibregman.loop import Trainer
from dibregman.presets import get_preset


def main() -> None:
    torch.set_num_threads(1)
    name, pairs = sys.argv[1], json.loads(sys.argv[2])
    cfg = override(
        get_preset("mnist"),
        {
            "run.tensorboard": False,
            "run.total_kimg": 3.2,
            "run.log_every_kimg": 0.64,
            "run.sample_every_kimg": 0,
            **pairs,
        },
    )
    Trainer(cfg, f"/tmp/disc/{name}").train()
    with open(f"/tmp/disc/{name}/log.jsonl") as f:
        recs = [json.loads(line) for line in f]
    keys = ("kimg", "disc/disc_acc", "logit/std", "weight/ess_frac")
    print(name, [tuple(round(r[k], 3) for k in keys) for r in recs], flush=True)


if __name__ == "__main__":
    main()
