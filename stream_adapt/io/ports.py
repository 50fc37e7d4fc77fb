"""The seam between I/O and learning: small `Source` and `Sink` protocols and the record envelope.

A `Source` yields batches of raw `Record`s (bytes + position) and commits positions the runner says
are safe. A `Sink` receives a `BatchResult` (updates, adaptation log, dead letters) and must report
whether everything handed to it is durably delivered before the runner commits past it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from stream_adapt.events import DecodeError, Record

__all__ = ["Record", "Sink", "Source", "TopicPartition"]

if TYPE_CHECKING:
    from stream_adapt.learning.pipeline import BatchResult

#: A topic partition: (topic, partition).
TopicPartition = tuple[str, int]


@runtime_checkable
class Source(Protocol):
    """Where feedback records come from."""

    def poll_batch(self, max_records: int, timeout_s: float) -> Sequence[Record | DecodeError]:
        """Up to `max_records` records; empty when none arrived within `timeout_s`.

        A source may hand over records it already knows are bad (a malformed file line) as
        `DecodeError` values; the pipeline dead-letters them like any other bad record.
        """
        ...

    @property
    def exhausted(self) -> bool:
        """True when no more records will ever come (end of a file; never for Kafka)."""
        ...

    def commit(self, next_offsets: Mapping[TopicPartition, int]) -> None:
        """Record that every record before `next_offsets[tp]` is fully handled (Kafka semantics)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Sink(Protocol):
    """Where the results of the learning step go."""

    def publish(self, result: BatchResult) -> None:
        """Hand over one batch's updates, adaptation log records and dead letters (may be async)."""
        ...

    def flush(self, timeout_s: float) -> bool:
        """Block until everything published is delivered; False if some is still pending."""
        ...

    def close(self) -> None: ...
