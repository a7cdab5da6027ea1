"""Evaluate generated images against a reference set: FID, KID, precision/recall, classifier score.

    evaluate_samples(samples, "mnist:data/mnist:test", feature_net="mnist")   # -> dict of numbers
    evaluate_path("samples.npz", feature_net="inception", protocol="clean")   # .npz / .npy / image folder
    evaluate_generator(gen, 50_000, "stats:cifar10-32x32.npz", feature_net="inception", protocol="edm")

The maths lives in `dibregman.metrics` (distances.py: FID/KID/PR/IS; features.py: the feature networks;
protocols.py: the edm / clean Inception pipelines; refstats.py: reference statistics, cache and mu/sigma files;
progress.py: progress lines; gmm_metrics.py: exact metrics for analytic teachers, re-exported here as
`exact_metrics`). FID versus images of a run's snapshots: `evaluate_run.py`.

Reporting protocol. Headline numbers use ALL finite samples: `fid` against the whole reference set, `kid`
(mean over `kid_subsets` random subsets of `kid_subset_size`, with `kid_subset_std`), `precision`/`recall`
against a fixed random reference subset of the same size as the sample set (k = 3), the classifier score over
`score_splits` splits. With `num_trials` > 1 every metric is also computed on `num_trials` subsets of the
samples and reported as `<metric>_trial_mean` / `<metric>_trial_std`: `trial_mode="disjoint"` splits the
samples into disjoint subsets of n // num_trials (smaller n, so FID is biased upward compared with the
headline), `"bootstrap"` resamples n with replacement (same n; duplicates bias FID slightly upward too).
FID depends on n and on the reference set: compare only numbers with the same n_samples, n_reference and
feature net.
Inception numbers carry their `protocol` ("edm" or "clean", `metrics/protocols.py`); results of different
protocols are never compared (`evaluate_run.fid_table` gives each protocol its own column).
`reference` may be `stats:FILE.npz` (EDM / clean-fid mu-sigma statistics: FID only, KID and precision/recall
need features). Under torchrun each rank extracts (and `evaluate_generator` also generates) a contiguous slice;
mu and sigma come from float64 sums all-reduced over ranks (exact), features are gathered for KID/PR/trials.
Non-finite samples are counted (`n_nonfinite`), excluded, and warned about, never silently dropped.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from . import dist
from .data import load_dataset, read_image_folder, to_images
from .metrics.distances import frechet_distance, inception_score, kid, precision_recall
from .metrics.features import FeatureNet, get_feature_net, rank_rows, sharded_features
from .metrics.gmm_metrics import exact_metrics
from .metrics.refstats import ReferenceStats, content_hash, load_stats, reference_stats

__all__ = [
    "evaluate_samples",
    "evaluate_generator",
    "evaluate_path",
    "prepare_reference",
    "load_samples",
    "load_reference",
    "exact_metrics",
    "format_summary",
]

DEFAULT_REFERENCE = "mnist:data/mnist:test"
ALL_METRICS = ("fid", "kid", "pr", "score")
NPZ_KEYS = ("samples", "images", "x")


def parse_reference(reference: str) -> tuple[str, str]:
    """`KIND:PATH[:SPLIT]` -> (dataset spec, split); the split defaults to `test`."""
    head, _, tail = reference.rpartition(":")
    return (head, tail) if head and tail in ("train", "test") else (reference, "test")


def load_reference(
    reference: str | torch.Tensor, *, num_reference: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, str]:
    """Reference images [N, C, H, W] and an identity string for the cache; `num_reference` takes a fixed
    random subset (seeded) instead of the whole set."""
    if isinstance(reference, torch.Tensor):
        images, identity = reference, f"tensor-{content_hash(reference)[:16]}"
    else:
        spec, split = parse_reference(reference)
        images, _ = load_dataset(spec, split)
        identity = f"{spec}:{split}"
    if num_reference is not None and num_reference < len(images):
        if num_reference < 2:
            raise ValueError(f"num_reference must be >= 2, got {num_reference}")
        idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:num_reference]
        return images[idx.sort().values], f"{identity}:n={num_reference}:seed={seed}"
    return images, f"{identity}:n={len(images)}"


def _metrics(feats, logits, ref: ReferenceStats, opt: dict, gen, mu_sigma=None) -> dict:
    """Every requested metric of one sample-feature set [N, D] against the reference; `mu_sigma` = the
    samples' exact (mu, sigma) when already reduced (else computed from `feats`)."""
    from .metrics.distances import feature_stats

    out = {}
    if "fid" in opt["metrics"]:
        out["fid"] = frechet_distance(*(mu_sigma or feature_stats(feats)), ref.mu, ref.sigma)
    if "kid" in opt["metrics"]:
        out["kid"], out["kid_subset_std"] = kid(
            feats,
            ref.features,
            num_subsets=opt["kid_subsets"],
            subset_size=opt["kid_subset_size"],
            generator=gen,
        )
    if "pr" in opt["metrics"]:
        m = min(len(feats), ref.num_images)
        ref_sub = ref.features[opt["ref_perm"][:m]]
        out["precision"], out["recall"] = precision_recall(ref_sub, feats, k=opt["pr_k"])
    if logits is not None:
        name = opt["score_name"]
        out[name], out[f"{name}_split_std"] = inception_score(logits, num_splits=min(opt["score_splits"], len(logits)))
        counts = torch.bincount(logits.argmax(1), minlength=logits.shape[1]).double()
        out["class_proportions"] = (counts / counts.sum()).tolist()
    return out


