"""The one loop: source -> pipeline -> sink -> commit, with observers (metrics, progress) on the side.

A batch's offsets are committed only after the sink confirms that everything derived from it (updates,
adaptation log, dead letters) is delivered, and never past an event still held in an open window
(`Pipeline.safe_offsets`). So a crash at any point re-reads, and never loses, feedback.

The Kafka service plugs in through three seams: `commit` (how offsets are made durable: a consumer
commit after the sink's flush, or a Kafka transaction), `hooks` (work between batches: following the
shared adapter, backpressure) and `commit_now` / `forget` (what a rebalance needs).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from stream_adapt.events import DecodeError, Record
from stream_adapt.faults import failpoint
from stream_adapt.io.ports import Sink, Source, TopicPartition
from stream_adapt.learning.pipeline import BatchResult, Pipeline
from stream_adapt.learning.stats import RunStats

log = logging.getLogger(__name__)

Observer = Callable[[BatchResult], None]
#: Makes offsets durable once the sink confirmed everything before them; False if it could not.
CommitFn = Callable[[Mapping[TopicPartition, int]], bool]


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
    hooks: list[Callable[[], None]] = field(default_factory=list)
    commit: CommitFn | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)
    stats: RunStats = field(default_factory=RunStats)
    pending: dict[TopicPartition, int] = field(default_factory=dict)  # next offset per partition handled
    _last_commit: float = 0.0
    _dirty: bool = False  # batches handled since the last commit

    def stop(self) -> None:
        """Ask the loop to finish the current batch, flush, commit and return."""
        self.stop_event.set()

    def run(self) -> RunStats:
        opts = self.options
        deadline = time.monotonic() + opts.max_seconds if opts.max_seconds else None
        self._last_commit = time.monotonic()
        while not self.stop_event.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            if opts.max_records is not None and self.stats.records >= opts.max_records:
                break
            for hook in self.hooks:
                hook()
            items = self.source.poll_batch(opts.batch_size, opts.poll_timeout_s)
            if not items:
                if self.source.exhausted:
                    if opts.drain_at_end:
                        self._handle(self.pipeline.drain())
                    break
                self._maybe_commit()
                continue
            for item in items:
                _note_offset(self.pending, item)
            result = self.pipeline.process(items)
            failpoint("mid_batch")
            self._handle(result)
            self._maybe_commit()
        self.commit_now()
        return self.stats

    def _handle(self, result: BatchResult) -> None:
        self._dirty = True
        self.sink.publish(result)
        self.stats.add(result)
        for observe in self.observers:
            observe(result)

    def _maybe_commit(self) -> None:
        if time.monotonic() - self._last_commit >= self.options.commit_interval_s:
            self.commit_now()

    def commit_now(self, partitions: Iterable[TopicPartition] | None = None) -> bool:
        """Flush the sink and commit what it confirmed (all partitions, or only `partitions`)."""
        self._last_commit = time.monotonic()
        offsets = self.pipeline.safe_offsets(self.pending)
        if partitions is not None:
            wanted = set(partitions)
            offsets = {tp: o for tp, o in offsets.items() if tp in wanted}
        if self.commit is not None:
            return self.commit(offsets)
        if not self.sink.flush(self.options.flush_timeout_s):
            # Not always after the whole timeout: flush() returns as soon as what it waited for failed.
            log.warning("sink did not confirm every delivery (failed ones are resent); not committing")
            return False
        if offsets:
            if self._dirty:
                failpoint("after_publish")
            self.source.commit(offsets)
            if self._dirty:
                failpoint("after_commit")
        self._dirty = False
        return True

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Stop tracking partitions this member no longer owns."""
        for tp in partitions:
            self.pending.pop(tp, None)


def _note_offset(pending: dict[TopicPartition, int], item: Record | DecodeError) -> None:
    topic, partition, offset = item.position
    tp = (topic, partition)
    if offset + 1 > pending.get(tp, -1):
        pending[tp] = offset + 1
