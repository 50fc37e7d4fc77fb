"""Rewind a consumer group to a point in time: offsets by record timestamp, checked on the client.

`offsets_for_times` asks the broker for the first offset whose timestamp is >= T. Apache Kafka looks
that up in its time index (record CreateTime, unless the topic uses LogAppendTime) and answers -1
("no such record": the end) past the last record. Some brokers get it wrong: Tansu compares the time
the broker appended the record, and answers 0 for any time, where Kafka answers the end. A replayed
log's record timestamps are event times, far from append times, so the broker's answer is taken only
as a candidate and checked on the client:

- read the record at the candidate (its timestamp must be >= T) and the one before it (< T);
- if either check fails, binary-search the partition reading single records (about log2(n) reads).

The end of a partition comes from a fetch (the end-of-partition event), not `get_watermark_offsets`,
which Tansu also answers wrongly. The search is exact when record timestamps do not decrease along a
partition (true for a replay of a time-ordered log, since one entity's events stay in order in one
partition); otherwise it finds a point where they cross T, as close as a time lookup can be.

Moving a group's offsets under live members would race with their commits, so `rewind_group`
refuses while the group has members or is not `EMPTY`/`DEAD` (a crashed member counts until its
session times out), and the broker refuses the commit itself if a member joins in between.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    ConsumerGroupState,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from stream_adapt.config import KafkaConfig
from stream_adapt.errors import StreamAdaptError
from stream_adapt.io.admin import client_config
from stream_adapt.replay import format_timestamp, parse_timestamp

log = logging.getLogger(__name__)

#: The probing consumer's group id: it only assigns partitions; it never joins or commits.
_PROBE_GROUP: Final = "stream-adapt.rewind-probe"
#: librdkafka's "no committed offset" value.
_OFFSET_INVALID: Final = -1001
#: States in which nobody consumes for the group, so its offsets may be moved.
_IDLE_STATES: Final = frozenset({ConsumerGroupState.EMPTY, ConsumerGroupState.DEAD})
#: Commit errors that mean "the group has members": the broker refuses an admin commit then.
_MEMBER_ERRORS: Final = frozenset(
    {
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.NON_EMPTY_GROUP,
    }
)


class GroupActiveError(StreamAdaptError):
    """The group has active members: its offsets are not moved."""


@dataclass(frozen=True, slots=True)
class PartitionOffset:
    """Where one partition starts for a target time, and how that was found."""

    partition: int
    offset: int  # first offset whose record timestamp is >= the target; the end if none is
    timestamp_ms: int | None  # that record's timestamp (None at the end)
    broker_offset: int | None  # what offsets_for_times answered (the end for -1; None on error)
    corrected: bool  # the broker's answer was wrong: the offset was found by a client-side search
    reads: int  # single records read to check (and correct) it
    previous: int | None = None  # the group's committed offset before (None: none committed)


@dataclass(frozen=True, slots=True)
class RewindReport:
    """What `rewind_group` found and did."""

    group: str
    topic: str
    target_ms: int
    partitions: tuple[PartitionOffset, ...]
    committed: bool  # False for a dry run
    seconds: float

    def describe(self) -> str:
        """Lines for a person: one per partition, old -> new offset, and whether the broker was corrected."""
        verb = "moved" if self.committed else "would move (dry run)"
        lines = [f"group {self.group!r} on {self.topic!r} {verb} to {format_timestamp(self.target_ms / 1000)}:"]
        for p in self.partitions:
            before = "none" if p.previous is None else str(p.previous)
            at = (
                "end of partition"
                if p.timestamp_ms is None
                else f"record time {format_timestamp(p.timestamp_ms / 1000)}"
            )
            fix = f"; broker said {p.broker_offset}, corrected" if p.corrected else ""
            lines.append(f"  partition {p.partition}: {before} -> {p.offset} ({at}{fix})")
        corrected = sum(p.corrected for p in self.partitions)
        if corrected:
            lines.append(
                f"  the broker's time lookup was wrong for {corrected} of {len(self.partitions)} partitions "
                "(it compares append time, not record time); corrected from the records"
            )
        return "\n".join(lines)


def target_ms(target: float | str) -> int:
    """A target time as Kafka milliseconds: epoch seconds, or text for `parse_timestamp`."""
    seconds = parse_timestamp(target) if isinstance(target, str) else float(target)
    return round(seconds * 1000)


class _Prober:
    """Reads single records of one topic by offset with a group-less consumer (assign, never subscribe)."""

    def __init__(self, kafka: KafkaConfig, topic: str, timeout_s: float, overrides: Mapping[str, Any] | None):
        config = client_config(
            kafka,
            **{
                "group.id": _PROBE_GROUP,
                # A read at the end waits this long for data before the broker answers "end": keep it short.
                "fetch.wait.max.ms": 10,
                **(overrides or {}),
            },
        )
        config.update({"enable.partition.eof": True, "enable.auto.commit": False, "auto.offset.reset": "earliest"})
        self.consumer = Consumer(config)
        self.topic, self.timeout_s, self.servers = topic, timeout_s, kafka.bootstrap_servers
        self.reads = 0

    def partitions(self) -> list[int]:
        try:
            metadata = self.consumer.list_topics(self.topic, timeout=self.timeout_s)
        except KafkaException as exc:
            raise StreamAdaptError(f"Kafka at {self.servers} not reachable within {self.timeout_s:g}s: {exc}") from None
        info = metadata.topics.get(self.topic)
        if info is None or info.error is not None or not info.partitions:
            raise StreamAdaptError(f"topic {self.topic!r} does not exist at {self.servers}")
        return sorted(info.partitions)

    def read(self, partition: int, offset: int) -> tuple[int, int | None] | int:
        """The first record at or after `offset` as (offset, timestamp ms or None), or, if there is
        none, the partition's end offset as an int."""
        self.reads += 1
        self.consumer.assign([TopicPartition(self.topic, partition, offset)])
        return self._next(partition, offset, stop_at_record=True)

    def end(self, partition: int) -> int:
        """The partition's end, from the end-of-partition event of a fetch. Starting at OFFSET_END costs
        nothing on Kafka; on Tansu that logical offset resolves too low (the newest batch's base + 1), so
        the rest of that batch is read through."""
        self.reads += 1
        self.consumer.assign([TopicPartition(self.topic, partition, OFFSET_END)])
        found = self._next(partition, OFFSET_END, stop_at_record=False)
        assert isinstance(found, int)
        return found

    def _next(self, partition: int, offset: int, *, stop_at_record: bool) -> tuple[int, int | None] | int:
        deadline = time.monotonic() + self.timeout_s
        while (left := deadline - time.monotonic()) > 0:
            # consume() returns early only once it has num_messages: reading through to the end, ask
            # for many but wait briefly, or each call would sit out its whole timeout.
            batch, wait = (1, min(left, 0.5)) if stop_at_record else (500, min(left, 0.05))
            for msg in self.consumer.consume(num_messages=batch, timeout=wait):
                err = msg.error()
                if msg.partition() != partition:
                    continue
                if err is None:
                    if stop_at_record:
                        kind, ts = msg.timestamp()
                        return msg.offset() or 0, (None if kind == TIMESTAMP_NOT_AVAILABLE else ts)
                    continue
                if err.code() == KafkaError._PARTITION_EOF:
                    return msg.offset() or 0
                if err.fatal() or err.code() in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_PARTITION):
                    raise StreamAdaptError(f"cannot read {self.topic}[{partition}] at {self.servers}: {err.str()}")
                log.debug("transient error reading %s[%d]: %s", self.topic, partition, err.str())
        raise StreamAdaptError(f"no answer reading {self.topic}[{partition}]@{offset} within {self.timeout_s:g}s")

    def close(self) -> None:
        self.consumer.close()


