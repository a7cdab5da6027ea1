"""Checkpoints: atomic writes, content checksums, healthy flags, newest-valid loading, safetensors export.

A checkpoint is a `torch.save` dict written to a uniquely named `<name>.<pid>-<random>.tmp`, fsync'd, then
renamed, so a crash never leaves a half-written file under the final name and two writers never share a temp
file. Each dict carries `checksum`, a SHA-256 over its whole content (every tensor's dtype, shape and bytes, every
other value's repr), verified on load: a flipped byte is a corrupt checkpoint, skipped with a warning by
`load_latest`, which then falls back to the previous one. Files written before checksums existed load unverified.
Loading uses `weights_only=True`: nothing in a file is ever executed.

A writer marks a checkpoint `healthy` (finite weights, no NaN/Inf step pending); `prune` never deletes the newest
healthy one, so a run that goes bad can always be resumed from the last good state.

A write that fails for lack of space or permission is one `OSError` saying so (`write_error`), whatever form it took
underneath (an OSError, torch's `RuntimeError: [enforce fail at inline_container.cc]`, a safetensors error).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path

import torch

_PATTERN = re.compile(r"^ckpt-(\d+)\.pt$")
_DIR_PATTERN = re.compile(r"^ckpt-(\d+)$")  # a sharded checkpoint's folder (`sharded.py`)
CHECKSUM_KEY = "checksum"  # SHA-256 hex digest of the rest of the dict (`content_checksum`)
SHARDED_KEY = "sharded"  # set by `load` on a sharded checkpoint: the folder to read the shards from
HEALTHY_KEY = "healthy"  # bool: weights finite and no NaN/Inf steps in a row (absent in old files = healthy)


def content_checksum(obj) -> str:
    """SHA-256 over a nested dict/list of tensors and plain values (independent of how it is serialised)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, list | tuple):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def temp_path(path: str | os.PathLike) -> Path:
    """A temp name beside `path`, unique per process and call: `<name>.<pid>-<hex>.tmp`."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # errno values of a full disk or quota
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)  # errno values of a folder that cannot be written


def _errno(e: BaseException | None) -> int | None:
    """The errno of the first OSError in e's chain (cause, then context), or of a Rust `os error N` in its text."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno
        if m := re.search(r"os error (\d+)", str(e)):
            return int(m.group(1))
        e = e.__cause__ or e.__context__
    return None


class WriteError(OSError):
    """A write that failed for lack of space or permission, said in one line; `errno` is the underlying one."""


def write_error(e: BaseException, path=None, codes=NO_SPACE + NOT_WRITABLE) -> WriteError | None:
    """`WriteError` for a write of `path` that failed with an errno in `codes` (anywhere in e's chain), else None."""
    code = _errno(e)
    if code not in codes:
        return None
    path = path or getattr(e, "filename", None)
    where = f" writing {path}" if path else ""
    if code in NO_SPACE:
        err = WriteError(f"no space left on device{where}")
    else:
        folder = f" {Path(path).parent}" if path else ""
        err = WriteError(f"run folder{folder} is not writable ({os.strerror(code)}{where})")
    err.errno = code
    return err


@contextlib.contextmanager
def _writing(path: Path, tmp: Path):
    """Around a write of `path` through `tmp`: `write_error` for a full disk or a read-only folder; `tmp` removed."""
    try:
        yield
    except Exception as e:  # OSError, torch's RuntimeError, SafetensorError
        err = write_error(e, path)
        if err is None:
            raise
        raise err from e
    finally:
        with contextlib.suppress(OSError):  # a read-only folder cannot even drop the temp file
            tmp.unlink(missing_ok=True)


def _replace_from_temp(path: Path, write) -> Path:
    """write(tmp) then fsync and rename to `path`; the temp file is removed if anything fails."""
    tmp = temp_path(path)
    with _writing(path, tmp):
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return path


def save_atomic(obj: dict, path: str | os.PathLike) -> Path:
    """Write `obj` plus its `checksum` to `path` atomically (unique temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    body[CHECKSUM_KEY] = content_checksum(body)
    return _replace_from_temp(path, lambda f: torch.save(body, f))


def load(path: str | os.PathLike, map_location="cpu", what: str = "checkpoint") -> dict:
    """Load and verify a file of `save_atomic` (a `what`) without executing code; ValueError for a corrupt file."""
    path = Path(path)
    if path.is_dir():  # sharded: its small state, verified; the shards are read by `sharded.load`
        return {**read_sharded_meta(path), SHARDED_KEY: str(path)}
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, wrong format, foreign pickle
        raise ValueError(f"{what} {path} is corrupt or not a dibregman {what} ({_first_line(e)})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{what} {path} holds a {type(state).__name__}, not a dibregman {what}")
    expected = state.pop(CHECKSUM_KEY, None)
    if expected is not None and content_checksum(state) != expected:
        raise ValueError(f"{what} {path} is corrupt: its content does not match its checksum")
    if map_location != "cpu":
        state = _to(state, map_location)
    return state


META = "meta.pt"  # a sharded checkpoint's small state (`sharded.py`), with FILES_KEY
FILES_KEY = "files_sha256"  # SHA-256 over the names and bytes of every other file of a sharded checkpoint


def files_checksum(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(q for q in Path(folder).rglob("*") if q.is_file() and q.name != META):
        h.update(f"{p.relative_to(folder)}:{p.stat().st_size};".encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def read_sharded_meta(path: str | os.PathLike, *, verify: bool = True) -> dict:
    """The folder's `meta.pt`, after checking every file against its checksum; ValueError if anything is off."""
    path = Path(path)
    if not (path / META).is_file():
        raise ValueError(f"checkpoint {path} has no {META}: an unfinished or foreign folder")
    meta = load(path / META)
    if verify and files_checksum(path) != meta.get(FILES_KEY):
        raise ValueError(f"checkpoint {path} is corrupt: its files do not match the checksum in {META}")
    return meta


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def peek(path: str | os.PathLike) -> dict | None:
    """The checkpoint's dict with tensors memory-mapped (cheap, unverified); None if it cannot be read."""
    try:
        if Path(path).is_dir():
            return read_sharded_meta(path, verify=False)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None


