"""Per-entity few-shot windows.

Each entity (a user by default) has at most one open window. Events join it in arrival order; when it
holds K shots it closes (tumbling) and the pipeline adapts it. The last Q shots (scaled for shorter
windows) are the query set, the rest the support set: the gate checks on the *later* data, as serving
would face it.
A window older than `max_age_s` in event time closes too, and so does the least recently touched window
when more than `max_entities` are open (memory stays flat however many distinct entities arrive).

The store also answers, per source partition, the lowest offset still held in an open window: the
source may only commit below it, so a crash re-reads those events instead of losing them.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from stream_adapt.config import WindowConfig
from stream_adapt.events import Position


class Shot(NamedTuple):
    """One event inside a window, with what the model predicted for it before it joined."""

    counterpart: int  # model index of the item (user, for item entities)
    value: float
    timestamp: float
    position: Position
    prediction: float  # prequential prediction (test-then-train)


@dataclass(slots=True, eq=False)
class Window:
    """An entity's open window. `seq` identifies it in the store's lazy heaps."""

    entity: str
    seq: int
    opened_at: float
    shots: list[Shot] = field(default_factory=list)
    first_offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # per partition
    last_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    closed_at: float | None = None  # wall time when it left the store (for latency: closed -> delivered)

    def split(self, cfg: WindowConfig) -> tuple[list[Shot], list[Shot]]:
        """(support, query): the last Q*n/K shots (rounded, at least 1) of n are the query."""
        n = len(self.shots)
        q = max(1, round(n * cfg.query_shots / cfg.shots))
        return self.shots[: n - q], self.shots[n - q :]


class WindowStore:
    """Open windows by entity, with LRU bound, max-age closing and per-partition low watermarks."""

    def __init__(self, cfg: WindowConfig):
        self.cfg = cfg
        self._open: OrderedDict[str, Window] = OrderedDict()
        self._by_seq: dict[int, Window] = {}
        self._seq = 0
        self._age_heap: list[tuple[float, int]] = []
        self._offset_heaps: dict[tuple[str, int], list[tuple[int, int]]] = {}
        self._evicted: list[Window] = []
        self.open_events = 0

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Iterator[Window]:
        return iter(self._open.values())

    def get(self, entity: str) -> Window | None:
        return self._open.get(entity)

    def holds(self, entity: str, position: Position) -> bool:
        """True if the entity's open window already holds this position (a re-delivery)."""
        window = self._open.get(entity)
        if window is None:
            return False
        last = window.last_offsets.get((position[0], position[1]))
        return last is not None and position[2] <= last

    def add(self, entity: str, shot: Shot) -> Window | None:
        """Append a shot. Returns the window, removed from the store, when this shot fills it."""
        window = self._open.get(entity)
        if window is None:
            self._seq += 1
            window = Window(entity, self._seq, shot.timestamp)
            self._open[entity] = window
            self._by_seq[window.seq] = window
            heapq.heappush(self._age_heap, (shot.timestamp, window.seq))
            if len(self._open) > self.cfg.max_entities:
                _, oldest = self._open.popitem(last=False)
                self._forget(oldest)
                self._evicted.append(oldest)
        else:
            self._open.move_to_end(entity)
        topic, partition, offset = shot.position
        tp = (topic, partition)
        if tp not in window.first_offsets:
            window.first_offsets[tp] = offset
            heapq.heappush(self._offset_heaps.setdefault(tp, []), (offset, window.seq))
        window.last_offsets[tp] = offset
        window.shots.append(shot)
        self.open_events += 1
        if len(self._age_heap) > 2 * len(self._open) + 1024:
            self._compact()
        if len(window.shots) >= self.cfg.shots:
            return self.take(entity)
        return None

    def take(self, entity: str) -> Window | None:
        """Remove and return an entity's open window (to adapt it now), if any."""
        window = self._open.pop(entity, None)
        if window is not None:
            self._forget(window)
        return window

    def due(self, now: float) -> list[Window]:
        """Remove and return windows opened more than `max_age_s` before `now` (event time)."""
        out = []
        horizon = now - self.cfg.max_age_s
        heap = self._age_heap
        while heap and heap[0][0] <= horizon:
            _, seq = heapq.heappop(heap)
            window = self._by_seq.get(seq)
            if window is not None:
                del self._open[window.entity]
                self._forget(window)
                out.append(window)
        return out

    def drop_partitions(self, partitions: set[tuple[str, int]]) -> list[Window]:
        """Remove and return the open windows holding events of these partitions (revoked)."""
        gone = [w for w in self._open.values() if partitions.intersection(w.first_offsets)]
        for window in gone:
            del self._open[window.entity]
            self._forget(window)
        return gone

    def drain_evicted(self) -> list[Window]:
        """Windows pushed out by the `max_entities` bound since the last call."""
        out, self._evicted = self._evicted, []
        return out

    def low_watermarks(self) -> dict[tuple[str, int], int]:
        """Per (topic, partition): the lowest offset held in an open window (absent: none held)."""
        marks = {}
        for tp, heap in self._offset_heaps.items():
            while heap and heap[0][1] not in self._by_seq:
                heapq.heappop(heap)
            if heap:
                marks[tp] = heap[0][0]
        return marks

    def _compact(self) -> None:
        """Drop heap entries of closed windows (lazy deletion would otherwise grow with throughput)."""
        self._age_heap = [(w.opened_at, w.seq) for w in self._open.values()]
        heapq.heapify(self._age_heap)
        heaps: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for w in self._open.values():
            for tp, offset in w.first_offsets.items():
                heaps.setdefault(tp, []).append((offset, w.seq))
        for heap in heaps.values():
            heapq.heapify(heap)
        self._offset_heaps = heaps

    def _forget(self, window: Window) -> None:
        window.closed_at = time.time()
        del self._by_seq[window.seq]
        self.open_events -= len(window.shots)
