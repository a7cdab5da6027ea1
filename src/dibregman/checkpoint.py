"""Checkpoints: atomic writes, integrity checks, newest-valid loading, safetensors export.

A checkpoint is a `torch.save` dict written to `<name>.tmp` then renamed, so a crash never leaves a half-written
file under the final name. Loading uses `weights_only=True`: nothing in a file is ever executed. Every
checkpoint carries the resolved config; `load_latest` skips files that fail to load (truncated, corrupt) and
falls back to the previous one.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch

_PATTERN = re.compile(r"^ckpt-(\d+)\.pt$")


def save_atomic(obj: dict, path: str | os.PathLike) -> Path:
    """Write `obj` to `path` atomically (write-then-rename, fsync'd)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint without executing code; a clear error for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, wrong format, foreign pickle
        raise ValueError(f"checkpoint {path} is corrupt or not a dibregman checkpoint: {type(e).__name__}: {e}") from e


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints `ckpt-<kimg>.pt` in `run_dir`, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_path(run_dir: str | os.PathLike, num_images: int) -> Path:
    return Path(run_dir) / f"ckpt-{num_images:012d}.pt"


def load_latest(run_dir: str | os.PathLike, map_location="cpu") -> tuple[dict, Path] | None:
    """Newest checkpoint that loads; corrupt ones are reported and skipped. None if there is none."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return load(path, map_location), path
        except ValueError as e:
            warnings.warn(f"skipping {e}", stacklevel=2)
    return None


def prune(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep <= 0 keeps everything)."""
    if keep <= 0:
        return
    for path in list_checkpoints(run_dir)[:-keep]:
        path.unlink(missing_ok=True)


def export_safetensors(state_dict: dict, config: dict, path: str | os.PathLike) -> Path:
    """Write weights as `<path>.safetensors` and the config as `<path>.json` (both atomically)."""
    from safetensors.torch import save_file

    path = Path(path).with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    tmp = path.with_name(path.name + ".safetensors.tmp")
    save_file(tensors, str(tmp), metadata={"config": json.dumps(config)})
    os.replace(tmp, path.with_suffix(".safetensors"))
    tmpj = path.with_name(path.name + ".json.tmp")
    tmpj.write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(tmpj, path.with_suffix(".json"))
    return path.with_suffix(".safetensors")


def load_safetensors(path: str | os.PathLike) -> tuple[dict, dict]:
    """Read `(state_dict, config)` written by `export_safetensors`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    if not path.is_file():
        raise FileNotFoundError(f"weights not found: {path}")
    json_path = path.with_suffix(".json")
    if json_path.is_file():
        config = json.loads(json_path.read_text())
    else:
        with safe_open(str(path), "pt") as f:
            config = json.loads((f.metadata() or {}).get("config", "{}"))
    return load_file(str(path)), config
