"""Reading the model topic back: restore a pipeline's state, follow the shared adapter.

The model topic is the service's changelog: every accepted adapter version, keyed by entity. A member
that takes over input partition p reads model-topic partition p to its end (see "Partition routing"
in docs/DESIGN-kafka.md) and restores, per entity, the newest adapter, its version and the highest
input offsets it consumed, so re-delivered events are skipped instead of learned twice. Every member
also follows partition 0 for the shared (`__global__`) adapter.

All readers here assign partitions directly, from the beginning: no group membership (no rebalances,
nothing committed), because each reader must see the whole partition, whoever else reads it. The end
of a partition is the consumer's own end-of-partition event (`enable.partition.eof`), not
`get_watermark_offsets()`, which some brokers answer wrongly after multi-record batches.

The broker may not compact (Tansu keeps every record; Kafka keeps recent ones until compaction
runs), so readers always resolve versions themselves: the highest version per entity wins, and a
tombstone (a record with no value) forgets the entity, as compaction eventually would.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition

from stream_adapt.config import KafkaConfig
from stream_adapt.errors import StreamAdaptError
from stream_adapt.events import GLOBAL_ENTITY, ModelUpdate
from stream_adapt.io.admin import client_config
from stream_adapt.learning.models import AdaptableModel, Adapter
from stream_adapt.learning.updates import RejectedUpdate, decode_update

if TYPE_CHECKING:
    from stream_adapt.learning.pipeline import Pipeline

log = logging.getLogger(__name__)

#: librdkafka needs a group id even for a consumer that only assigns; nothing is ever joined or
#: committed under it (no `subscribe`, auto-commit off, offsets given explicitly).
READER_GROUP_ID = "stream-adapt.changelog-reader"

#: Errors after which waiting cannot help: the topic or partition is gone, or access is refused.
_HOPELESS = frozenset(
    {
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
    }
)

_POLL_BATCH = 500


def reader_config(kafka: KafkaConfig | str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Consumer settings for a group-less reader: connection from `kafka`, then `overrides`.

    The keys that make it a faithful reader (end-of-partition events, nothing committed) are set last,
    over `kafka.extra` too: the readers here are not correct without them.
    """
    cfg = kafka if isinstance(kafka, KafkaConfig) else KafkaConfig(bootstrap_servers=kafka)
    defaults = {
        "group.id": READER_GROUP_ID,
        "auto.offset.reset": "earliest",
        # A fetch at the end of a partition waits this long for data before the broker answers, and
        # only that answer proves the end: 100 ms instead of 500 made a 3-partition read-to-end 3x
        # faster (restores run while a rebalance waits), and new versions reach serving sooner.
        "fetch.wait.max.ms": 100,
    }
    config = client_config(cfg, **{**defaults, **(overrides or {})})
    config.update({"enable.partition.eof": True, "enable.auto.commit": False, "enable.auto.offset.store": False})
    return config