def _trial_indices(n: int, num_trials: int, mode: str, gen: torch.Generator) -> list[torch.Tensor]:
    if mode == "disjoint":
        perm = torch.randperm(n, generator=gen)
        size = n // num_trials
        return [perm[i * size : (i + 1) * size] for i in range(num_trials)]
    if mode == "bootstrap":
        return [torch.randint(0, n, (n,), generator=gen) for _ in range(num_trials)]
    raise ValueError(f"trial_mode must be 'disjoint' or 'bootstrap', got {mode!r}")


def _trials(feats, logits, ref, opt, gen) -> dict:
    """Metrics on `num_trials` subsets -> `<metric>_trial_mean` / `<metric>_trial_std` (population std)."""
    idx_list = _trial_indices(len(feats), opt["num_trials"], opt["trial_mode"], gen)
    trial_opt = dict(opt, score_splits=1)
    runs = [_metrics(feats[i], None if logits is None else logits[i], ref, trial_opt, gen) for i in idx_list]
    out = {"trial_size": len(idx_list[0])}
    for key, value in runs[0].items():
        if isinstance(value, float) and not key.endswith("_std"):
            v = torch.tensor([r[key] for r in runs], dtype=torch.float64)
            out[f"{key}_trial_mean"], out[f"{key}_trial_std"] = float(v.mean()), float(v.std(unbiased=False))
    return out


def _finite_samples(samples: torch.Tensor) -> tuple[torch.Tensor, int]:
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        raise ValueError(
            f"samples must be a tensor [N, C, H, W] in [-1, 1], got {getattr(samples, 'shape', type(samples))}"
        )
    finite = torch.isfinite(samples.reshape(len(samples), -1)).all(1)
    n_bad = int((~finite).sum())
    if n_bad:
        warnings.warn(
            f"{n_bad} of {len(samples)} samples contain NaN/inf; excluded and reported as n_nonfinite",
            stacklevel=3,
        )
    return samples[finite], n_bad


