"""Reference statistics (mu, sigma and raw features of a reference image set), cached on disk.

Cache folder: the `cache_dir` argument, else `$DIBREGMAN_REFSTATS_DIR`, else `~/.cache/dibregman/refstats`.
One `.npz` per (reference identity, feature net, protocol); the file stores its key and is recomputed and
overwritten whenever the key differs. The key holds the identity string (dataset spec, split, count, subset
seed), the image tensor's shape and the sha1 of all its bytes (so any change of the data is seen), the FID
protocol and the feature net's fingerprint (sha1 of its weights and preprocessing). Writes are atomic
(temporary + rename). Under torchrun each rank extracts a slice, the float64 sums are all-reduced
(`features.sharded_features`) and rank 0 writes the file.

Statistics files (`save_stats` / `load_stats`, `--reference stats:FILE.npz`): `mu` [D] and `sigma` [D, D]
float64, the format of EDM's `fid.py ref` and clean-fid's `make_custom_stats`, which both read ours (they ignore
the other keys); ours add `protocol`, `key` (JSON) and, for the cache, `features` [N, D] (clean-fid keeps those
in a separate `*_kid.npz` as `feats`; either name is read). Foreign files without a `protocol` key take it from
a clean-fid file name, else from the caller's declared protocol (recorded as such).
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

from .features import FeatureNet, sharded_features
from .progress import note
from .protocols import protocol_from_filename

CACHE_ENV = "DIBREGMAN_REFSTATS_DIR"
FORMAT_VERSION = 2


@dataclass
class ReferenceStats:
    mu: torch.Tensor  # [D] float64
    sigma: torch.Tensor  # [D, D] float64
    features: torch.Tensor | None  # [N, D] float32 (for KID and precision/recall); None from a mu/sigma file
    key: dict  # what the cache entry is valid for; key["protocol"] is the FID protocol
    path: Path | None  # cache or statistics file, None when caching is off
    from_cache: bool  # True when loaded from disk without running the feature net
    num_reference: int | None = None  # image count; None when a foreign statistics file does not say

    @property
    def num_images(self) -> int | None:
        return len(self.features) if self.features is not None else self.num_reference

    @property
    def protocol(self) -> str:
        return self.key.get("protocol", "")


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
    return cache_dir / f"{slug}-{net.name}{'-' + net.protocol if net.protocol else ''}.npz"


def save_stats(stats: ReferenceStats, path: str | Path, *, with_features: bool = False) -> Path:
    """Write `mu`, `sigma` (+ `protocol`, `key`, optionally `features`) atomically; EDM and clean-fid read it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "mu": stats.mu.double().numpy(),
        "sigma": stats.sigma.double().numpy(),
        "protocol": np.array(stats.protocol),
        "key": np.array(json.dumps(stats.key, sort_keys=True)),
    }
    if with_features and stats.features is not None:
        arrays["features"] = stats.features.numpy()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_stats(path: str | Path, *, protocol: str, dim: int | None = None) -> ReferenceStats:
    """An EDM / clean-fid / dibregman statistics `.npz` -> ReferenceStats. `protocol` is the one the caller
    evaluates with: a file that says (or whose clean-fid name says) another protocol is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics not found: {path}")
    with np.load(path, allow_pickle=False) as z:
        if "mu" not in z or "sigma" not in z:
            raise ValueError(f"{path}: a statistics file needs arrays 'mu' and 'sigma', has {list(z.keys())}")
        mu, sigma = torch.from_numpy(z["mu"].astype(np.float64)), torch.from_numpy(z["sigma"].astype(np.float64))
        key = json.loads(str(z["key"])) if "key" in z else {}
        file_protocol = str(z["protocol"]) if "protocol" in z else protocol_from_filename(path)
        fkey = next((k for k in ("features", "feats") if k in z), None)
        feats = torch.from_numpy(z[fkey].astype(np.float32)) if fkey else None
    if mu.ndim != 1 or tuple(sigma.shape) != (len(mu), len(mu)):
        raise ValueError(f"{path}: mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} are not [D] and [D, D]")
    if dim is not None and len(mu) != dim:
        raise ValueError(f"{path}: statistics of {len(mu)}-d features, the feature net gives {dim}-d")
    if file_protocol and file_protocol != protocol:
        raise ValueError(
            f"{path} holds {file_protocol!r}-protocol statistics; evaluate with --protocol {file_protocol} "
            f"(numbers of different protocols are not comparable), not {protocol!r}"
        )
    key = {**key, "protocol": protocol, "protocol_source": "file" if file_protocol else "declared"}
    return ReferenceStats(mu, sigma, feats, key, path, from_cache=True, num_reference=key.get("num_images"))


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


def reference_stats(
    images: torch.Tensor,  # [N, C, H, W] in [-1, 1], the reference subset itself
    net: FeatureNet,
    *,
    identity: str,  # human-readable identity, e.g. "mnist:data/mnist:test:n=10000:seed=0"
    cache_dir: str | Path | None | bool = None,  # None = default folder, False = no caching
    batch_size: int = 256,  # images per feature-net forward pass
    progress: bool = False,  # say where the statistics come from / go, and print extraction progress
) -> ReferenceStats:
    """mu, sigma and features of `images` under `net`, from the cache when its key matches."""
    from .. import dist

    key = {
        "format": FORMAT_VERSION,
        "identity": identity,
        "shape": list(images.shape),
        "content_sha1": content_hash(images),
        "feature_net": net.name,
        "protocol": net.protocol or net.name,
        "feature_fingerprint": net.fingerprint,
        "num_images": len(images),
    }
    path = None
    if cache_dir is not False:
        path = _cache_file(Path(cache_dir) if cache_dir else default_cache_dir(), identity, net)
        cached = _load(path, key)
        if cached is not None:
            note(f"reference statistics: loaded {identity} ({key['protocol']}) from the cache {path}", enabled=progress)
            return cached
    where = f"caching them in {path}" if path else "not cached (cache off)"
    note(f"reference statistics: computing {key['protocol']} features of {identity}, {where}", enabled=progress)
    kw = dict(batch_size=batch_size, progress=progress, label="reference")
    sums, feats, _ = sharded_features(net, images, keep=True, **kw)
    mu, sigma = sums.mu_sigma()
    stats = ReferenceStats(mu, sigma, feats, key, path, from_cache=False)
    if path is not None and dist.rank() == 0:
        save_stats(stats, path, with_features=True)
        note(f"reference statistics: written to {path}", enabled=progress)
    dist.barrier()
    return stats
