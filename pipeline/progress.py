"""A stage's progress line on the driver: done/total, rate and ETA, printed at most every INTERVAL_S seconds.

    progress = Progress("[score-ref] train", total=60_000, unit="pairs")
    for block in blocks:
        progress.add(block.num_rows)      # "[score-ref] train: 1,024/60,000 pairs (2%), 320 pairs/s, ETA 3m04s"

A line, not a redrawn bar, so that a log file holds one line per interval as a terminal does.
"""

from __future__ import annotations

import math
import os
import time

INTERVAL_S = float(os.environ.get("DPO_PROGRESS_INTERVAL_S", "10"))


class Progress:
    """`total` None: a count without an end (a Ray Data actor's share of a stream): done and rate only."""

    def __init__(self, label: str, total: int | None, unit: str):
        self.label, self.total, self.unit = label, total, unit
        self.done = 0
        self.start = self.last = time.monotonic()

    def add(self, n: int) -> None:
        """Count n more; print the line when INTERVAL_S has passed since the last one (never for the last
        item: the stage's own summary line says that)."""
        self.done += n
        now = time.monotonic()
        if now - self.last >= INTERVAL_S and (self.total is None or self.done < self.total):
            self.last = now
            print(self.line(now), flush=True)

    def line(self, now: float) -> str:
        rate = self.done / (now - self.start) if now > self.start else 0.0
        if self.total is None:
            return f"{self.label}: {self.done:,} {self.unit}, {rate:.1f} {self.unit}/s"
        eta = (self.total - self.done) / rate if rate else float("nan")
        return (
            f"{self.label}: {self.done:,}/{self.total:,} {self.unit} ({100 * self.done / max(self.total, 1):.0f}%), "
            f"{rate:.1f} {self.unit}/s, ETA {eta_text(eta)}"
        )


def eta_text(seconds: float) -> str:
    """`4m07s`, or `?` when there is no rate yet (inf or NaN)."""
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"