def prepare_reference(
    reference: str | torch.Tensor | ReferenceStats,  # KIND:PATH[:SPLIT], stats:FILE.npz, images or ready stats
    net: FeatureNet,
    *,
    num_reference: int | None = None,  # fixed random subset of the reference images (None = all)
    seed: int = 0,  # seeds that subset
    cache_dir: str | Path | None | bool = None,  # reference-stat cache folder; None = default, False = off
    batch_size: int = 256,  # images per feature-net forward pass
    progress: bool = False,  # say where the statistics come from and show extraction progress
) -> ReferenceStats:
    """The reference's statistics under `net` (and its protocol); a protocol mismatch is a ValueError."""
    protocol = net.protocol or net.name
    if isinstance(reference, str) and reference.startswith("stats:"):
        ref = load_stats(reference[len("stats:") :], protocol=protocol, dim=net.dim)
        ref.key.setdefault("identity", reference)
    elif isinstance(reference, ReferenceStats):
        ref = reference
    else:
        images, identity = load_reference(reference, num_reference=num_reference, seed=seed)
        ref = reference_stats(
            images, net, identity=identity, cache_dir=cache_dir, batch_size=batch_size, progress=progress
        )
    if ref.protocol != protocol:
        raise ValueError(f"reference statistics of protocol {ref.protocol!r} cannot score {protocol!r} features")
    return ref


def evaluate_samples(
    samples: torch.Tensor,  # [N, C, H, W] float in [-1, 1] (values outside are clamped by the feature nets)
    reference: str | torch.Tensor | ReferenceStats = DEFAULT_REFERENCE,  # see `prepare_reference`
    *,
    feature_net: str | FeatureNet = "mnist",  # "mnist" (fast, 128-d) or "inception" (FID standard, slow)
    protocol: str | None = None,  # Inception only: "edm" (default) | "clean", see metrics/protocols.py
    num_reference: int | None = None,  # use a fixed random subset of this many reference images (None = all)
    num_trials: int = 1,  # > 1: also report mean/std over sample subsets (see module docstring)
    trial_mode: str = "disjoint",  # "disjoint" subsets of n // num_trials, or "bootstrap" resamples of n
    metrics: Sequence[str] = ALL_METRICS,  # subset of ("fid", "kid", "pr", "score")
    kid_subsets: int = 20,  # random subsets for KID (literature: 100; each costs 3 kernel matrices)
    kid_subset_size: int = 1000,  # points per KID subset (capped at the smaller set size)
    pr_k: int = 3,  # k of the k-NN radii for precision/recall
    score_splits: int = 10,  # splits for the classifier / Inception score
    cache_dir: str | Path | None | bool = None,  # reference-stat cache folder; None = default, False = off
    batch_size: int = 256,  # images per feature-net forward pass
    device: str | torch.device = "cpu",  # where the feature net runs
    seed: int = 0,  # seeds reference subsets, KID subsets and trials
    progress: bool = False,  # print progress lines (count, img/s, ETA) and where reference statistics live
) -> dict:
    """Every metric as a plain dict of numbers (JSON-ready), with the sample and reference counts and the
    protocol. Under torchrun each rank extracts its slice of `samples`; statistics are reduced exactly."""
    x, n_bad = _finite_samples(samples)
    opt = dict(
        metrics=metrics, num_trials=num_trials, trial_mode=trial_mode, kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size, pr_k=pr_k, score_splits=score_splits, batch_size=batch_size, seed=seed,
        progress=progress,
    )  # fmt: skip
    _check_options(opt, len(x))
    net = get_feature_net(feature_net, device, protocol)
    ref = prepare_reference(
        reference, net, num_reference=num_reference, seed=seed, cache_dir=cache_dir, batch_size=batch_size,
        progress=progress,
    )  # fmt: skip
    return _evaluate(x[rank_rows(len(x))], len(x), n_bad, net, ref, opt)


