"""Event-log files as a `Source`, so a historical log replays through the same runner as a live topic.

`FileSource` hands out the items of `datasets.iter_records`: `Record`s *and* `DecodeError` values (a
line that is not even a row of fields). The pipeline accepts both, so a malformed line is
dead-lettered like any undecodable Kafka record instead of stopping the run. A file is one partition,
`(topic, 0)`, whose offsets are line numbers - 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import islice
from pathlib import Path
from types import TracebackType

from stream_adapt.datasets import AUTO, iter_records
from stream_adapt.events import DecodeError
from stream_adapt.io.ports import Record, TopicPartition


class FileSource:
    """A `Source` over one event-log file (any format of `datasets.FORMATS`, optionally gzipped).

    A file has no broker: `commit` only remembers the committed next-offsets (see `committed`) for the
    runner to persist. To resume, pass that next-offset as `start_offset`: lines before it are
    skipped, so the first item returned is the first line not yet handled (no gap, no repeat).
    """

    def __init__(
        self,
        path: str | Path,
        fmt: str = AUTO,
        *,
        topic: str | None = None,
        start_offset: int = 0,
        id_prefix: str | None = None,
    ) -> None:
        """Open the file now, so a missing file or a bad header fails at construction, not mid-run."""
        self.path = Path(path)
        self.topic = topic or str(path)
        self._items = iter_records(self.path, fmt, topic=self.topic, start_offset=start_offset, id_prefix=id_prefix)
        self._head: Record | DecodeError | None = None  # read ahead, so `exhausted` is exact
        self._at_end = False
        self._closed = False
        self._committed: dict[TopicPartition, int] = {}

    def _fill_head(self) -> None:
        if self._head is None and not self._at_end:
            self._head = next(self._items, None)
            self._at_end = self._head is None

    def poll_batch(self, max_records: int, timeout_s: float = 0.0) -> list[Record | DecodeError]:
        """The next up to `max_records` items in file order. Never waits: `timeout_s` is ignored."""
        if self._closed or max_records <= 0:
            return []
        self._fill_head()
        if self._head is None:
            return []
        batch = [self._head]
        self._head = None
        batch.extend(islice(self._items, max_records - 1))
        return batch

    @property
    def exhausted(self) -> bool:
        """True once every line has been handed out (known as soon as the last batch is returned)."""
        if self._closed:
            return True
        self._fill_head()
        return self._at_end

    def commit(self, next_offsets: Mapping[TopicPartition, int]) -> None:
        """Remember the committed next-offsets (the runner decides what is safe; a file needs no more)."""
        self._committed.update(next_offsets)

    @property
    def committed(self) -> dict[TopicPartition, int]:
        """The last committed next-offset per (topic, partition): a copy."""
        return dict(self._committed)

    def close(self) -> None:
        """Close the file. Idempotent; afterwards the source is exhausted."""
        if not self._closed:
            self._closed = True
            self._items.close()  # closes the file

    def __enter__(self) -> FileSource:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
