"""The Kafka service: a consumer-group member that adapts and publishes (see docs/DESIGN-kafka.md).

Wires `KafkaSource` -> `Pipeline` -> `KafkaSink` through the `Runner`, and adds what a group member
needs around it:
- on assignment, restore the entities of the new partitions from the model topic (adapters, versions,
  consumed offsets), so re-read events are recognised and lineages continue;
- on revocation, flush, commit the revoked partitions' safe offsets, and forget their windows and
  entities (the new owner re-reads and restores them);
- between batches, follow the shared adapter published by the owner of partition 0, and pause the
  partitions while the producer's undelivered backlog is too large (broker slow or gone);
- `exactly_once`: each commit interval is one Kafka transaction (outputs + offsets).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stream_adapt.config import Settings
from stream_adapt.errors import KafkaUnavailable, StreamAdaptError
from stream_adapt.faults import failpoint
from stream_adapt.io.changelog import GlobalFollower, restore_pipeline
from stream_adapt.io.kafka import KafkaSink, KafkaSource
from stream_adapt.io.ports import TopicPartition
from stream_adapt.learning.models import AdaptableModel
from stream_adapt.learning.pipeline import Pipeline
from stream_adapt.learning.stats import RunStats
from stream_adapt.runner import Observer, Runner, RunOptions

log = logging.getLogger(__name__)


def instance_name(settings: Settings | None = None) -> str:
    """This member's name (client.id, transactional.id suffix): `instance_id`, else the host name.

    Stable across restarts on purpose: with exactly-once, a restarted member with the same
    transactional.id fences its crashed predecessor and aborts the transaction it left open.
    """
    configured = settings.instance_id if settings is not None else None
    return configured or socket.gethostname()


@dataclass
class ServiceOptions:
    restore_timeout_s: float = 60.0
    max_backlog: int = 50_000  # undelivered producer messages that pause consumption
    resume_backlog: int = 10_000
    stats_interval_ms: int = 5000
    consumer_overrides: Mapping[str, Any] = field(default_factory=dict)
    producer_overrides: Mapping[str, Any] = field(default_factory=dict)


class KafkaService:
    """One member of the consumer group. `run()` returns when stopped (SIGTERM/SIGINT or `stop()`)."""

    def __init__(
        self,
        settings: Settings,
        model: AdaptableModel,
        *,
        options: ServiceOptions | None = None,
        observers: list[Observer] | None = None,
        name: str | None = None,
    ) -> None:
        self.settings = settings
        self.options = options or ServiceOptions()
        self.name = name or instance_name(settings)
        kafka = settings.kafka
        self.pipeline = Pipeline(model, settings.pipeline)
        # The sink first: it checks that Kafka answers and the topics exist. A consumer made before a
        # failed check would stay subscribed and hold partitions in the group.
        transactional_id = f"stream-adapt-{kafka.group}-{self.name}" if kafka.exactly_once else None
        self.sink = KafkaSink(
            kafka,
            client_id=f"stream-adapt-{self.name}",
            transactional_id=transactional_id,
            overrides=self.options.producer_overrides,
        )
        try:
            self.source = KafkaSource(
                kafka,
                client_id=f"stream-adapt-{self.name}",
                stats_interval_ms=self.options.stats_interval_ms,
                overrides=self.options.consumer_overrides,
            )
        except BaseException:
            self.sink.close()
            raise
        self.follower = GlobalFollower(kafka, kafka.model_topic)
        run_options = RunOptions(
            batch_size=settings.batch_size, poll_timeout_s=settings.poll_timeout_s, drain_at_end=False
        )
        self.runner = Runner(self.source, self.pipeline, self.sink, run_options, observers=list(observers or []))
        self.runner.hooks += [self._follow_global, self._backpressure]
        if kafka.exactly_once:
            self.sink.begin()
            self.runner.commit = self._commit_transaction
        self.source.set_listener(self)
        self.restored: list[Any] = []  # RestoreReports, for tests and the summary
        self.handed_over = (0, 0)  # (open windows, events in them) at the last revocation

    @classmethod
    def connect(
        cls,
        settings: Settings,
        model: AdaptableModel,
        *,
        stop: threading.Event | None = None,
        max_wait_s: float | None = None,
        **kwargs: Any,
    ) -> KafkaService | None:
        """Build the service, waiting for Kafka while it cannot be reached (deploy order, an outage).

        Retries with backoff (1 s doubling to 30 s) and a clear log line per attempt; a missing topic
        or a bad credential fails at once. Returns None if `stop` was set while waiting.
        """
        stop = stop or threading.Event()
        delay, waited = 1.0, 0.0
        while True:
            try:
                return cls(settings, model, **kwargs)
            except KafkaUnavailable as exc:
                if max_wait_s is not None and waited >= max_wait_s:
                    raise
                log.warning("%s; retrying in %.0fs", exc, delay)
                if stop.wait(delay):
                    return None
                waited += delay
                delay = min(delay * 2, 30.0)

    # ---- lifecycle ------------------------------------------------------------------------------
    def run(self) -> RunStats:
        log.info("member %s joining group %r on %s", self.name, self.settings.kafka.group, self.settings.kafka.topic)
        try:
            stats = self.runner.run()
        except BaseException:
            try:
                self.close()
            except Exception as exc:  # e.g. the final revocation's commit meets the same dead producer
                log.error("closing after the failure below: %s", exc)
            raise  # the failure itself, not a second report of it from the close
        self.close()
        return stats

    def stop(self) -> None:
        self.runner.stop()

    def close(self) -> None:
        """Leave the group and close clients (the runner already committed what was delivered).

        Every client is closed even if closing another raises (leaving the group runs `on_revoke`,
        whose commit raises when the producer can no longer deliver)."""
        try:
            self.source.close()
        finally:
            try:
                self.sink.close()
            finally:
                self.follower.close()

    # ---- rebalance (called inside poll) ---------------------------------------------------------
    def on_assign(self, partitions: list[TopicPartition]) -> None:
        failpoint("in_assign")
        report = restore_pipeline(
            self.pipeline,
            self.settings.kafka,
            self.settings.kafka.model_topic,
            partitions,
            timeout_s=self.options.restore_timeout_s,
        )
        self.restored.append(report)
        log.info("assigned %s; restored %s", sorted(p for _, p in partitions), report)

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        owned = set(self.source.assignment)
        lost = [tp for tp in partitions if tp not in owned]  # the source forgets lost partitions first
        if lost and self.settings.kafka.exactly_once:
            # The open transaction holds outputs of partitions another member may own by now: abort it
            # and restart from the committed state (in-memory versions may be ahead of what committed).
            self.sink.abort()
            raise StreamAdaptError(
                f"partitions {sorted(p for _, p in lost)} were lost (session expired or fenced); the open "
                "transaction was aborted; restart the member to restore from the committed state"
            )
        self.runner.commit_now(partitions)
        failpoint("in_revoke")
        held = self.pipeline.windows.open_events
        windows, entities = self.pipeline.drop_partitions(set(partitions))
        self.handed_over = (windows, held - self.pipeline.windows.open_events)
        self.runner.forget(partitions)
        log.info(
            "revoked %s: committed, handed over %d open windows (%d events, re-read by the next owner) and %d entities",
            sorted(p for _, p in partitions),
            windows,
            self.handed_over[1],
            entities,
        )

    # ---- between batches ------------------------------------------------------------------------
    def _follow_global(self) -> None:
        owns_global = any(p == 0 for _, p in self.source.assignment)
        self.pipeline.global_owner = owns_global
        if not owns_global:
            self.follower.poll(self.pipeline)

    def _backpressure(self) -> None:
        backlog = self.sink.backlog
        if not self.source.paused and backlog > self.options.max_backlog:
            log.warning(
                "producer backlog %d > %d: pausing consumption until delivered", backlog, self.options.max_backlog
            )
            self.source.pause_all()
        elif self.source.paused:
            self.sink.flush(0.5)
            if self.sink.backlog <= self.options.resume_backlog:
                log.info("producer backlog %d: resuming consumption", self.sink.backlog)
                self.source.resume_all()

    def _commit_transaction(self, offsets: Mapping[TopicPartition, int]) -> bool:
        # No eager begin() after it: `publish` opens the next transaction when there is something to send.
        # An eager one was left open at every clean shutdown, aborted by `sink.close` with a warning that
        # the input offsets were not committed (they were).
        self.sink.commit(offsets, self.source.group_metadata())
        return True
