"""Progress lines for long evaluations (feature extraction, generation): count, images/s and ETA on stderr.

    p = Progress("inception features (samples)", total=50_000)
    for batch in ...: ...; p.update(len(batch))     # prints at most every `every_s` seconds, and at the end

Only rank 0 of a torchrun job prints (its slice's count and speed). stdout stays clean for JSON results.
"""

from __future__ import annotations

import sys
import time


def format_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    def __init__(
        self,
        label: str,  # what is being counted, e.g. "inception/clean features of 10000 reference images"
        total: int,  # images to process (this rank's share)
        *,
        enabled: bool = True,  # False: silent (library default), True: print on rank 0
        every_s: float = 10.0,  # minimum seconds between two lines (the last line is always printed)
        stream=None,  # default sys.stderr
    ):
        from .. import dist

        self.label, self.total, self.every_s = label, int(total), every_s
        self.enabled = enabled and dist.rank() == 0
        self.stream = stream
        self.done, self.t0, self.last = 0, time.perf_counter(), -float("inf")

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100 * self.done / max(self.total, 1)
        tail = f"ETA {format_seconds(eta)}" if self.done < self.total else f"done in {format_seconds(elapsed)}"
        return f"[{self.label}] {self.done}/{self.total} images ({pct:.0f}%), {rate:.1f} img/s, {tail}"

    def update(self, n: int) -> None:
        self.done += int(n)
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.every_s or self.done >= self.total):
            self.last = now
            print(self.line(), file=self.stream or sys.stderr, flush=True)


def note(message: str, *, enabled: bool = True) -> None:
    """One status line on stderr (rank 0), e.g. where reference statistics are cached."""
    from .. import dist

    if enabled and dist.rank() == 0:
        print(message, file=sys.stderr, flush=True)