def evaluate_generator(
    gen,  # OneStepGenerator (unconditional), e.g. from `generators.load_generator`
    num_samples: int,  # samples to draw; the same as `generators.generate(gen, num_samples, seed=...)`
    reference: str | torch.Tensor | ReferenceStats = DEFAULT_REFERENCE,
    *,
    seed: int = 0,  # seeds z (and the metrics' subsets, as in `evaluate_samples`)
    gen_batch_size: int = 256,  # images per generator forward pass
    device: str | torch.device = "cpu",  # where the generator and the feature net run
    feature_net: str | FeatureNet = "mnist",
    protocol: str | None = None,
    num_reference: int | None = None,
    cache_dir: str | Path | None | bool = None,
    progress: bool = False,
    steps: int | None = None,  # a K-step student's steps, 1..K (None: all K)
    **options,  # the metric options of `evaluate_samples` (metrics, num_trials, kid_subsets, ...)
) -> dict:
    """`evaluate_samples(generate(gen, num_samples, seed, steps=steps))` without holding other ranks' samples: under
    torchrun each rank generates and extracts only its slice."""
    batch_size = options.pop("batch_size", 256)
    opt = dict(ALL_DEFAULTS, **options, batch_size=batch_size, seed=seed, progress=progress)
    _check_options(opt, num_samples)
    from .networks.student import check_steps

    check_steps(gen, steps)  # before the reference's features are extracted
    net = get_feature_net(feature_net, device, protocol)
    ref = prepare_reference(
        reference, net, num_reference=num_reference, seed=seed, cache_dir=cache_dir, batch_size=batch_size,
        progress=progress,
    )  # fmt: skip
    from .generators import generate_rows

    rows = rank_rows(num_samples)
    x = generate_rows(
        gen, num_samples, rows, seed=seed, batch_size=gen_batch_size, device=device, progress=progress, steps=steps
    )
    x, n_bad = _finite_samples(x)
    counts = torch.tensor([len(x), n_bad], dtype=torch.float64)
    dist.all_reduce_sum_(counts)
    return _evaluate(x, int(counts[0]), int(counts[1]), net, ref, opt)


ALL_DEFAULTS = dict(
    metrics=ALL_METRICS, num_trials=1, trial_mode="disjoint", kid_subsets=20, kid_subset_size=1000, pr_k=3,
    score_splits=10,
)  # fmt: skip


def _check_options(o: dict, n: int) -> None:
    """User mistakes that must stop an evaluation before any feature is extracted."""
    bad = sorted(set(o["metrics"]) - set(ALL_METRICS))
    if bad:
        raise ValueError(f"unknown metric(s) {bad}; valid: {list(ALL_METRICS)}")
    min_n = max(2, o["pr_k"] + 1) * (o["num_trials"] if o["trial_mode"] == "disjoint" else 1)
    if n < min_n:
        raise ValueError(f"need at least {min_n} finite samples for num_trials={o['num_trials']}, got {n}")


def _evaluate(x: torch.Tensor, n: int, n_bad: int, net: FeatureNet, ref: ReferenceStats, o: dict) -> dict:
    """Metrics of this rank's finite samples `x` (n finite ones over all ranks) against `ref`."""
    t0 = time.time()
    _check_options(o, n)
    metrics = set(o["metrics"])
    skipped = sorted(metrics & {"kid", "pr"}) if ref.features is None else []
    if skipped:
        warnings.warn(f"{ref.path} holds mu/sigma only: {skipped} need reference features, skipped", stacklevel=3)
        metrics -= set(skipped)
    with_logits = net.has_logits and "score" in metrics
    keep = bool(metrics - {"fid"}) or o["num_trials"] > 1
    sums, feats, logits = sharded_features(
        net, x, keep=keep, local=True, batch_size=o["batch_size"], with_logits=with_logits,
        progress=o["progress"], label="samples",
    )  # fmt: skip
    ref_shape = ref.key.get("shape", [None])[1:]
    if ref_shape and list(x.shape[1:]) != ref_shape:
        warnings.warn(
            f"samples {tuple(x.shape[1:])} and reference {tuple(ref_shape)} differ in shape; the "
            "feature net resizes both, but padding or scale differences still move the numbers",
            stacklevel=3,
        )
    seed, n_ref = o["seed"], ref.num_images
    opt = dict(
        o, metrics=metrics, score_name="inception_score" if net.name == "inception" else "classifier_score",
        ref_perm=torch.randperm(n_ref, generator=torch.Generator().manual_seed(seed)) if n_ref else None,
    )  # fmt: skip
    out = {
        "protocol": ref.protocol, "feature_net": net.name, "feature_fingerprint": net.fingerprint[:16],
        "feature_dim": net.dim, "reference": ref.key.get("identity", str(ref.path)),
        "n_samples": n, "n_nonfinite": n_bad, "n_reference": n_ref,
        "sample_shape": list(x.shape[1:]), "reference_shape": ref_shape or None,
        "reference_from_cache": ref.from_cache, "seed": seed, "num_trials": o["num_trials"],
        "world_size": dist.world_size(), "device": str(net.device),
    }  # fmt: skip
    if "protocol_source" in ref.key:
        out["reference_protocol_source"] = ref.key["protocol_source"]
    if skipped:
        out["metrics_skipped"] = skipped
    if "kid" in metrics:
        out["kid_subset_size"] = min(o["kid_subset_size"], n, n_ref)
    if "pr" in metrics:
        out["pr_reference_size"] = min(n, n_ref)
    gen = torch.Generator().manual_seed(seed)
    out.update(_metrics(feats, logits, ref, opt, gen, mu_sigma=sums.mu_sigma()))
    if o["num_trials"] > 1:
        out["trial_mode"] = o["trial_mode"]
        out.update(_trials(feats, logits, ref, opt, gen))
    out["seconds"] = round(time.time() - t0, 2)
    return out


