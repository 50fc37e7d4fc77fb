"""Failpoints: exact places where a test can make the process die as `kill -9` would.

`STREAM_ADAPT_FAILPOINTS="after_publish=3,mid_batch=5"` kills the process with SIGKILL the 3rd time it
reaches `after_publish` (or the 5th `mid_batch`). Unset (production), a failpoint is one dict lookup.
Crash tests use them to stop at the exact moments that matter: between processing and publishing,
between publishing and committing, in the middle of a rebalance.
"""

from __future__ import annotations

import os
import random
import signal

#: The failpoints the service has, for documentation and validation.
FAILPOINTS = ("mid_batch", "after_publish", "after_commit", "in_revoke", "in_assign")
#: Where a kill loop kills a member: the failpoints that bracket processing, publishing and committing,
#: or ("random_time") a SIGKILL from outside at a random moment of its work.
KILL_POINTS = ("mid_batch", "after_publish", "after_commit", "random_time")


def kill_plan(seed: int, n: int) -> list[tuple[str, float]]:
    """`n` seeded kill points: (failpoint name, how many times it is reached first) or ("random_time",
    seconds after the member's assignment). Shared by the kill-loop test and benchmark."""
    rng = random.Random(seed)
    plan: list[tuple[str, float]] = []
    for _ in range(n):
        point = rng.choice(KILL_POINTS)
        plan.append((point, round(rng.uniform(0.5, 3.0), 2) if point == "random_time" else rng.randint(1, 4)))
    return plan


def _parse(spec: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, count = part.partition("=")
        if name not in FAILPOINTS:
            raise ValueError(f"unknown failpoint {name!r}; known: {', '.join(FAILPOINTS)}")
        out[name] = int(count or 1)
    return out


_armed = _parse(os.environ.get("STREAM_ADAPT_FAILPOINTS", ""))
_hits: dict[str, int] = {}


def failpoint(name: str) -> None:
    """Die here (SIGKILL) if this failpoint is armed and reached its count."""
    if not _armed:
        return
    target = _armed.get(name)
    if target is None:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= target:
        os.kill(os.getpid(), signal.SIGKILL)
