"""Per-entity adapter state: the current adapter, its version and what it has consumed.

Adapters live as rows of one tensor per adapter name, so gathering the adapters of the N events of a
batch is one `index_select`, not N dictionary look-ups of small tensors. Only entities that have had a
window adapted (accepted or rolled back) have an entry; the rest start from the model's initial
adapter. Memory: ~(4 bytes x adapter size, up to twice that as the rows grow by doubling, + ~550 bytes)
per such entity (measured: 555 bytes of Python objects with one input partition).

`consumed[(topic, partition)]` is the highest offset of that entity's events already used by an
outcome. After a crash the source re-reads from its last commit; events at or below the mark are
recognised and not applied twice (effectively-once application on at-least-once delivery).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from stream_adapt.events import Position
from stream_adapt.learning.models import AdaptableModel, Adapter


@dataclass(slots=True)
class EntityState:
    row: int = -1  # row in the adapter tensors, -1 until a version is accepted
    version: int = 0  # last accepted version (0: none)
    consumed: dict[tuple[str, int], int] = field(default_factory=dict)
    last_accepted_at: float = float("-inf")  # event time of the last accepted window
    partition: tuple[str, int] | None = None  # the source partition its events last came from


class AdapterTable:
    """Adapters of all entities that have any, in growable row tensors."""

    def __init__(self, spec: dict[str, tuple[int, ...]], capacity: int = 1024):
        self.spec = spec
        self._data = {name: torch.zeros((capacity, *shape)) for name, shape in spec.items()}
        self._rows = 0
        self._free: list[int] = []  # rows of dropped entities, reused before the table grows
        self.entities: dict[str, EntityState] = {}

    def __len__(self) -> int:
        return len(self.entities)

    @property
    def allocated_rows(self) -> int:
        """Adapter rows handed out so far (in use, or freed by `drop_partitions` and reusable)."""
        return self._rows

    def state(self, entity: str) -> EntityState | None:
        return self.entities.get(entity)

    def version(self, entity: str) -> int:
        st = self.entities.get(entity)
        return st.version if st else 0

    def is_consumed(self, entity: str, position: Position) -> bool:
        """True if this entity already used the event at `position` (a re-delivery after a crash)."""
        st = self.entities.get(entity)
        if st is None:
            return False
        mark = st.consumed.get((position[0], position[1]))
        return mark is not None and position[2] <= mark

    def gather(self, model: AdaptableModel, entities: Sequence[str], entity_idx: Tensor) -> Adapter:
        """Current adapters for N (possibly repeated) entities: tensors [N, ...]."""
        adapter = model.initial_adapter(entity_idx)
        get = self.entities.get
        rows = [st.row if (st := get(e)) is not None else -1 for e in entities]
        if self._rows and any(r >= 0 for r in rows):
            rows_t = torch.tensor(rows, dtype=torch.long)
            has = rows_t >= 0
            src = rows_t[has]
            for name, data in self._data.items():
                adapter[name][has] = data[src]
        return adapter

    def mark_consumed(self, entity: str, positions: Iterable[Position]) -> EntityState:
        st = self.entities.get(entity)
        if st is None:
            st = self.entities[entity] = EntityState()
        consumed = st.consumed
        tp: tuple[str, int] | None = None
        for topic, partition, offset in positions:
            tp = (topic, partition)
            if offset > consumed.get(tp, -1):
                consumed[tp] = offset
        if tp is not None:
            st.partition = tp
        return st

    def drop_partitions(self, partitions: set[tuple[str, int]]) -> int:
        """Forget the entities whose events came from these partitions (now owned elsewhere)."""
        gone = [e for e, st in self.entities.items() if st.partition in partitions]
        for entity in gone:
            row = self.entities.pop(entity).row
            if row >= 0:  # reused by the next entity that needs one: rebalances must not grow the table
                self._free.append(row)
        return len(gone)

    def put(self, entity: str, adapter_row: Adapter, version: int, event_time: float | None = None) -> None:
        """Store an accepted adapter (tensors without the batch dimension) as `version`."""
        st = self.entities.get(entity)
        if st is None:
            st = self.entities[entity] = EntityState()
        if st.row < 0:
            st.row = self._allocate()
        for name, data in self._data.items():
            data[st.row] = adapter_row[name]
        st.version = version
        if event_time is not None:
            st.last_accepted_at = event_time

    def put_many(self, entities: list[str], adapters: Adapter) -> None:
        """Store the adapters [N, ...] of N distinct entities whose versions the caller already set."""
        rows = []
        for entity in entities:
            st = self.entities.get(entity)
            if st is None:
                st = self.entities[entity] = EntityState()
            if st.row < 0:
                st.row = self._allocate()
            rows.append(st.row)
        index = torch.tensor(rows, dtype=torch.long)
        for name, data in self._data.items():
            data.index_copy_(0, index, adapters[name].to(data.dtype))

    def get(self, entity: str) -> Adapter | None:
        """The stored adapter of one entity (a copy), or None."""
        st = self.entities.get(entity)
        if st is None or st.row < 0:
            return None
        return {name: data[st.row].clone() for name, data in self._data.items()}

    def _allocate(self) -> int:
        if self._free:
            return self._free.pop()
        if self._rows == next(iter(self._data.values())).shape[0]:
            for name, data in self._data.items():
                grown = torch.zeros((2 * data.shape[0], *data.shape[1:]))
                grown[: data.shape[0]] = data
                self._data[name] = grown
        self._rows += 1
        return self._rows - 1