def _locate(prober: _Prober, partition: int, target: int, broker: int | None) -> PartitionOffset:
    """The first offset of `partition` whose record timestamp is >= `target`, checking `broker`'s answer."""
    reads_before = prober.reads
    end = prober.end(partition)
    normal_broker = end if broker == OFFSET_END else broker
    first = prober.read(partition, OFFSET_BEGINNING)
    if isinstance(first, int):  # empty partition
        return PartitionOffset(
            partition, first, None, normal_broker, normal_broker != first, prober.reads - reads_before
        )
    start = first[0]
    seen: dict[int, tuple[int, int | None] | int] = {start: first}

    def at(offset: int) -> tuple[int, int | None] | None:
        """The first record at or after `offset`, None at the end."""
        if offset >= end:
            return None
        if offset not in seen:
            seen[offset] = prober.read(partition, offset)
        got = seen[offset]
        return None if isinstance(got, int) else got

    def reached(offset: int) -> bool:
        """True when the first record at or after `offset` is at or past the target (or there is none)."""
        record = at(offset)
        return record is None or (record[1] is not None and record[1] >= target)

    candidate = normal_broker
    if (
        candidate is not None
        and start <= candidate <= end
        and reached(candidate)
        and (candidate == start or not reached(candidate - 1))
    ):
        found = candidate
    else:
        lo, hi = start, end  # reached(end) holds; find the smallest offset that reaches the target
        while lo < hi:
            mid = (lo + hi) // 2
            if reached(mid):
                hi = mid
            else:
                lo = mid + 1
        found = lo
    record = at(found)
    offset, stamp = (found, None) if record is None else record
    return PartitionOffset(
        partition, offset, stamp, normal_broker, normal_broker != offset, prober.reads - reads_before
    )