class TopicReader:
    """A group-less reader of some partitions of one topic, from the beginning, that knows when each
    partition has reached its end at least once.

    Opening it fetches metadata (within `timeout_s`) and assigns; a missing topic or partition, or an
    unreachable cluster, raises `StreamAdaptError` naming the bootstrap servers and the topic.
    With `pause_at_end`, a partition stops being fetched once it reported its end (read-to-end use);
    otherwise the reader keeps tailing. Not thread-safe: use it from one thread.
    """

    def __init__(
        self,
        kafka: KafkaConfig | str,
        topic: str,
        partitions: Sequence[int] | None = None,
        *,
        timeout_s: float,
        overrides: Mapping[str, Any] | None = None,
        pause_at_end: bool = False,
    ):
        config = reader_config(kafka, overrides)
        self.topic = topic
        self.servers = str(config.get("bootstrap.servers", "?"))
        self.records = 0
        self._pause_at_end = pause_at_end
        self._errors: list[str] = []
        user_error_cb = config.pop("error_cb", None)

        def remember(err: KafkaError) -> None:
            self._errors.append(err.str())
            del self._errors[:-5]
            if callable(user_error_cb):
                user_error_cb(err)

        # librdkafka's own log lines go to Python logging (not stderr), where the service configures them.
        client_log = config.pop("logger", log)
        self._consumer = Consumer(config, error_cb=remember, logger=client_log)
        try:
            self.partitions = self._resolve(partitions, timeout_s)
            self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in self.partitions])
        except BaseException:
            self._consumer.close()
            raise
        self._pending = set(self.partitions)

    def _resolve(self, wanted: Sequence[int] | None, timeout_s: float) -> tuple[int, ...]:
        try:
            metadata = self._consumer.list_topics(self.topic, timeout=max(0.1, timeout_s))
        except KafkaException as exc:
            self._consumer.poll(0)  # serve error_cb so the message can say why
            raise self.error(f"not reachable within {timeout_s:g}s ({exc.args[0].str()})") from None
        info = metadata.topics.get(self.topic)
        if info is None or info.error is not None:
            why = info.error.str() if info is not None and info.error is not None else "not in metadata"
            raise self.error(f"topic does not exist ({why})")
        available = sorted(info.partitions)
        if wanted is None:
            return tuple(available)
        missing = sorted(set(wanted) - set(available))
        if missing:
            raise self.error(f"no partition {missing} (the topic has {len(available)})")
        return tuple(sorted(set(wanted)))

    def error(self, what: str) -> StreamAdaptError:
        """An error that names where: the bootstrap servers and the topic (and the last client error)."""
        seen = f"; last client error: {self._errors[-1]}" if self._errors else ""
        return StreamAdaptError(f"Kafka at {self.servers}, topic {self.topic!r}: {what}{seen}")

    @property
    def at_end(self) -> bool:
        """True once every assigned partition has reported its end (it may have grown since)."""
        return not self._pending

    @property
    def pending(self) -> set[int]:
        """Partitions that have not reported their end yet."""
        return set(self._pending)

    def poll(self, timeout_s: float, max_records: int = _POLL_BATCH) -> list[Message]:
        """Up to `max_records` records (in order per partition); `timeout_s=0` never blocks.

        End-of-partition events are absorbed into `at_end`. Transient errors (a broker restarting) are
        left to librdkafka's retries; errors after which waiting cannot help raise `StreamAdaptError`.
        """
        out: list[Message] = []
        for msg in self._consumer.consume(num_messages=max_records, timeout=timeout_s):
            err = msg.error()
            if err is None:
                out.append(msg)
                continue
            if err.code() == KafkaError._PARTITION_EOF:
                partition = msg.partition()
                if partition in self._pending:
                    self._pending.discard(partition)
                    if self._pause_at_end and partition is not None:
                        self._consumer.pause([TopicPartition(self.topic, partition)])
                continue
            if err.fatal() or err.code() in _HOPELESS:
                raise self.error(f"cannot read: {err.str()}")
            self._errors.append(err.str())
            del self._errors[:-5]
            log.debug("transient error reading %s: %s", self.topic, err.str())
        self.records += len(out)
        return out

    def timeout_error(self, timeout_s: float) -> StreamAdaptError:
        """The error for a read that did not reach the end of every partition in time."""
        return self.error(
            f"partitions {sorted(self._pending)} not read to their end within {timeout_s:g}s "
            f"({self.records} records read)"
        )

    def close(self) -> None:
        """Leave nothing behind: no group to leave, nothing to commit."""
        self._consumer.close()

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def read_to_end(
    kafka: KafkaConfig | str,
    topic: str,
    partitions: Sequence[int] | None,
    *,
    timeout_s: float,
    overrides: Mapping[str, Any] | None = None,
) -> Iterator[Message]:
    """Every record of `partitions` of `topic` (None: all), from the beginning up to the end each one
    had when it was reached, in order per partition.

    No group, no commits. Empty partitions end at once. The whole read (metadata included) must finish
    within `timeout_s`, else `StreamAdaptError` names the servers, topic and unfinished partitions.
    The reader opens on the first `next()` and closes when the iteration ends or the iterator is closed.
    """
    deadline = time.monotonic() + timeout_s
    with TopicReader(kafka, topic, partitions, timeout_s=timeout_s, overrides=overrides, pause_at_end=True) as reader:
        while not reader.at_end:
            left = deadline - time.monotonic()
            if left <= 0:
                raise reader.timeout_error(timeout_s)
            yield from reader.poll(min(left, 0.5))


