"""The consumer-group source: feedback records from Kafka, with rebalance hooks, manual commits and lag.

Offsets are never committed behind the runner's back (`enable.auto.commit=false`,
`enable.auto.offset.store=false`): the runner commits, through `commit`, only what the sink confirmed
and no open window still holds. Rebalance callbacks run inside `poll_batch` (librdkafka serves them
from `consume`), so a `RebalanceListener` sees `on_revoke` while the partitions are still owned and can
flush and commit them, and `on_assign` before any of their records is returned.

The default assignor is kept (`range,roundrobin`, eager): cooperative rebalances took 11 s on the
local Tansu broker. Cooperative strategies set through `kafka.extra` still work (incremental calls).

Lag comes from librdkafka's statistics (`consumer_lag`, the distance from the committed offset to
the partition's end), not from `get_watermark_offsets`, which Tansu answers wrongly.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError, KafkaException
from confluent_kafka import TopicPartition as KafkaTopicPartition

from stream_adapt.config import KafkaConfig
from stream_adapt.errors import StreamAdaptError
from stream_adapt.events import Position, Record
from stream_adapt.io._kafka_common import HOPELESS_CODES, ClientLog, ErrorLog
from stream_adapt.io.admin import client_config, redacted
from stream_adapt.io.ports import TopicPartition

log = logging.getLogger(__name__)

StatsHook = Callable[[dict[str, Any]], None]


class RebalanceListener(Protocol):
    """What the runner does when the group moves partitions. Both run inside `poll_batch`."""

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        """`partitions` are now owned; none of their records has been returned yet (restore here)."""
        ...

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        """`partitions` are about to be given up (or were lost): flush, commit what is safe, drop state.

        For lost partitions (the member was thrown out of the group) the source already forgot them,
        so a commit for them is skipped: another member may own them by now.
        """
        ...


class KafkaSource:
    """Reads the feedback topic as a member of the consumer group `kafka.group`."""

    def __init__(
        self,
        kafka: KafkaConfig,
        *,
        client_id: str | None = None,
        stats_interval_ms: int = 5000,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        """Build the consumer and subscribe. Never blocks on the network: an unreachable cluster is
        retried by librdkafka and reported (rate-limited) from `poll_batch`.

        `overrides` are librdkafka keys (e.g. `session.timeout.ms`); `kafka.extra` still wins, except
        for the two commit settings this class's guarantees rest on.
        """
        self._kafka = kafka
        self._servers = kafka.bootstrap_servers
        settings: dict[str, Any] = {
            "group.id": kafka.group,
            "client.id": client_id or "stream-adapt",
            "auto.offset.reset": "earliest",
            "statistics.interval.ms": stats_interval_ms,
            # An idle fetch waits this long at the broker before it answers: 100 ms, not 500, bounds how
            # late fresh feedback is seen (measured on the local broker: update freshness p50 340 -> ~100 ms).
            "fetch.wait.max.ms": 100,
            **(overrides or {}),
        }
        config = client_config(kafka, **settings)
        config["enable.auto.commit"] = False
        config["enable.auto.offset.store"] = False
        log.info("Kafka consumer for %s: %s", kafka.topic, redacted(config))
        self._cooperative = "cooperative" in str(config.get("partition.assignment.strategy", ""))
        self._errors = ErrorLog(log, self._servers, f"consumer {config['client.id']}")
        self._fatal: KafkaError | None = None
        config["error_cb"] = self._on_error
        config["stats_cb"] = self._on_stats_json
        config["logger"] = ClientLog(logging.getLogger(f"{__name__}.librdkafka"))
        self._consumer = Consumer(config)
        self._assignment: dict[TopicPartition, None] = {}  # ordered set
        self._paused = False
        self._listener: RebalanceListener | None = None
        self._stats: dict[str, Any] = {}
        self._lag: dict[TopicPartition, int] = {}
        self._closed = False
        self.committed: dict[TopicPartition, int] = {}
        """The offsets this source committed last, per partition (for metrics and tests)."""
        self.on_stats: StatsHook | None = None
        """Called with each parsed statistics object (metrics); exceptions are logged, not raised."""
        self._consumer.subscribe(
            [kafka.topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    # ---- Source protocol ------------------------------------------------------------------------
    def poll_batch(self, max_records: int, timeout_s: float) -> list[Record]:
        """Up to `max_records` records, waiting at most `timeout_s`; serves rebalance callbacks.

        While paused this still polls (nothing is returned), so heartbeats, rebalances and
        statistics keep running. Raises `StreamAdaptError` for fatal client errors only.
        """
        messages = self._consumer.consume(num_messages=max_records, timeout=timeout_s)
        self._raise_if_fatal()
        owned = self._assignment
        out: list[Record] = []
        for msg in messages:
            err = msg.error()
            if err is not None:
                self._message_error(err)
                continue
            topic, partition = msg.topic() or "", msg.partition() or 0
            if (topic, partition) not in owned:
                continue  # fetched before a revoke in this same call: the new owner reads it
            ts_type, ts = msg.timestamp()
            out.append(
                Record(
                    value=msg.value() or b"",
                    position=Position(topic, partition, msg.offset() or 0),
                    key=msg.key(),
                    timestamp_ms=None if ts_type == TIMESTAMP_NOT_AVAILABLE else ts,
                )
            )
        if out:
            self._errors.reachable()
        else:
            self._errors.warn_if_unreachable()
        return out

    @property
    def exhausted(self) -> bool:
        """A topic never ends."""
        return False

    def commit(self, next_offsets: Mapping[TopicPartition, int]) -> None:
        """Commit `next_offsets` synchronously for the partitions this member owns now.

        Others are skipped: their new owner commits them. A failed commit (rebalance in progress,
        broker gone) is logged and not raised: the next commit covers the same records.
        """
        owned = self._assignment
        offsets = [KafkaTopicPartition(t, p, o) for (t, p), o in next_offsets.items() if (t, p) in owned]
        if not offsets:
            return
        try:
            result = self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if err.fatal():
                raise StreamAdaptError(
                    f"Kafka consumer at {self._servers}: fatal error on commit: {err.str()}"
                ) from exc
            log.warning("commit of %d partition(s) failed: %s; the next commit covers them", len(offsets), err.str())
            return
        failed = []
        for tp in result or offsets:
            if tp.error is not None:
                failed.append(f"{tp.topic}[{tp.partition}]: {tp.error.str()}")
            else:
                self.committed[(tp.topic, tp.partition)] = tp.offset
        if failed:
            log.warning("commit failed for %s; the next commit covers them", ", ".join(failed))

    def close(self, timeout_s: float = 10.0) -> None:
        """Leave the group cleanly (the listener's `on_revoke` runs first), waiting at most `timeout_s`.

        `Consumer.close()` has no timeout of its own, so it runs on a helper thread; if it does not
        finish in time the process goes on and the group expires the member after its session timeout.
        """
        if self._closed:
            return
        self._closed = True
        failure: list[BaseException] = []

        def close() -> None:
            try:
                self._consumer.close()
            except BaseException as exc:  # re-raised on the caller's thread
                failure.append(exc)

        closer = threading.Thread(target=close, name="kafka-source-close", daemon=True)
        closer.start()
        closer.join(timeout_s)
        if closer.is_alive():
            log.warning("Kafka consumer did not close within %.0fs; the group will expire it", timeout_s)
        elif failure:
            raise failure[0]

    # ---- rebalance, flow control, lag -------------------------------------------------------------
    def set_listener(self, listener: RebalanceListener | None) -> None:
        """Who hears about assignments and revocations (the runner); None to stop listening."""
        self._listener = listener

    @property
    def assignment(self) -> list[TopicPartition]:
        """The partitions this member owns now."""
        return list(self._assignment)

    def pause_all(self) -> None:
        """Stop fetching every assigned partition (backpressure); partitions assigned later start paused."""
        self._paused = True
        if self._assignment:
            self._consumer.pause(self._kafka_partitions(self._assignment))

    def resume_all(self) -> None:
        """Fetch again, from the record after the last one returned."""
        self._paused = False
        if self._assignment:
            self._consumer.resume(self._kafka_partitions(self._assignment))

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def lag(self) -> dict[TopicPartition, int]:
        """Records between the committed offset and the end, per owned partition, from the latest
        statistics (every `stats_interval_ms`). Partitions with no committed offset yet are left out."""
        owned = self._assignment
        return {tp: n for tp, n in self._lag.items() if tp in owned}

    @property
    def stats(self) -> dict[str, Any]:
        """The latest librdkafka statistics object (empty before the first)."""
        return self._stats

    def group_metadata(self) -> Any:
        """The consumer group metadata a transactional producer needs to commit offsets."""
        return self._consumer.consumer_group_metadata()

    # ---- callbacks (run inside consume) ------------------------------------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        tps = [(tp.topic, tp.partition) for tp in partitions]
        log.info("assigned %s", _describe(tps))
        self._errors.reachable()
        try:
            if self._listener is not None and tps:
                self._listener.on_assign(tps)
        finally:
            # Assigning here (not after the callback) lets new partitions start paused under backpressure.
            if self._cooperative:
                consumer.incremental_assign(partitions)
            else:
                consumer.assign(partitions)
                self._assignment.clear()
            self._assignment.update(dict.fromkeys(tps))
            if self._paused and partitions:
                consumer.pause(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        tps = [(tp.topic, tp.partition) for tp in partitions]
        log.info("revoking %s", _describe(tps))
        try:
            if self._listener is not None and tps:
                self._listener.on_revoke(tps)  # still owned: the runner can commit them
        finally:
            self._give_up(consumer, partitions, tps)

    def _on_lost(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        tps = [(tp.topic, tp.partition) for tp in partitions]
        log.warning("lost %s (session expired or fenced); their state is dropped uncommitted", _describe(tps))
        for tp in tps:  # forgotten first, so the listener's commit cannot touch another member's partitions
            self._assignment.pop(tp, None)
        try:
            if self._listener is not None and tps:
                self._listener.on_revoke(tps)
        finally:
            self._give_up(consumer, partitions, tps)

    def _give_up(self, consumer: Consumer, partitions: list[KafkaTopicPartition], tps: list[TopicPartition]) -> None:
        if self._cooperative:
            consumer.incremental_unassign(partitions)
            for tp in tps:
                self._assignment.pop(tp, None)
        else:
            consumer.unassign()
            self._assignment.clear()
        for tp in tps:
            self._lag.pop(tp, None)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal() or err.code() in HOPELESS_CODES:
            self._fatal = self._fatal or err
        else:
            self._errors.error(err)

    def _on_stats_json(self, raw: str) -> None:
        try:
            stats = json.loads(raw)
        except ValueError:
            log.debug("unparseable librdkafka statistics ignored")
            return
        self._stats = stats
        lag: dict[TopicPartition, int] = {}
        for topic, tstats in (stats.get("topics") or {}).items():
            for pid, pstats in (tstats.get("partitions") or {}).items():
                n = pstats.get("consumer_lag", -1)
                if int(pid) >= 0 and isinstance(n, int) and n >= 0:
                    lag[(topic, int(pid))] = n
        self._lag = lag
        if any(b.get("state") == "UP" for b in (stats.get("brokers") or {}).values()):
            self._errors.reachable()
        if self.on_stats is not None:
            try:
                self.on_stats(stats)
            except Exception:
                log.exception("statistics hook failed")

    # ---- helpers -----------------------------------------------------------------------------------
    def _message_error(self, err: KafkaError) -> None:
        """An error delivered in place of a record: EOF is ignored, transient ones logged, fatal raised."""
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.fatal() or err.code() in HOPELESS_CODES:
            self._fatal = err
            self._raise_if_fatal()
        self._errors.error(err)

    def _raise_if_fatal(self) -> None:
        if self._fatal is not None:
            err = self._fatal
            raise StreamAdaptError(
                f"Kafka consumer of {self._kafka.topic!r} at {self._servers} cannot continue: "
                f"{err.name()}: {err.str()} (check credentials, ACLs and the group/topic names)"
            )

    @staticmethod
    def _kafka_partitions(tps: Mapping[TopicPartition, None]) -> list[KafkaTopicPartition]:
        return [KafkaTopicPartition(t, p) for t, p in tps]


def _describe(tps: list[TopicPartition]) -> str:
    return ", ".join(f"{t}[{p}]" for t, p in tps) or "nothing"