def find_offsets(
    kafka: KafkaConfig,
    topic: str,
    target: float | str,
    *,
    partitions: Sequence[int] | None = None,
    timeout_s: float = 30.0,
    overrides: Mapping[str, Any] | None = None,
) -> list[PartitionOffset]:
    """Per partition of `topic` (default: all), the first offset whose record timestamp is >= `target`
    (epoch seconds, or ISO-8601 / epoch text), the end where no record is that late. Commits nothing."""
    want = target_ms(target)
    prober = _Prober(kafka, topic, timeout_s, overrides)
    try:
        numbers = list(partitions) if partitions is not None else prober.partitions()
        try:
            answers = prober.consumer.offsets_for_times(
                [TopicPartition(topic, p, want) for p in numbers], timeout=timeout_s
            )
            broker: dict[int, int | None] = {tp.partition: (None if tp.error else tp.offset) for tp in answers}
        except KafkaException as exc:
            log.warning("offsets_for_times failed (%s); searching every partition on the client", exc)
            broker = {}
        return [_locate(prober, p, want, broker.get(p)) for p in numbers]
    finally:
        prober.close()


def check_group_idle(admin: AdminClient, group: str, timeout_s: float) -> None:
    """Raise `GroupActiveError` unless nobody consumes for `group` (an unknown group is idle).

    Both the member list and the state count: Tansu lists no members for a group it reports `STABLE`.
    """
    try:
        description = admin.describe_consumer_groups([group], request_timeout=timeout_s)[group].result(
            timeout=timeout_s + 1
        )
    except KafkaException as exc:
        if exc.args and exc.args[0].code() == KafkaError.GROUP_ID_NOT_FOUND:
            return
        raise StreamAdaptError(f"cannot describe consumer group {group!r}: {exc}") from exc
    members = list(description.members or [])
    if members or description.state not in _IDLE_STATES:
        who = ", ".join(f"{m.client_id}@{m.host}" for m in members[:5]) or "members not listed by the broker"
        state = getattr(description.state, "name", str(description.state))
        raise GroupActiveError(
            f"consumer group {group!r} is active (state {state}, {len(members)} member(s): {who}); stop its "
            "consumers first (a crashed member counts until its session times out): its offsets were not moved"
        )


def rewind_group(
    kafka: KafkaConfig,
    group: str,
    topic: str,
    target: float | str,
    *,
    dry_run: bool = False,
    timeout_s: float = 30.0,
    overrides: Mapping[str, Any] | None = None,
) -> RewindReport:
    """Set `group`'s committed offsets on every partition of `topic` to the first record at or after
    `target` in record time (see the module docstring); other topics' offsets are left alone.

    Raises `GroupActiveError` if the group has members (checked before and, by the broker, during the
    commit), `StreamAdaptError` if Kafka, the topic or the group cannot be reached. `dry_run`: find
    and report the offsets, commit nothing.
    """
    started = time.monotonic()
    want = target_ms(target)
    admin = AdminClient(client_config(kafka))
    check_group_idle(admin, group, timeout_s)
    found = find_offsets(kafka, topic, want / 1000, timeout_s=timeout_s, overrides=overrides)
    previous = _committed(admin, group, topic, [p.partition for p in found], timeout_s)
    offsets = tuple(
        PartitionOffset(
            p.partition, p.offset, p.timestamp_ms, p.broker_offset, p.corrected, p.reads, previous.get(p.partition)
        )
        for p in found
    )
    if not dry_run:
        check_group_idle(admin, group, timeout_s)  # again: finding the offsets took a while
        _alter(admin, group, topic, offsets, timeout_s)
        log.info("group %r on %r rewound to %d ms: %s", group, topic, want, {p.partition: p.offset for p in offsets})
    return RewindReport(group, topic, want, offsets, not dry_run, time.monotonic() - started)


def _committed(admin: AdminClient, group: str, topic: str, partitions: list[int], timeout_s: float) -> dict[int, int]:
    request = [ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in partitions])]
    try:
        result = admin.list_consumer_group_offsets(request, request_timeout=timeout_s)[group].result(
            timeout=timeout_s + 1
        )
    except KafkaException as exc:
        raise StreamAdaptError(f"cannot read the committed offsets of group {group!r}: {exc}") from exc
    return {tp.partition: tp.offset for tp in result.topic_partitions or [] if tp.offset >= 0 and tp.error is None}


def _alter(admin: AdminClient, group: str, topic: str, offsets: Sequence[PartitionOffset], timeout_s: float) -> None:
    request = [ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p.partition, p.offset) for p in offsets])]
    try:
        result = admin.alter_consumer_group_offsets(request, request_timeout=timeout_s)[group].result(
            timeout=timeout_s + 1
        )
        errors = [tp.error for tp in result.topic_partitions or [] if tp.error is not None]
    except KafkaException as exc:
        errors = [exc.args[0]] if exc.args and isinstance(exc.args[0], KafkaError) else []
        if not errors:
            raise StreamAdaptError(f"cannot commit offsets for group {group!r}: {exc}") from exc
    if any(err.code() in _MEMBER_ERRORS for err in errors):
        raise GroupActiveError(
            f"consumer group {group!r} gained a member while rewinding (broker: {errors[0].str()}); "
            "its offsets were not moved: stop its consumers and run the rewind again"
        )
    if errors:
        raise StreamAdaptError(f"cannot commit offsets for group {group!r}: {errors[0].str()}")
