"""What a command prints when it fails or warns: one line on stderr, after the progress bar is closed.

Exit codes: 2 for bad input (a ValueError/OSError: a bad flag, a missing or corrupt file, a read-only run folder),
1 for a failed run (too many NaN/Inf steps, a full disk, a user's `python:MODULE:FUNCTION` that raised -- shown
with its own traceback, this package's frames left out -- or an internal error), 128 + signal for a stop by SIGINT/
SIGTERM, during start-up too. DIBREGMAN_TRACEBACK=1 shows tracebacks of internal errors. This package's warnings
(a skipped checkpoint, a regenerated file) print as one line `warning: MESSAGE`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import traceback
import warnings
from collections.abc import Callable

from .checkpoint import NO_SPACE, WriteError, write_error
from .runguard import RunInterrupted, TooManyBadSteps, UserCodeError, sigterm_raises

_PACKAGE = os.path.dirname(os.path.realpath(__file__))


def run_reported(command: Callable, args, *, prefix: str, starts_a_run: bool = False) -> int:
    """command(args), its failure reported (`report`); the exit code. starts_a_run: SIGTERM before the loop's own
    handler is installed says that the run was stopped during start-up."""
    when = " during start-up (before the first step); run the same command to start again" if starts_a_run else ""
    try:
        with _one_line_warnings(), sigterm_raises(f"stopped by SIGTERM{when}"):
            command(args)
    except (Exception, KeyboardInterrupt) as e:
        return report(e, prefix)
    return 0


def report(e: BaseException, prefix: str) -> int:
    """Print `e` for the user (one line; a user's own traceback above it) and return the exit code."""
    close_progress_bars()
    if isinstance(e, RunInterrupted | KeyboardInterrupt):
        print(f"{prefix}: {e if isinstance(e, RunInterrupted) else 'interrupted'}", file=sys.stderr)
        return e.exit_code if isinstance(e, RunInterrupted) else 130
    if isinstance(e, UserCodeError):
        _print_user_traceback(e.__cause__)
    elif not isinstance(e, WriteError):  # a full disk or a read-only mount met outside checkpoint.py's writes
        e = write_error(e, codes=(*NO_SPACE, errno.EROFS)) or e
    if isinstance(e, ValueError | OSError | TooManyBadSteps | UserCodeError):
        print(f"{prefix}: error: {one_line(e)}", file=sys.stderr)
        bad_input = isinstance(e, ValueError | OSError) and getattr(e, "errno", None) not in NO_SPACE
        return 2 if bad_input else 1
    if os.environ.get("DIBREGMAN_TRACEBACK") == "1":
        raise e
    print(f"{prefix}: internal error: {type(e).__name__}: {one_line(e)} (DIBREGMAN_TRACEBACK=1 shows where)",
          file=sys.stderr)  # fmt: skip
    return 1


def one_line(e: BaseException, limit: int = 600) -> str:
    """The first line of an error's message (" ..." if it had more), at most `limit` characters."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
    text = lines[0] + (" ..." if len(lines) > 1 else "")
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def close_progress_bars() -> None:
    """Close every live tqdm bar (it leaves its last state and a newline), so that an error gets a line of its own
    and no bar is redrawn after it."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def _print_user_traceback(cause: BaseException | None) -> None:
    """The traceback of a user's function on stderr, without this package's frames."""
    if cause is None:
        return
    tb = traceback.extract_tb(cause.__traceback__)
    frames = [f for f in tb if not os.path.realpath(f.filename).startswith(_PACKAGE + os.sep)]
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames)]
    print("".join(lines + traceback.format_exception_only(cause)), end="", file=sys.stderr)


@contextlib.contextmanager
def _one_line_warnings():
    """This package's warnings as one line `warning: MESSAGE`; other warnings as Python prints them."""
    original = warnings.formatwarning

    def one_line_warning(message, category, filename, lineno, line=None):
        if os.path.realpath(filename).startswith(_PACKAGE + os.sep):
            return f"warning: {message}\n"
        return original(message, category, filename, lineno, line)

    warnings.formatwarning = one_line_warning
    try:
        yield
    finally:
        warnings.formatwarning = original


__all__ = ["run_reported", "report", "one_line", "close_progress_bars"]
