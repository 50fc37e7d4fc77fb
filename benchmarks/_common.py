"""Shared helpers of the benchmark scripts: JSON output and interleaved repeats (median)."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", type=Path, help="also write the result JSON to this file")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; medians are reported")
    return p


def timed(fn: Callable[[], int]) -> float:
    """Units per second of one call of `fn`, which returns how many units it processed."""
    t0 = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t0)


def interleaved(runs: dict[str, Callable[[], int]], repeats: int) -> dict[str, list[float]]:
    """Run each contender once per round, rounds repeated: noise on a shared machine hits all alike."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            rates[name].append(timed(fn))
    return rates


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def emit(result: dict[str, Any], path: Path | None) -> None:
    result["machine"] = {"python": platform.python_version(), "platform": platform.platform()}
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        path.write_text(text + "\n")
    sys.stdout.flush()
