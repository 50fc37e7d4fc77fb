"""Running totals over `BatchResult`s, and the run summary (printed, and written as JSON)."""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from stream_adapt.learning.pipeline import BatchResult


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


@dataclass
class RunStats:
    """Accumulates batch results; `summary()` is the machine-readable run report."""

    started: float = field(default_factory=time.perf_counter)
    records: int = 0
    events: int = 0
    learned: int = 0
    ignored: int = 0
    already_applied: int = 0
    windows_filled: int = 0
    invalid: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    rollbacks: Counter[str] = field(default_factory=Counter)
    triggers: Counter[str] = field(default_factory=Counter)
    entity_drifts: int = 0
    global_drifts: int = 0
    global_versions: int = 0
    updates: int = 0
    abs_err: float = 0.0
    sq_err: float = 0.0
    base_abs_err: float = 0.0
    base_sq_err: float = 0.0
    query_n: int = 0
    query_abs_before: float = 0.0
    query_abs_after: float = 0.0
    adapt_batches: int = 0
    adapted_windows: int = 0
    adapt_seconds: float = 0.0
    stage_seconds: Counter[str] = field(default_factory=Counter)

    def add(self, r: BatchResult) -> None:
        self.records += r.records
        self.events += r.events
        self.learned += r.learned
        self.ignored += r.ignored
        self.already_applied += r.already_applied
        self.windows_filled += r.windows_filled
        self.invalid.update(d.reason for d in r.dead_letters)
        for rec in r.log:
            self.outcomes[rec.outcome] += 1
            self.triggers[rec.trigger] += 1
            if rec.outcome == "rolled_back":
                self.rollbacks[rec.reason] += 1
            if rec.entity_kind == "global" and rec.outcome == "accepted":
                self.global_versions += 1
        self.entity_drifts += r.entity_drifts
        self.global_drifts += r.global_drifts
        self.updates += len(r.updates)
        self.abs_err += r.abs_err
        self.sq_err += r.sq_err
        self.base_abs_err += r.base_abs_err
        self.base_sq_err += r.base_sq_err
        self.query_n += r.query_n
        self.query_abs_before += r.query_abs_before
        self.query_abs_after += r.query_abs_after
        self.adapt_batches += len(r.adapt_batch_sizes)
        self.adapted_windows += sum(r.adapt_batch_sizes)
        self.adapt_seconds += r.adapt_seconds
        self.stage_seconds.update(r.stage_seconds)

    def summary(self, open_windows: int = 0, pending_events: int = 0) -> dict[str, Any]:
        seconds = time.perf_counter() - self.started
        n = self.learned

        def rmse(sq: float) -> float | None:
            v = _ratio(sq, n)
            return math.sqrt(v) if v is not None else None

        return {
            "records": self.records,
            "events": self.events,
            "invalid": sum(self.invalid.values()),
            "invalid_by_reason": dict(sorted(self.invalid.items())),
            "ignored": self.ignored,
            "already_applied": self.already_applied,
            "learned": self.learned,
            "windows_filled": self.windows_filled,
            "windows_open": open_windows,
            "events_pending": pending_events,
            "adaptations": {
                "accepted": self.outcomes["accepted"],
                "rolled_back": self.outcomes["rolled_back"],
                "expired": self.outcomes["expired"],
                "rolled_back_by_reason": dict(sorted(self.rollbacks.items())),
                "by_trigger": dict(sorted(self.triggers.items())),
                "batches": self.adapt_batches,
                "mean_batch_size": _ratio(self.adapted_windows, self.adapt_batches),
            },
            "drift": {
                "entity": self.entity_drifts,
                "global": self.global_drifts,
                "global_versions": self.global_versions,
            },
            "updates_published": self.updates,
            # Query shots of adapted windows: error as scored before they joined the window (prequential),
            # and with the adapter the gate chose. The gate sees these shots, so `mae_after` is optimistic;
            # the unbiased lift is `prequential` (every event scored before it is learned from).
            "mae_before": _ratio(self.query_abs_before, self.query_n),
            "mae_after": _ratio(self.query_abs_after, self.query_n),
            "prequential": {
                "mae": _ratio(self.abs_err, n),
                "rmse": rmse(self.sq_err),
                "mae_no_adaptation": _ratio(self.base_abs_err, n),
                "rmse_no_adaptation": rmse(self.base_sq_err),
            },
            "seconds": seconds,
            "events_per_s": _ratio(self.records, seconds),
            "stage_seconds": {k: round(v, 4) for k, v in sorted(self.stage_seconds.items())},
        }


def format_summary(s: dict[str, Any]) -> str:
    """The summary for people: a few aligned lines."""

    def f(x: float | None, digits: int = 4) -> str:
        return "n/a" if x is None else f"{x:.{digits}f}"

    a, d, p = s["adaptations"], s["drift"], s["prequential"]
    invalid = ", ".join(f"{k} {v}" for k, v in s["invalid_by_reason"].items()) or "none"
    rolled = ", ".join(f"{k} {v}" for k, v in a["rolled_back_by_reason"].items()) or "none"
    lines = [
        f"records            {s['records']:>10}   ({f(s['events_per_s'], 0)} records/s over {s['seconds']:.1f}s)",
        f"valid events       {s['events']:>10}   learned {s['learned']}, ignored type {s['ignored']}, "
        f"already applied {s['already_applied']}",
        f"dead letters       {s['invalid']:>10}   {invalid}",
        f"windows filled     {s['windows_filled']:>10}   open at end {s['windows_open']} "
        f"({s['events_pending']} events pending)",
        f"adaptations        {a['accepted'] + a['rolled_back']:>10}   accepted {a['accepted']}, rolled back "
        f"{a['rolled_back']} ({rolled}), expired windows {a['expired']}",
        f"drift detections   {d['entity'] + d['global']:>10}   entity {d['entity']}, global {d['global']} "
        f"(global versions {d['global_versions']})",
        f"updates published  {s['updates_published']:>10}",
        f"query-shot MAE         before {f(s['mae_before'])}  after {f(s['mae_after'])}",
        f"prequential MAE        adapted {f(p['mae'])}  no adaptation {f(p['mae_no_adaptation'])}   "
        f"RMSE {f(p['rmse'])} vs {f(p['rmse_no_adaptation'])}",
    ]
    return "\n".join(lines)
