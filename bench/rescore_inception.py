"""Inception FID at n = --n (2000) against the whole 10k MNIST test set for finished MNIST sweep runs, from their
exported students: the protocol of the shipped teacher's 8.74 (`teacher_quality.py`) and of `fewstep.py`, for
runs that were scored at the sweep's n = 500 against 500 or not at all (`sweeprun.add_inception_full`: the
samples of the run's final MNIST-feature FID, kept in its result.json as final.inception_full).

    python bench/rescore_inception.py RUN_DIR ... [--n 2000] [--device cpu] [--threads 1]

A RUN_DIR holds result.json and generator.safetensors (`mnist_sweep.py`, `fewstep.py`, `equal_tuning.py` runs);
one that does not is reported and skipped. Prints one line per run: label, seed, FID.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common
import mnist_sweep
import sweeprun


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=lambda s: Path(s).resolve(), help="finished run folders")
    p.add_argument("--n", type=int, default=2000, help="samples (the reference is the whole test set)")
    p.add_argument("--reference", default=mnist_sweep.REFERENCE, help="reference images (KIND:PATH[:SPLIT])")
    args = common.parse(common.add_common_args(p), argv, "rescore_inception")
    device = common.setup(args)
    from dibregman.metrics.features import get_feature_net

    ctx = {"device": device, "reference": args.reference, "inception_net": get_feature_net("inception", device)}
    out = []
    for rd in args.runs:
        result = sweeprun.read_result(rd)
        if result is None or not (rd / "generator.safetensors").is_file():
            print(f"{rd}: no result.json or generator.safetensors, skipped", flush=True)
            continue
        sweeprun.add_inception_full(rd, result, args.n, ctx)
        f = result.get("final", {}).get("inception_full")
        print(f"{result['label']} seed {result['seed']}: Inception FID {common.fmt(f and f['fid'], 4)}", flush=True)
        out.append(result)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