def load_samples(path: str | Path) -> torch.Tensor:
    """Samples from `.npz` (key samples / images / x, or its only array), `.npy`, or a folder of images
    (`data.read_image_folder`) -> float32 [N, C, H, W] in [-1, 1]. Training's readers: arrays go through
    `data.to_images(..., samples=True)` (non-finite samples kept, then counted and excluded), folders through
    `data.read_image_folder`."""
    path = Path(path)
    if path.is_dir():
        return read_image_folder(path)[1]  # the reader training uses (data.py)
    if not path.is_file():
        raise FileNotFoundError(f"samples not found: {path}")
    if path.suffix == ".npy":
        return to_images(_np_load(path), str(path), samples=True)
    if path.suffix != ".npz":
        raise ValueError(f"samples must be a .npz, .npy or an image folder, got {path}")
    with _np_load(path) as z:
        keys = list(z.keys())
        key = next((k for k in NPZ_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
        if key is None:
            raise ValueError(f"{path}: no array named {' / '.join(NPZ_KEYS)} among {keys}")
        return to_images(_np_load(path, z, key), f"{path}[{key}]", samples=True)


def _np_load(path: Path, z=None, key=None):
    """np.load(path) (or z[key]); ValueError naming the file if it is empty, truncated or not NumPy."""
    try:
        return np.load(path, allow_pickle=False) if z is None else z[key]
    except Exception as e:
        raise ValueError(f"{path} is not a readable {path.suffix} file ({type(e).__name__})") from None


def evaluate_path(path: str | Path, reference: str | torch.Tensor = DEFAULT_REFERENCE, **kwargs) -> dict:
    """`load_samples(path)` then `evaluate_samples(samples, reference, **kwargs)`; adds `samples_path`."""
    result = evaluate_samples(load_samples(path), reference, **kwargs)
    return {"samples_path": str(path), **result}


def format_summary(result: dict) -> str:
    """One human-readable line of the headline numbers of `evaluate_samples`."""
    net, protocol = result["feature_net"], result.get("protocol", result["feature_net"])
    tag = f"{net}/{protocol}" if protocol != net else net
    parts = [f"{tag}: n={result['n_samples']} vs {result['n_reference']} ref"]
    for key in ("fid", "kid", "precision", "recall", "classifier_score", "inception_score"):
        if key in result:
            mean = result.get(f"{key}_trial_mean")
            extra = f" (trials {mean:.4g}±{result[f'{key}_trial_std']:.2g})" if mean is not None else ""
            parts.append(f"{key} {result[key]:.4g}{extra}")
    if result.get("n_nonfinite"):
        parts.append(f"{result['n_nonfinite']} non-finite excluded")
    return ", ".join(parts)
