"""Guards of a run folder and of a running loop (distillation and teacher training alike).

- `RunLock`: an advisory lock (`fcntl.flock` on `<run_dir>/.lock`, which holds the holder's PID). The kernel drops
  it when the process exits or dies, so a lock is never stale; a second process on the folder gets `RunLocked`.
- `check_writable`: a read-only run folder is refused before anything is built.
- `clean_stale_tmp`: temp files of writes that never finished (`*.tmp` of checkpoints, exports and the regression
  pairs), removed on start by the lock holder.
- `truncate_log`: `log.jsonl` cut back to the resumed images seen, so records are never duplicated.
- `StopSignals`: SIGINT/SIGTERM ask the loop to finish its step, checkpoint and raise `RunInterrupted`; a second
  signal stops at once (checkpoints are atomic, so even that loses only the current interval).
- `sigterm_raises`: SIGTERM before `StopSignals` takes over (start-up) raises `RunInterrupted` instead of killing
  the process without a word.
- `TooManyBadSteps`: the typed error of a run that hit `max_bad_steps` NaN/Inf steps in a row; `UserCodeError`: a
  user's function (`python:MODULE:FUNCTION`) raised, its own exception chained.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import threading
from pathlib import Path

_TMP_DIR = re.compile(r"^\.ckpt-\d+(\.old)?\.tmp$")  # sharded checkpoint folders being written or replaced
_TMP = re.compile(
    r"^(ckpt-\d+\.pt|generator\.(safetensors|json)|teacher-ema\.(safetensors|json)|log\.jsonl|\.?regression_pairs\.pt)"
    r"\..*tmp$"
)


class RunLocked(ValueError):
    """Another process holds the run folder."""


class TooManyBadSteps(RuntimeError):
    """`max_bad_steps` consecutive NaN/Inf steps: the run stopped; its newest healthy checkpoint is intact."""


class StopRun(Exception):
    """Raised by a training hook to end the run early (an early-stopping rule, e.g. on divergence). The engine logs
    the step with `metrics` (the hook's record), checkpoints, and raises it again with `checkpoint` set; running the
    same command again resumes the run, so a caller that means "never resume" records that itself."""

    def __init__(self, reason: str, metrics: dict | None = None):
        super().__init__(reason)
        self.metrics, self.checkpoint = dict(metrics or {}), None


class UserCodeError(Exception):
    """A user's function (`python:MODULE:FUNCTION`) raised; `__cause__` is its exception, with its traceback."""


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
            import fcntl  # noqa: F401
        except ImportError:  # Windows: no advisory locks, run unguarded
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._lock(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def _lock(self, fd: int) -> None:
        """flock `fd` (exclusive, non-blocking); RunLocked naming the holder's PID, `fd` closed, if it is held."""
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(
                f"{self.path.parent} is in use by another dibregman process (PID {holder}); "
                "wait for it to finish, stop it, or use another run folder"
            ) from None

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing drops the flock; the file stays (unlinking it would race a new holder)
            self.fd = None

    def probe(self) -> None:
        """Raise `RunLocked` now if another process holds the folder; the lock file is neither made nor changed."""
        try:
            import fcntl  # noqa: F401

            fd = os.open(self.path, os.O_RDONLY)
        except (ImportError, OSError):  # no advisory locks, or no lock file: nobody holds the folder
            return
        self._lock(fd)
        os.close(fd)  # closing drops the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_writable(run_dir: str | os.PathLike) -> None:
    """PermissionError if `run_dir` (or, where it does not exist yet, the nearest folder above it) is not writable."""
    path = Path(run_dir)
    while not path.exists() and path != path.parent:
        path = path.parent
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        above = "" if path == Path(run_dir) else f" ({path} is read-only)"
        raise PermissionError(f"run folder {run_dir} is not writable{above}; give another --run-dir")


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


@contextlib.contextmanager
def sigterm_raises(message: str):
    """`with sigterm_raises("stopped by SIGTERM during start-up"):` -- SIGTERM raises RunInterrupted(message) (exit
    code 143) instead of ending the process silently; `StopSignals` overrides it while a loop runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        raise RunInterrupted(signum, message)

    old = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def interrupted(signum: int, where: str, path) -> RunInterrupted:
    name = signal.Signals(signum).name
    saved = f"checkpoint {path} written" if path else "no new checkpoint written"
    return RunInterrupted(signum, f"stopped by {name} at {where}; {saved}; run the same command to resume")


__all__ = [
    "RunLock",
    "RunLocked",
    "TooManyBadSteps",
    "UserCodeError",
    "RunInterrupted",
    "StopSignals",
    "check_writable",
    "clean_stale_tmp",
    "sigterm_raises",
    "truncate_log",
    "interrupted",
]