def latest_per_key(messages: Iterable[Message]) -> dict[bytes, Message]:
    """The last record per key, as compaction would leave it (readers must not rely on the broker
    compacting). A tombstone (no value) removes its key; records without a key are ignored."""
    latest: dict[bytes, Message] = {}
    for msg in messages:
        key = msg.key()
        if key is None:
            continue
        if msg.value() is None:
            latest.pop(key, None)
        else:
            latest[key] = msg
    return latest


def check_update(model: AdaptableModel, key: bytes | None, payload: bytes) -> tuple[ModelUpdate, Adapter]:
    """Decode and verify one model-topic record for `model`; raises `RejectedUpdate`.

    Beyond `decode_update` (fingerprint, tensor names/shapes/dtype, finiteness), the record must be
    keyed by its own entity, and be of the model's entity kind: a user adapter has the same shapes
    as an item adapter and the same base fingerprint when one model directory serves both, so only
    the kind tells them apart. The global adapter is checked against `model.global_spec()`.
    """
    entity = key.decode("utf-8", "replace") if key is not None else None
    is_global = entity == GLOBAL_ENTITY
    spec = model.global_spec() if is_global else model.adapter_spec()
    update, tensors = decode_update(payload, spec, model.fingerprint)
    if entity != update.entity:
        raise RejectedUpdate("bad_metadata", f"record key {entity!r} is not its entity {update.entity!r}")
    expected_kind = "global" if is_global else model.entity_kind
    if update.entity_kind != expected_kind:
        # Not ours to load: another deployment (other entity kind) publishes to this topic.
        raise RejectedUpdate(
            "foreign_fingerprint", f"entity kind {update.entity_kind!r}, this model adapts {expected_kind!r}"
        )
    return update, tensors


@dataclass(frozen=True)
class RestoreReport:
    """What `restore_pipeline` found and loaded."""

    partitions: tuple[int, ...]
    records: int  # records read from the model topic
    entities: int  # entity states the pipeline took
    skipped: int  # entities the pipeline already held at the same or a newer version
    global_version: int | None  # the shared adapter version taken, if any
    rejected: dict[str, int] = field(default_factory=dict)  # by reason (REJECT_REASONS)
    deleted: int = 0  # tombstones that forgot an entity
    seconds: float = 0.0


@dataclass
class _Latest:
    """The newest valid version of one entity seen so far, and every input offset its versions used."""

    update: ModelUpdate
    tensors: Adapter
    consumed: dict[tuple[str, int], int]


def restore_pipeline(
    pipeline: Pipeline,
    kafka: KafkaConfig | str,
    model_topic: str,
    input_partitions: Sequence[tuple[str, int]],
    *,
    timeout_s: float,
    overrides: Mapping[str, Any] | None = None,
) -> RestoreReport:
    """Restore the entities of `input_partitions` (and the shared adapter, if partition 0 is among
    them) from the model topic, before the pipeline processes those partitions.

    Reads model-topic partitions with the same numbers as the input partitions, to their end. Per
    entity the highest valid version wins (a zombie writer may publish an older version late); its
    consumed marks are the highest offset per input partition over all its valid versions, restricted
    to `input_partitions` (at most once: an event any accepted version used is never learned again).
    Records for another base model or entity kind, and invalid ones, are skipped and counted by
    reason: they are not ours to load. Raises `StreamAdaptError` if the topic is missing or the read
    does not finish within `timeout_s`.
    """
    started = time.monotonic()
    numbers = sorted({p for _, p in input_partitions})
    if not numbers:
        return RestoreReport((), 0, 0, 0, None)
    owned = set(input_partitions)
    model = pipeline.model
    latest: dict[str, _Latest] = {}
    best_global: tuple[int, Adapter] | None = None
    rejected: Counter[str] = Counter()
    records = deleted = 0
    for msg in read_to_end(kafka, model_topic, numbers, timeout_s=timeout_s, overrides=overrides):
        records += 1
        key, payload = msg.key(), msg.value()
        if payload is None:
            if key is not None and latest.pop(key.decode("utf-8", "replace"), None) is not None:
                deleted += 1
            continue
        try:
            update, tensors = check_update(model, key, payload)
        except RejectedUpdate as rej:
            rejected[rej.reason] += 1
            log.debug("restore skips %s[%s]@%s: %s", model_topic, msg.partition(), msg.offset(), rej)
            continue
        if update.entity == GLOBAL_ENTITY:
            if best_global is None or update.version > best_global[0]:
                best_global = (update.version, tensors)
            continue
        marks: dict[tuple[str, int], int] = {}
        for pos in update.positions:
            tp = (pos["topic"], pos["partition"])
            if tp in owned and pos["offset"] > marks.get(tp, -1):
                marks[tp] = pos["offset"]
        held = latest.get(update.entity)
        if held is None:
            latest[update.entity] = _Latest(update, tensors, marks)
            continue
        for tp, offset in marks.items():
            if offset > held.consumed.get(tp, -1):
                held.consumed[tp] = offset
        if update.version > held.update.version:
            held.update, held.tensors = update, tensors

    taken = skipped = 0
    for entity, state in latest.items():
        if pipeline.restore(entity, state.update.version, state.tensors, state.consumed, state.update.event_time_last):
            taken += 1
        else:
            skipped += 1
    global_version = None
    if best_global is not None and pipeline.set_shared(best_global[1], best_global[0]):
        global_version = best_global[0]
    report = RestoreReport(
        partitions=tuple(numbers),
        records=records,
        entities=taken,
        skipped=skipped,
        global_version=global_version,
        rejected=dict(rejected),
        deleted=deleted,
        seconds=time.monotonic() - started,
    )
    log.info(
        "restored %d entities (global version %s) from %s partitions %s: %d records, %d skipped as not ours %s, %.2fs",
        taken,
        global_version,
        model_topic,
        list(numbers),
        records,
        sum(rejected.values()),
        dict(rejected),
        report.seconds,
    )
    return report


