"""The one loop: source -> pipeline -> sink -> commit, with observers (metrics, progress) on the side.

A batch's offsets are committed only after the sink confirms that everything derived from it (updates,
adaptation log, dead letters) is delivered, and never past an event still held in an open window
(`Pipeline.safe_offsets`). So a crash at any point re-reads, and never loses, feedback.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from stream_adapt.events import DecodeError
from stream_adapt.io.ports import Record, Sink, Source, TopicPartition
from stream_adapt.learning.pipeline import BatchResult, Pipeline
from stream_adapt.learning.stats import RunStats

log = logging.getLogger(__name__)

Observer = Callable[[BatchResult], None]


@dataclass
class RunOptions:
    batch_size: int = 2000
    poll_timeout_s: float = 0.5
    flush_timeout_s: float = 30.0
    commit_interval_s: float = 1.0  # flush the sink and commit at most this often (and at the end)
    drain_at_end: bool = True  # for finite sources: adapt what the open windows hold at the end
    max_seconds: float | None = None
    max_records: int | None = None


@dataclass
class Runner:
    source: Source
    pipeline: Pipeline
    sink: Sink
    options: RunOptions = field(default_factory=RunOptions)
    observers: list[Observer] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)
    stats: RunStats = field(default_factory=RunStats)
    _last_commit: float = 0.0

    def stop(self) -> None:
        """Ask the loop to finish the current batch, flush, commit and return."""
        self.stop_event.set()

    def run(self) -> RunStats:
        opts = self.options
        deadline = time.monotonic() + opts.max_seconds if opts.max_seconds else None
        pending: dict[TopicPartition, int] = {}
        self._last_commit = time.monotonic()
        while not self.stop_event.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            if opts.max_records is not None and self.stats.records >= opts.max_records:
                break
            items = self.source.poll_batch(opts.batch_size, opts.poll_timeout_s)
            if not items:
                if self.source.exhausted:
                    if opts.drain_at_end:
                        self._handle(self.pipeline.drain())
                    break
                self._maybe_commit(pending)
                continue
            for item in items:
                _note_offset(pending, item)
            self._handle(self.pipeline.process(items))
            self._maybe_commit(pending)
        self._maybe_commit(pending, force=True)
        return self.stats

    def _handle(self, result: BatchResult) -> None:
        self.sink.publish(result)
        self.stats.add(result)
        for observe in self.observers:
            observe(result)

    def _maybe_commit(self, pending: dict[TopicPartition, int], force: bool = False) -> None:
        """Flush the sink, then commit what it confirmed: never past an event held in an open window."""
        now = time.monotonic()
        if not force and now - self._last_commit < self.options.commit_interval_s:
            return
        self._last_commit = now
        if self.sink.flush(self.options.flush_timeout_s):
            if pending:
                self.source.commit(self.pipeline.safe_offsets(pending))
        else:
            log.warning("sink did not confirm delivery within %.0fs; not committing", self.options.flush_timeout_s)


def _note_offset(pending: dict[TopicPartition, int], item: Record | DecodeError) -> None:
    topic, partition, offset = item.position
    tp = (topic, partition)
    if offset + 1 > pending.get(tp, -1):
        pending[tp] = offset + 1
