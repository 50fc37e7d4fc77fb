"""Progress lines for people watching a run in a terminal (stderr, at most one every `every_s`)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from stream_adapt.learning.pipeline import BatchResult
from stream_adapt.learning.stats import RunStats


class ProgressPrinter:
    """An observer: prints throughput and outcome counts as the run goes."""

    def __init__(self, stats: RunStats, every_s: float = 2.0, stream: TextIO | None = None, total: int | None = None):
        self.stats = stats
        self.every_s = every_s
        self.stream = stream or sys.stderr
        self.total = total
        self._last = time.monotonic()
        self._last_records = 0

    def __call__(self, result: BatchResult) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        s = self.stats
        rate = (s.records - self._last_records) / (now - self._last)
        self._last, self._last_records = now, s.records
        done = f"{s.records:>9}" + (f"/{self.total} ({100 * s.records / self.total:.0f}%)" if self.total else "")
        mae = f"{s.abs_err / s.learned:.3f}" if s.learned else "n/a"
        self.stream.write(
            f"  {done} records  {rate:>8.0f}/s  accepted {s.outcomes['accepted']:>6}  "
            f"rolled back {s.outcomes['rolled_back']:>6}  drift {s.entity_drifts}+{s.global_drifts}  "
            f"dead letters {sum(s.invalid.values())}  prequential MAE {mae}\n"
        )
        self.stream.flush()