class GlobalFollower:
    """Follows the shared (`__global__`) adapter on model-topic partition 0 for a pipeline.

    Every member scores and adapts against the same shared part serving uses, but only the owner of
    input partition 0 re-adapts it; the others apply its newer versions between batches with
    `poll(pipeline)`, which never blocks. Other keys on partition 0 (that partition's entities) are
    skipped without decoding. Not thread-safe: call it from the pipeline's thread.
    """

    def __init__(
        self,
        kafka: KafkaConfig | str,
        model_topic: str,
        *,
        timeout_s: float = 15.0,
        overrides: Mapping[str, Any] | None = None,
    ):
        self.rejected: Counter[str] = Counter()
        self._reader = TopicReader(kafka, model_topic, [0], timeout_s=timeout_s, overrides=overrides)
        self._key = GLOBAL_ENTITY.encode()

    @property
    def at_end(self) -> bool:
        """True once partition 0 has been read to its end at least once."""
        return self._reader.at_end

    def poll(self, pipeline: Pipeline, timeout_s: float = 0.0, max_records: int = _POLL_BATCH) -> int | None:
        """Apply the newest valid global version among the records fetched, if it is newer than the
        pipeline's. Returns the version applied, or None. With the default `timeout_s=0` it never
        blocks (call it between batches); a timeout lets a caller with nothing else to do wait."""
        return self._apply(pipeline, self._reader.poll(timeout_s, max_records))

    def catch_up(self, pipeline: Pipeline, timeout_s: float) -> bool:
        """Read partition 0 to its end (blocking, at most `timeout_s`) applying the newest global version:
        for a member that must not score its first batch against a stale shared part. False on timeout."""
        deadline = time.monotonic() + timeout_s
        while not self._reader.at_end:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._apply(pipeline, self._reader.poll(min(left, 0.5)))
        self.poll(pipeline)
        return True

    def _apply(self, pipeline: Pipeline, messages: list[Message]) -> int | None:
        best: tuple[int, Adapter] | None = None
        for msg in messages:
            payload = msg.value()
            if msg.key() != self._key or payload is None:
                continue
            try:
                update, tensors = check_update(pipeline.model, msg.key(), payload)
            except RejectedUpdate as rej:
                self.rejected[rej.reason] += 1
                log.warning("global adapter at %s[0]@%s rejected: %s", self._reader.topic, msg.offset(), rej)
                continue
            if best is None or update.version > best[0]:
                best = (update.version, tensors)
        if best is not None and pipeline.set_shared(best[1], best[0]):
            log.info("shared adapter now at version %d", best[0])
            return best[0]
        return None

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> GlobalFollower:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