def is_healthy(path: str | os.PathLike) -> bool:
    """The checkpoint's `healthy` flag (files written before the flag existed count as healthy)."""
    state = peek(path)
    return isinstance(state, dict) and bool(state.get(HEALTHY_KEY, True))


def all_finite(*state_dicts: dict) -> bool:
    """True if every floating-point tensor in the (nested) state dicts is finite."""

    def ok(obj) -> bool:
        if isinstance(obj, torch.Tensor):
            return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
        if isinstance(obj, dict):
            return all(ok(v) for v in obj.values())
        return True

    return all(ok(s) for s in state_dicts)


def describe_mismatch(weights: dict, model: dict, limit: int = 3) -> str | None:
    """One line saying how a state dict `weights` differs from a model's `model` state dict (keys, shapes), or None."""
    missing = [k for k in model if k not in weights]
    unexpected = [k for k in weights if k not in model]
    shapes = [
        f"{k} {tuple(weights[k].shape)} in the file vs {tuple(model[k].shape)} in the model"
        for k in model
        if k in weights and tuple(weights[k].shape) != tuple(model[k].shape)
    ]
    parts = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f", ... ({len(items)} in all)" if len(items) > limit else ""
            parts.append(f"{what}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts) or None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints in `run_dir`, oldest first: files `ckpt-<images>.pt` (one process) and folders
    `ckpt-<images>/` (sharded, `sharded.py`)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = _PATTERN.match(p.name) if p.is_file() else _DIR_PATTERN.match(p.name) if p.is_dir() else None
        if m:
            found.append((int(m.group(1)), p.is_dir(), p))
    return [p for *_, p in sorted(found)]


def checkpoint_path(run_dir: str | os.PathLike, num_images: int) -> Path:
    return Path(run_dir) / f"ckpt-{num_images:012d}.pt"


def load_latest(run_dir: str | os.PathLike, map_location="cpu", check=None) -> tuple[dict, Path] | None:
    """Newest checkpoint that loads, verifies and passes `check(state) -> error or None`; the others are reported
    (a warning each) and skipped. None if there is none."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            state = load(path, map_location)
            problem = check(state) if check is not None else None
            if problem:
                raise ValueError(f"checkpoint {path} {problem}")
            return state, path
        except ValueError as e:
            warnings.warn(f"skipping {e}; trying the previous checkpoint", stacklevel=2)
    return None


def prune(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep <= 0 keeps everything), never the newest healthy one."""
    if keep <= 0:
        return
    paths = list_checkpoints(run_dir)
    old = paths[:-keep]
    if not old:
        return
    if not any(is_healthy(p) for p in paths[-keep:]):  # the kept ones are all unhealthy: keep the last good one
        protect = next((p for p in reversed(old) if is_healthy(p)), None)
        old = [p for p in old if p != protect]
    for path in old:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def export_safetensors(state_dict: dict, config: dict, path: str | os.PathLike) -> Path:
    """Write weights as `<path>.safetensors` and the config as `<path>.json` (both atomically)."""
    from safetensors.torch import save_file

    path = Path(path).with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    tmp = temp_path(path.with_suffix(".safetensors"))
    with _writing(path.with_suffix(".safetensors"), tmp):
        save_file(tensors, str(tmp), metadata={"config": json.dumps(config)})
        os.replace(tmp, path.with_suffix(".safetensors"))
    text = json.dumps(config, indent=2, sort_keys=True).encode()
    _replace_from_temp(path.with_suffix(".json"), lambda f: f.write(text))
    return path.with_suffix(".safetensors")


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def load_safetensors(path: str | os.PathLike) -> tuple[dict, dict]:
    """Read `(state_dict, config)` written by `export_safetensors`; ValueError naming the file if it is not one."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    if not path.is_file():
        raise FileNotFoundError(f"weights not found: {path}")
    json_path = path.with_suffix(".json")
    if json_path.is_file():
        try:
            config = json.loads(json_path.read_text())
        except (ValueError, OSError) as e:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"{json_path} is not readable JSON ({_first_line(e)})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{json_path} must hold a JSON object, not a {type(config).__name__}")
    try:
        if not json_path.is_file():
            with safe_open(str(path), "pt") as f:
                config = json.loads((f.metadata() or {}).get("config", "{}"))
        state = load_file(str(path))
    except Exception as e:  # SafetensorError (text file, renamed image, truncated), bad metadata JSON
        raise ValueError(f"{path} is not a readable safetensors file ({_first_line(e)})") from None
    return state, config
