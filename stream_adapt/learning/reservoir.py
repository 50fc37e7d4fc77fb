"""The recent events the shared (global) part is re-adapted on, with a cap on each entity's share.

A plain "last N events" buffer lets one hot entity own it: a burst of 500 adversarial ratings from a
single user filled a 512-event reservoir and the global re-adaptation then moved the global bias by
0.75 for everyone (measured in `tests/unit/test_poisoning.py`). The shared part is meant to follow the
*population* (popularity shifts), so each entity may hold at most `cap` of the reservoir's events:
further events of that entity are skipped until its older ones have aged out.

Cost: one dict look-up and increment per event; memory is bounded by the reservoir's size (the
counts only cover entities present in it).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

#: One sampled event: (entity, counterpart index, target value).
Sample = tuple[str, int, float]


class CappedReservoir:
    """The most recent `size` events, with at most `cap` per entity (a sliding window, not random)."""

    __slots__ = ("_counts", "_events", "cap", "skipped")

    def __init__(self, size: int, cap: int):
        if size < 1 or cap < 1:
            raise ValueError(f"need size >= 1 and cap >= 1, got size={size}, cap={cap}")
        self._events: deque[Sample] = deque(maxlen=size)
        self._counts: dict[str, int] = {}
        self.cap = cap
        self.skipped = 0  # events not kept because their entity held `cap` already

    def append(self, sample: Sample) -> bool:
        """Keep `sample` unless its entity already holds `cap` events. Returns True if kept."""
        entity = sample[0]
        counts = self._counts
        held = counts.get(entity, 0)
        if held >= self.cap:
            self.skipped += 1
            return False
        events = self._events
        if len(events) == events.maxlen:  # the oldest event leaves: its entity's count drops
            oldest = events[0][0]
            left = counts[oldest] - 1
            if left:
                counts[oldest] = left
            else:
                del counts[oldest]
        events.append(sample)
        counts[entity] = counts.get(entity, 0) + 1  # re-read: the event that left may have been its own
        return True

    def held(self, entity: str) -> int:
        """How many of `entity`'s events the reservoir holds."""
        return self._counts.get(entity, 0)

    def __len__(self) -> int:
        return len(self._events)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._events)
