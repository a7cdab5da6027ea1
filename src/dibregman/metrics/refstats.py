"""Reference statistics (mu, sigma and raw features of a reference image set), cached on disk.

Cache folder: the `cache_dir` argument, else `$DIBREGMAN_REFSTATS_DIR`, else `~/.cache/dibregman/refstats`.
One `.npz` per (reference identity, feature net name); the file stores its key and is recomputed and
overwritten whenever the key differs. The key holds the identity string (dataset spec, split, count, subset
seed), the image tensor's shape and the sha1 of all its bytes (so any change of the data is seen), and the
feature net's fingerprint (sha1 of its weights and preprocessing). Writes are atomic (temporary + rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .distances import feature_stats
from .features import FeatureNet, extract_features

CACHE_ENV = "DIBREGMAN_REFSTATS_DIR"
FORMAT_VERSION = 1


@dataclass
class ReferenceStats:
    mu: torch.Tensor  # [D] float64
    sigma: torch.Tensor  # [D, D] float64
    features: torch.Tensor  # [N, D] float32, the whole reference subset (for KID and precision/recall)
    key: dict  # what the cache entry is valid for
    path: Path | None  # cache file, None when caching is off
    from_cache: bool  # True when loaded from disk without running the feature net

    @property
    def num_images(self) -> int:
        return len(self.features)


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dibregman" / "refstats"


def content_hash(images: torch.Tensor) -> str:
    """sha1 of dtype, shape and every byte of the tensor (about 0.1 s per 100 MB)."""
    t = images.detach().cpu().contiguous()
    h = hashlib.sha1(f"{t.dtype}|{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _cache_file(cache_dir: Path, identity: str, net: FeatureNet) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", identity).strip("_")[:80] or "reference"
    return cache_dir / f"{slug}-{net.name}.npz"


def _load(path: Path, key: dict) -> ReferenceStats | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["key"])) != key:
                return None
            mu, sigma, feats = (torch.from_numpy(z[k].copy()) for k in ("mu", "sigma", "features"))
    except Exception as e:  # truncated or foreign file: recompute and overwrite
        warnings.warn(f"ignoring unreadable reference-stat cache {path}: {type(e).__name__}: {e}", stacklevel=3)
        return None
    return ReferenceStats(mu, sigma, feats, key, path, from_cache=True)


def _save_atomic(path: Path, stats: ReferenceStats) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(
            f,
            key=np.array(json.dumps(stats.key, sort_keys=True)),
            mu=stats.mu.numpy(),
            sigma=stats.sigma.numpy(),
            features=stats.features.numpy(),
        )
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def reference_stats(
    images: torch.Tensor,  # [N, C, H, W] in [-1, 1], the reference subset itself
    net: FeatureNet,
    *,
    identity: str,  # human-readable identity, e.g. "mnist:data/mnist:test:n=10000:seed=0"
    cache_dir: str | Path | None | bool = None,  # None = default folder, False = no caching
    batch_size: int = 256,  # images per feature-net forward pass
    progress: bool = False,  # print feature-extraction speed
) -> ReferenceStats:
    """mu, sigma and features of `images` under `net`, from the cache when its key matches."""
    key = {
        "format": FORMAT_VERSION,
        "identity": identity,
        "shape": list(images.shape),
        "content_sha1": content_hash(images),
        "feature_net": net.name,
        "feature_fingerprint": net.fingerprint,
    }
    path = None
    if cache_dir is not False:
        path = _cache_file(Path(cache_dir) if cache_dir else default_cache_dir(), identity, net)
        cached = _load(path, key)
        if cached is not None:
            return cached
    feats, _ = extract_features(net, images, batch_size=batch_size, progress=progress)
    mu, sigma = feature_stats(feats)
    stats = ReferenceStats(mu, sigma, feats, key, path, from_cache=False)
    if path is not None:
        _save_atomic(path, stats)
    return stats
