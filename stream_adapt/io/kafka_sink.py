"""The Kafka sink: adapters to the model topic, the adaptation log, dead letters, with delivery tracking.

Routing (docs/DESIGN-kafka.md): an entity's update and log record go to the partition number its
input events came from (modulo the topic's partition count), so model-topic partition p holds the
adapters of input partition p's entities; `__global__` always goes to partition 0. Dead letters go to
their source partition (modulo) and carry where they came from in headers.

The runner commits input offsets only after `flush()` returned True, which it does only when every
message handed to `publish()` so far is confirmed by the brokers (acks=all, idempotent producer).
A message whose delivery failed is kept and produced again on the next `publish`/`flush`, in its
original order, so a broker outage delays commits but loses nothing. Messages the topic would refuse
for their size are not sent at all (the local broker does not enforce `max.message.bytes`, Kafka
does): a dead letter is truncated and marked, an oversized update or log record is counted as a
`too_large` failure and logged at ERROR, so one bad adapter cannot stall the stream.

With `transactional_id` (`kafka.exactly_once`) outputs and input offsets are committed atomically:
`begin()`, `publish()`..., `commit(offsets, source.group_metadata())`. Readers of the model, log and
dead-letter topics must then use `isolation.level=read_committed` (librdkafka's default) to skip
aborted outputs.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka import TopicPartition as KafkaTopicPartition

from stream_adapt.config import KafkaConfig
from stream_adapt.errors import KafkaUnavailable, StreamAdaptError
from stream_adapt.events import GLOBAL_ENTITY, DecodeError, ModelUpdate, SourcePosition
from stream_adapt.io._kafka_common import HOPELESS_CODES, ClientLog, ErrorLog
from stream_adapt.io.admin import (
    DEAD_LETTER_MAX_MESSAGE_BYTES,
    MODEL_MAX_MESSAGE_BYTES,
    client_config,
    redacted,
)
from stream_adapt.io.directory import update_headers
from stream_adapt.io.ports import TopicPartition
from stream_adapt.learning.pipeline import BatchResult

log = logging.getLogger(__name__)

#: Kafka's default topic limit is 1048588 bytes; the log topic is created without its own.
LOG_MAX_MESSAGE_BYTES = 1_000_000
#: What Kafka adds to a record beyond key, value and header bytes (batch header, varints), rounded up.
RECORD_OVERHEAD_BYTES = 512
#: Room above the largest topic limit for librdkafka's own `message.max.bytes` check.
_PRODUCER_HEADROOM_BYTES = 64 * 1024
#: Tries, and the wait between them, when librdkafka's queue is full before the rest waits for flush().
_QUEUE_FULL_TRIES = 3
_QUEUE_FULL_WAIT_S = 0.1
#: Errors a resend cannot fix: the broker (or librdkafka) refuses the record itself.
_TOO_LARGE_CODES = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG_SIZE})
_PERMANENT_CODES = _TOO_LARGE_CODES | {KafkaError.INVALID_RECORD}
#: Errors after which this producer instance can deliver nothing more: its producer id or epoch is fenced.
#: librdkafka reports them per message and not as fatal (seen on Tansu, which answers PRODUCER_FENCED to
#: every produce after the epoch bump that follows message timeouts): resending would fail forever.
_FENCED_CODES = frozenset({KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH, KafkaError._FENCED})


@dataclass(slots=True)
class _Outgoing:
    """One message handed over by `publish`, kept until the brokers confirm it."""

    seq: int  # hand-over order: resends keep it, so per-partition order survives a failure
    topic: str
    partition: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    update: ModelUpdate | None = None  # for model-topic messages: told to `on_update_delivered`
    produced_at: float = 0.0  # wall time of the last produce() call


class KafkaSink:
    """Publishes a `BatchResult` to the model, adaptation-log and dead-letter topics."""

    def __init__(
        self,
        kafka: KafkaConfig,
        *,
        client_id: str | None = None,
        transactional_id: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        max_message_bytes: Mapping[str, int] | None = None,
        connect_timeout_s: float = 10.0,
    ) -> None:
        """Connect, check that the three topics exist and (transactional) initialise transactions.

        `max_message_bytes` overrides the per-topic size limits (by topic name) when the topics were
        created with other `max.message.bytes` than `admin.default_topic_specs`. Raises
        `StreamAdaptError` if the cluster is not reachable within `connect_timeout_s` or a topic is missing.
        """
        self._kafka = kafka
        self._servers = kafka.bootstrap_servers
        self._topics = (kafka.model_topic, kafka.log_topic, kafka.dead_letter_topic)
        self._limits = {
            kafka.model_topic: MODEL_MAX_MESSAGE_BYTES,
            kafka.log_topic: LOG_MAX_MESSAGE_BYTES,
            kafka.dead_letter_topic: DEAD_LETTER_MAX_MESSAGE_BYTES,
            **(max_message_bytes or {}),
        }
        settings: dict[str, Any] = {
            "client.id": client_id or "stream-adapt-publisher",
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "lz4",
            # A producer may create a missing topic with broker defaults (not compacted): never.
            "allow.auto.create.topics": False,
            **(overrides or {}),
        }
        if transactional_id:
            settings["transactional.id"] = transactional_id
        config = client_config(kafka, **settings)
        config["enable.idempotence"] = True
        needed = max(MODEL_MAX_MESSAGE_BYTES, *self._limits.values()) + _PRODUCER_HEADROOM_BYTES
        config["message.max.bytes"] = max(int(config.get("message.max.bytes", 0)), needed)
        log.info("Kafka producer for %s: %s", ", ".join(self._topics), redacted(config))
        self._errors = ErrorLog(log, self._servers, f"producer {config['client.id']}")
        self._fatal: KafkaError | None = None
        config["error_cb"] = self._on_error
        config["logger"] = ClientLog(logging.getLogger(f"{__name__}.librdkafka"))
        self._producer = Producer(config)
        self._transactional = bool(transactional_id)
        self._in_transaction = False
        self._transaction_failures = 0  # deliveries that failed in the open transaction: it must abort
        self._closed = False
        self._seq = 0
        self._inflight: dict[int, _Outgoing] = {}  # produced, not yet confirmed; by seq
        self._retry: list[_Outgoing] = []  # failed or never accepted by the queue: sent again first
        self.delivered: Counter[str] = Counter()
        """Messages confirmed by the brokers, per topic."""
        self.failures: Counter[tuple[str, str]] = Counter()
        """Failed deliveries and refused messages, per (topic, reason); failed ones are resent."""
        self.on_update_delivered: list[Callable[[ModelUpdate, float], None]] = []
        """Called with (update, wall time) when the brokers confirm a model update (freshness metrics)."""
        try:
            self._partitions = self._fetch_partitions(connect_timeout_s)
            if self._transactional:
                self._transaction_call("init_transactions", self._producer.init_transactions, connect_timeout_s)
        except BaseException:
            self._producer.purge()
            self._producer.close()
            raise

    # ---- Sink protocol ---------------------------------------------------------------------------
    def publish(self, result: BatchResult) -> None:
        """Hand over a batch's updates, log records and dead letters (asynchronous; see `flush`)."""
        self._check_usable()
        if self._transactional and not self._in_transaction:
            self.begin()
        fresh = [*self._update_messages(result), *self._log_messages(result), *self._dead_letter_messages(result)]
        pending, self._retry = sorted(self._retry, key=_by_seq), []
        waiting = self._send([*pending, *fresh])
        self._retry = sorted([*waiting, *self._retry], key=_by_seq)  # delivery reports may have added some
        self._producer.poll(0)

    def flush(self, timeout_s: float) -> bool:
        """Resend what failed, then wait up to `timeout_s` for confirmations.

        True only when every message handed to `publish()` so far is delivered (messages refused for
        their size count as handled: they are in `failures`, never sent).
        """
        self._check_usable()
        deadline = time.monotonic() + timeout_s
        waiting, self._retry = sorted(self._retry, key=_by_seq), []
        while True:
            waiting = self._send(waiting)
            left = max(0.0, deadline - time.monotonic())
            self._producer.flush(min(left, 0.5) if waiting else left)
            if not waiting or time.monotonic() >= deadline:
                break
        self._retry = sorted([*waiting, *self._retry], key=_by_seq)
        if self.backlog:
            self._errors.warn_if_unreachable(f"; {self.backlog} message(s) wait for delivery")
        else:
            self._errors.reachable()
        self._check_usable()
        return self.backlog == 0 and not self._transaction_failures

    @property
    def backlog(self) -> int:
        """Messages handed to `publish()` and not yet confirmed (in flight, failed or queued for resend)."""
        return len(self._inflight) + len(self._retry)

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush (bounded), then close. An open transaction is aborted: only `commit` commits."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._in_transaction:
                log.warning("closing with an open transaction: aborted (its input offsets were not committed)")
                self._abort(timeout_s)
            elif self._fatal is None and not self.flush(timeout_s):
                log.error(
                    "closing with %d undelivered message(s); their input offsets were not committed, "
                    "so the next run re-reads and republishes them",
                    self.backlog,
                )
        except StreamAdaptError as exc:  # a fatal error surfaced while flushing: close anyway
            log.error("closing the Kafka producer after an error: %s", exc)
        self._producer.purge()
        self._producer.flush(0)
        self._producer.close()

    # ---- transactions ------------------------------------------------------------------------------
    def begin(self) -> None:
        """Start a transaction (`publish` starts one itself when none is open)."""
        if not self._transactional:
            raise StreamAdaptError("KafkaSink.begin() needs a transactional_id (kafka.exactly_once)")
        self._check_usable()
        if not self._in_transaction:
            self._transaction_call("begin_transaction", lambda _t: self._producer.begin_transaction(), 0.0)
            self._in_transaction = True

    def commit(self, offsets: Mapping[TopicPartition, int], group_metadata: Any, timeout_s: float = 30.0) -> None:
        """Commit the open transaction together with the consumer group's input `offsets`.

        Retriable errors are retried until `timeout_s`; an abortable error aborts the transaction and
        raises `StreamAdaptError` (the service restarts and restores from the committed state); a
        fatal error raises. Without an open transaction, one is started to commit the offsets alone.
        """
        self.begin()
        deadline = time.monotonic() + timeout_s
        # commit_transaction flushes librdkafka's queue, not the messages a full queue left waiting here.
        if not self.flush(timeout_s):
            waiting, failed = self.backlog, self._transaction_failures
            self._abort(timeout_s=10.0)
            raise StreamAdaptError(
                f"Kafka transaction aborted: {waiting} message(s) undelivered after {timeout_s:g}s, "
                f"{failed} failed; restart to resume from the last committed offsets"
            )
        positions = [KafkaTopicPartition(t, p, o) for (t, p), o in offsets.items()]
        if positions:
            self._transaction_call(
                "send_offsets_to_transaction",
                lambda t: self._producer.send_offsets_to_transaction(positions, group_metadata, t),
                deadline - time.monotonic(),
            )
        self._transaction_call("commit_transaction", self._producer.commit_transaction, deadline - time.monotonic())
        self._in_transaction = False
        self._transaction_failures = 0
        self._producer.poll(0)

    def _transaction_call(self, what: str, call: Callable[[float], object], timeout_s: float) -> None:
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while True:
            try:
                call(max(0.1, deadline - time.monotonic()))
                return
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                if err.retriable() and time.monotonic() < deadline:
                    log.info("transaction %s: %s; retrying", what, err.str())
                    continue
                if err.txn_requires_abort():
                    self._abort(timeout_s=10.0)
                    raise StreamAdaptError(
                        f"Kafka transaction aborted at {what}: {err.str()}; restart to resume from the "
                        "last committed offsets"
                    ) from exc
                if err.retriable():
                    raise StreamAdaptError(f"Kafka at {self._servers}: {what} timed out: {err.str()}") from exc
                self._fatal = self._fatal or err
                raise StreamAdaptError(
                    f"Kafka transactional producer at {self._servers} failed at {what}: {err.name()}: {err.str()}"
                ) from exc

    def abort(self, timeout_s: float = 10.0) -> None:
        """Abort the open transaction (exactly-once): none of its messages or offsets will be visible."""
        if self._in_transaction:
            self._abort(timeout_s)

    def _abort(self, timeout_s: float) -> None:
        try:
            self._producer.abort_transaction(timeout_s)
        except KafkaException as exc:
            log.error("abort_transaction failed: %s", exc.args[0].str())
        self._in_transaction = False
        self._transaction_failures = 0
        for out in [*self._inflight.values(), *self._retry]:
            self.failures[(out.topic, "aborted")] += 1
        self._inflight.clear()
        self._retry.clear()

    # ---- building messages -------------------------------------------------------------------------
    def _update_messages(self, result: BatchResult) -> Iterable[_Outgoing]:
        topic = self._kafka.model_topic
        for upd in result.updates:
            headers = [(k, v.encode()) for k, v in update_headers(upd).items()]
            partition = self._partition(topic, upd.entity, upd.update.positions)
            msg = self._message(topic, partition, upd.entity.encode(), upd.payload, headers)
            msg.update = upd.update
            if self._fits(msg, f"update {upd.entity} v{upd.update.version}"):
                yield msg

    def _log_messages(self, result: BatchResult) -> Iterable[_Outgoing]:
        topic = self._kafka.log_topic
        for rec in result.log:
            partition = self._partition(topic, rec.entity, rec.positions)
            msg = self._message(topic, partition, rec.entity.encode(), rec.model_dump_json().encode(), [])
            if self._fits(msg, f"adaptation record of {rec.entity}"):
                yield msg

    def _dead_letter_messages(self, result: BatchResult) -> Iterable[_Outgoing]:
        topic = self._kafka.dead_letter_topic
        for dl in result.dead_letters:
            msg = self._message(topic, dl.position.partition % self._partitions[topic], dl.key, dl.raw, _dl_headers(dl))
            size, limit = _size(msg), self._limits[topic]
            if size > limit:
                msg.headers += [
                    ("stream-adapt-truncated", b"true"),
                    ("stream-adapt-original-size", str(len(dl.raw)).encode()),
                ]
                msg.value = msg.value[: max(0, limit - _size(msg) + len(msg.value))]
            if self._fits(msg, f"dead letter from {dl.position}"):
                yield msg

    def _message(
        self, topic: str, partition: int, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]
    ) -> _Outgoing:
        self._seq += 1
        return _Outgoing(self._seq, topic, partition, key, value, headers)

    def _partition(self, topic: str, entity: str, positions: Sequence[SourcePosition]) -> int:
        if entity == GLOBAL_ENTITY or not positions:
            return 0
        return positions[-1]["partition"] % self._partitions[topic]

    def _fits(self, msg: _Outgoing, what: str) -> bool:
        size, limit = _size(msg), self._limits[msg.topic]
        if size <= limit:
            return True
        self.failures[(msg.topic, "too_large")] += 1
        log.error("%s is %d bytes, over the %d-byte limit of %s: not published", what, size, limit, msg.topic)
        return False

    # ---- producing and delivery --------------------------------------------------------------------
    def _send(self, messages: list[_Outgoing]) -> list[_Outgoing]:
        """Produce `messages` in order; returns those the full queue did not take (they wait)."""
        for i, msg in enumerate(messages):
            for _ in range(_QUEUE_FULL_TRIES):
                if self._produce(msg):
                    break
                self._producer.poll(_QUEUE_FULL_WAIT_S)  # serves delivery reports, which frees queue space
            else:
                log.warning("producer queue full: %d message(s) wait for the next flush", len(messages) - i)
                return messages[i:]
        return []

    def _produce(self, msg: _Outgoing) -> bool:
        """False if the queue is full; refused messages are counted and dropped."""
        self._inflight[msg.seq] = msg
        msg.produced_at = time.time()
        try:
            self._producer.produce(
                msg.topic,
                value=msg.value,
                key=msg.key,
                partition=msg.partition,
                headers=[*msg.headers],  # a list of its own: the type is invariant
                on_delivery=functools.partial(self._on_delivery, msg.seq),
            )
        except BufferError:
            del self._inflight[msg.seq]
            return False
        except KafkaException as exc:
            del self._inflight[msg.seq]
            err: KafkaError = exc.args[0]
            if err.code() in _PERMANENT_CODES:
                self.failures[(msg.topic, _reason(err))] += 1
                log.error("message to %s refused by the client: %s", msg.topic, err.str())
                return True
            raise StreamAdaptError(f"cannot produce to {msg.topic}[{msg.partition}]: {err.str()}") from exc
        return True

    def _on_delivery(self, seq: int, err: KafkaError | None, msg: Message) -> None:
        out = self._inflight.pop(seq, None)
        if out is None:  # purged or aborted
            return
        if err is None:
            self.delivered[out.topic] += 1
            if out.update is not None and self.on_update_delivered:
                # The broker's acknowledgement time, not when this callback is served (at the next poll).
                latency = msg.latency()
                acked_at = out.produced_at + latency if latency is not None else time.time()
                for observe in self.on_update_delivered:
                    observe(out.update, acked_at)
            return
        self.failures[(out.topic, _reason(err))] += 1
        if err.code() in _PERMANENT_CODES:
            log.error("%s[%d] refused a %d-byte message: %s", out.topic, out.partition, _size(out), err.str())
            return
        if err.fatal() or err.code() in _FENCED_CODES:
            # Stop (publish/flush raise) rather than resend through a dead producer forever: a member
            # stuck that way commits nothing and holds its partitions while looking alive. Its restart
            # gets a new producer id and re-reads from the committed offsets, which never passed this.
            self._fatal = self._fatal or err
        else:
            self._errors.error(err)  # e.g. _MSG_TIMED_OUT: logged once per code per few minutes
        if self._transactional:  # a failed transaction is aborted as a whole, not patched up
            self._transaction_failures += 1
        else:
            self._retry.append(out)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal() or err.code() in HOPELESS_CODES:
            self._fatal = self._fatal or err
        else:
            self._errors.error(err)

    def _check_usable(self) -> None:
        if self._fatal is not None:
            err = self._fatal
            raise StreamAdaptError(
                f"Kafka producer at {self._servers} cannot continue: {err.name()}: {err.str()} "
                "(restart; check credentials, ACLs and transactional.id)"
            )

    def _fetch_partitions(self, timeout_s: float) -> dict[str, int]:
        """Partition counts of the three output topics, or a clear error naming what is wrong."""
        try:
            # All topics, not one by one: a metadata request naming a topic may auto-create it.
            metadata = self._producer.list_topics(timeout=timeout_s)
        except KafkaException as exc:
            raise KafkaUnavailable(
                f"cannot reach Kafka at {self._servers} within {timeout_s:g}s: {exc.args[0].str()}"
            ) from None
        counts: dict[str, int] = {}
        missing = []
        for name in self._topics:
            topic = metadata.topics.get(name)
            if topic is None or topic.error is not None or not topic.partitions:
                missing.append(name)
            else:
                counts[name] = len(topic.partitions)
        if missing:
            raise StreamAdaptError(
                f"Kafka at {self._servers} has no topic {', '.join(map(repr, missing))}: "
                "run `stream-adapt topics create` first"
            )
        return counts


def _dl_headers(dl: DecodeError) -> list[tuple[str, bytes]]:
    topic, partition, offset = dl.position
    headers = {
        "stream-adapt-reason": dl.reason,
        "stream-adapt-detail": dl.detail,
        "stream-adapt-source-topic": topic,
        "stream-adapt-source-partition": str(partition),
        "stream-adapt-source-offset": str(offset),
    }
    if dl.timestamp_ms is not None:
        headers["stream-adapt-source-timestamp"] = str(dl.timestamp_ms)
    return [(k, v.encode()) for k, v in headers.items()]


def _reason(err: KafkaError) -> str:
    """A failure's label: `too_large`, or the error's name in lower case (`msg_timed_out`...)."""
    return "too_large" if err.code() in _TOO_LARGE_CODES else err.name().lstrip("_").lower()


def _size(msg: _Outgoing) -> int:
    """The record's size as the broker counts it against `max.message.bytes` (before compression)."""
    return len(msg.value) + len(msg.key or b"") + sum(len(k) + len(v) for k, v in msg.headers) + RECORD_OVERHEAD_BYTES


def _by_seq(msg: _Outgoing) -> int:
    return msg.seq
