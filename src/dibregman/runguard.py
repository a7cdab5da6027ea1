"""Guards of a run folder and of a running loop (distillation and teacher training alike).

- `RunLock`: an advisory lock (`fcntl.flock` on `<run_dir>/.lock`, which holds the holder's PID). The kernel drops
  it when the process exits or dies, so a lock is never stale; a second process on the folder gets `RunLocked`.
- `clean_stale_tmp`: temp files of writes that never finished (`*.tmp` of checkpoints and exports), removed on
  start by the lock holder.
- `truncate_log`: `log.jsonl` cut back to the resumed images seen, so records are never duplicated.
- `StopSignals`: SIGINT/SIGTERM ask the loop to finish its step, checkpoint and raise `RunInterrupted`; a second
  signal stops at once (checkpoints are atomic, so even that loses only the current interval).
- `TooManyBadSteps`: the typed error of a run that hit `max_bad_steps` NaN/Inf steps in a row.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
from pathlib import Path

_TMP_DIR = re.compile(r"^\.ckpt-\d+(\.old)?\.tmp$")  # sharded checkpoint folders being written or replaced
_TMP = re.compile(r"^(ckpt-\d+\.pt|generator\.(safetensors|json)|teacher-ema\.(safetensors|json)|log\.jsonl)\..*tmp$")


class RunLocked(ValueError):
    """Another process holds the run folder."""


class TooManyBadSteps(RuntimeError):
    """`max_bad_steps` consecutive NaN/Inf steps: the run stopped; its newest healthy checkpoint is intact."""


class RunInterrupted(Exception):
    """SIGINT/SIGTERM stopped the run after a step and a checkpoint; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class RunLock:
    """`with RunLock(run_dir):` holds the folder's advisory lock (no-op where `fcntl` does not exist)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks, run unguarded
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(
                f"{self.path.parent} is in use by another dibregman process (PID {holder}); "
                "wait for it to finish, stop it, or use another run folder"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing drops the flock; the file stays (unlinking it would race a new holder)
            self.fd = None

    def probe(self) -> None:
        """Raise `RunLocked` now if another process holds the folder (nothing is kept locked)."""
        if self.path.exists():
            self.acquire().release()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def clean_stale_tmp(run_dir: str | os.PathLike) -> list[Path]:
    """Remove temp files left by interrupted writes in `run_dir` (call while holding its lock)."""
    run_dir = Path(run_dir)
    stale = [p for p in run_dir.iterdir() if _TMP.match(p.name) or _TMP_DIR.match(p.name)] if run_dir.is_dir() else []
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)  # a sharded save cut short
        else:
            p.unlink(missing_ok=True)
    return stale


def truncate_log(path: str | os.PathLike, num_images: int) -> int:
    """Drop records of `path` (JSON lines with a `kimg` key) past `num_images`, and unreadable lines (a write cut
    short); atomic. Returns the number of records dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
            ok = round(float(rec.get("kimg", 0)) * 1000) <= num_images
        except (ValueError, TypeError, AttributeError):
            ok = False
        if ok:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in keep))
        os.replace(tmp, path)
    return dropped


class StopSignals:
    """`with StopSignals() as stop:` ... `if stop.requested:` -- SIGINT/SIGTERM set a flag instead of killing the
    step in progress; a second signal raises KeyboardInterrupt at once. Handlers are restored on exit."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint (again to stop at once)",
            flush=True,
        )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def interrupted(signum: int, where: str, path) -> RunInterrupted:
    name = signal.Signals(signum).name
    saved = f"checkpoint {path} written" if path else "no new checkpoint written"
    return RunInterrupted(signum, f"stopped by {name} at {where}; {saved}; run the same command to resume")


__all__ = [
    "RunLock",
    "RunLocked",
    "TooManyBadSteps",
    "RunInterrupted",
    "StopSignals",
    "clean_stale_tmp",
    "truncate_log",
    "interrupted",
]
