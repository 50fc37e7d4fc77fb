"""Prometheus metrics, liveness and readiness of the service: every metric is defined here.

Why it is built this way:
- One module and its own `CollectorRegistry`: nothing leaks into the process-global default registry of
  an application that embeds the service, and tests build a fresh registry each.
- Fed only through seams the service already has, so the learning core never imports
  prometheus_client: a runner observer receives each `BatchResult`, `source.on_stats` receives
  librdkafka's statistics (lag per partition: not `get_watermark_offsets`, see KAFKA_LOCAL.md),
  `sink.on_update_delivered` receives each update the brokers acknowledged, and a runner hook refreshes
  gauges between batches.
- Per batch, not per event: the observer adds a batch's totals, so the hot path pays a few dozen
  operations per poll plus two histogram observations per adapted window.
- No label grows with entities: every label takes its values from a small fixed set (reasons, triggers,
  outcomes, outputs, scopes) or from the input topic's partitions. Those series are exported at 0 from
  the start, so `rate()` and alerts see them before the first occurrence.

`Observability` ties it together for one process: registry, health state and the HTTP endpoint that
serves `/metrics`, `/healthz` and `/readyz`; `watch(service)` feeds them from a `KafkaService`.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, get_args
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from stream_adapt import __version__
from stream_adapt.errors import StreamAdaptError
from stream_adapt.events import DECODE_REASONS, ModelUpdate, Outcome, Trigger

if TYPE_CHECKING:
    from stream_adapt.config import Settings
    from stream_adapt.io.ports import TopicPartition
    from stream_adapt.learning.pipeline import BatchResult
    from stream_adapt.service import KafkaService

log = logging.getLogger(__name__)

#: Label values known in advance (each series is exported at 0 from the start).
OUTCOMES: tuple[str, ...] = get_args(Outcome)
TRIGGERS: tuple[str, ...] = get_args(Trigger)
#: The gate's reasons (learning.adapt.ROLLBACK_REASONS, spelled out so that serving /healthz does not wait
#: for torch to import; a test keeps them equal), plus the per-entity rate limit applied after the gate.
ROLLBACK_LABELS = ("non_finite", "norm_jump", "norm_bound", "not_better", "rate_limited")
EVENT_STATUSES = ("learned", "ignored_type", "already_applied")
DRIFT_SCOPES = ("entity", "global")
ENTITY_KINDS = ("user", "item", "global")
OUTPUTS = ("model", "log", "dead_letter")
PUBLISH_FAILURE_REASONS = ("too_large", "timed_out", "aborted", "other")
STAGES = ("decode", "score_window", "adapt")

_WINDOWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LOSS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
_DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Event time can be old (a replayed log): buckets reach a week, so such data shows as such, not as +Inf.
_FRESHNESS_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
_FRESHNESS_BUCKETS += (3600.0, 6 * 3600.0, 86400.0, 7 * 86400.0)

#: `/healthz` fails when the service loop has not come round for this long (a hung member).
DEFAULT_STALL_AFTER_S = 120.0


class Metrics:
    """Every metric of the service, in `self.registry`. Methods are the feeding seams (see module doc)."""

    def __init__(self, *, topic: str, registry: CollectorRegistry | None = None, process: bool = True) -> None:
        """`topic`: the input topic (a label of the consumed-records counter, for the dashboard's filter).
        `process`: also export process_* (CPU, memory, open files) and python_info."""
        # `*_created` samples would double the series count and nothing reads them (process-wide switch).
        disable_created_metrics()
        self.registry = r = registry or CollectorRegistry()
        self.topic = topic
        self.build = Info("stream_adapt_build", "Version of stream-adapt and the base model it adapts.", registry=r)
        self.build.info({"version": __version__, "base_fingerprint": "", "topic": topic, "group": ""})
        records = Counter(
            "stream_adapt_records_consumed", "Records read from the input topic (valid or not).", ["topic"], registry=r
        )
        self._records = records.labels(topic)
        events = Counter(
            "stream_adapt_events_consumed",
            "Valid events by what happened to them: learned (scored, then windowed), ignored_type (a type the "
            "model does not learn from), already_applied (re-read after a restart, used before).",
            ["status"],
            registry=r,
        )
        self._events = {s: events.labels(s) for s in EVENT_STATUSES}
        self.dead_letters = Counter(
            "stream_adapt_dead_letters", "Records dead-lettered, by reason.", ["reason"], registry=r
        )
        self._dead = {reason: self.dead_letters.labels(reason) for reason in DECODE_REASONS}
        self._windows_filled = Counter("stream_adapt_windows_filled", "Windows that reached K shots.", registry=r)
        self.adaptations = Counter(
            "stream_adapt_adaptations",
            "Closed windows by outcome (accepted, rolled_back, expired: too few shots, not adapted) and trigger.",
            ["outcome", "trigger"],
            registry=r,
        )
        self._adaptations = {(o, t): self.adaptations.labels(o, t) for o in OUTCOMES for t in TRIGGERS}
        self.rollbacks = Counter(
            "stream_adapt_adaptation_rollbacks", "Adaptations the gate rolled back, by reason.", ["reason"], registry=r
        )
        self._rollbacks = {reason: self.rollbacks.labels(reason) for reason in ROLLBACK_LABELS}
        self._batch_windows = BatchHistogram(
            "stream_adapt_adaptation_batch_size",
            "Windows adapted together in one vectorised call.",
            buckets=_WINDOWS_BUCKETS,
            registry=r,
        )
        self._adapt_seconds = BatchHistogram(
            "stream_adapt_adaptation_duration_seconds",
            "Time spent adapting (all vectorised calls and any global re-adaptation) in one polled batch.",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self._batch_seconds = BatchHistogram(
            "stream_adapt_batch_duration_seconds",
            "Time of the whole learning step (decode, score, window, adapt) for one polled batch.",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        stage = Counter("stream_adapt_stage_seconds", "Time spent per pipeline stage.", ["stage"], registry=r)
        self._stage = {s: stage.labels(s) for s in STAGES}
        self._stage_counter = stage
        self._loss_before = BatchHistogram(
            "stream_adapt_adaptation_query_loss_before",
            "Query-shot loss (MSE) of each adapted window with the adapter in force before adapting.",
            buckets=_LOSS_BUCKETS,
            registry=r,
        )
        self._loss_after = BatchHistogram(
            "stream_adapt_adaptation_query_loss_after",
            "Query-shot loss (MSE) of each adapted window with the adapted candidate (before the gate).",
            buckets=_LOSS_BUCKETS,
            registry=r,
        )
        abs_err = Counter(
            "stream_adapt_prequential_absolute_error",
            "Sum of |prediction - value| over learned events, each scored before it is learned from: with the "
            "adapted model, and with no adaptation (the counterfactual). Divide by learned events for MAE.",
            ["model"],
            registry=r,
        )
        sq_err = Counter(
            "stream_adapt_prequential_squared_error",
            "Sum of squared prediction errors over learned events (see the absolute error).",
            ["model"],
            registry=r,
        )
        self._abs_err = (abs_err.labels("adapted"), abs_err.labels("no_adaptation"))
        self._sq_err = (sq_err.labels("adapted"), sq_err.labels("no_adaptation"))
        drift = Counter("stream_adapt_drift_detections", "Drift detections, by scope.", ["scope"], registry=r)
        self._drift = {s: drift.labels(s) for s in DRIFT_SCOPES}
        updates = Counter(
            "stream_adapt_updates_published",
            "Adapter versions the brokers acknowledged on the model topic, by entity kind.",
            ["entity_kind"],
            registry=r,
        )
        self._updates = {k: updates.labels(k) for k in ENTITY_KINDS}
        self._updates_counter = updates
        delivered = Counter(
            "stream_adapt_messages_delivered", "Messages the brokers acknowledged, by output.", ["output"], registry=r
        )
        self._delivered = {o: delivered.labels(o) for o in OUTPUTS}
        self._delivered_counter = delivered
        failures = Counter(
            "stream_adapt_publish_failures",
            "Failed or refused deliveries, by output and reason (timed_out and other failures are retried; "
            "too_large is dropped; aborted: a failed transaction).",
            ["output", "reason"],
            registry=r,
        )
        self._failures = {(o, why): failures.labels(o, why) for o in OUTPUTS for why in PUBLISH_FAILURE_REASONS}
        self._failures_counter = failures
        self._freshness = BatchHistogram(
            "stream_adapt_update_freshness_seconds",
            "Event time of a window's newest event -> the brokers acknowledged its update (old for a replayed log).",
            buckets=_FRESHNESS_BUCKETS,
            registry=r,
        )
        self._delivery = BatchHistogram(
            "stream_adapt_update_delivery_seconds",
            "Window closed -> the brokers acknowledged its update (wall clock).",
            buckets=_DELIVERY_BUCKETS,
            registry=r,
        )
        self._last_event = Gauge(
            "stream_adapt_last_event_timestamp_seconds", "Event time of the newest event processed.", registry=r
        )
        self._last_processed = Gauge(
            "stream_adapt_last_processed_timestamp_seconds",
            "Wall-clock time the last non-empty batch was processed.",
            registry=r,
        )
        self.windows_open = Gauge(
            "stream_adapt_windows_open", "Open windows (entities with pending shots).", registry=r
        )
        self.window_events = Gauge("stream_adapt_window_events", "Events held in open windows.", registry=r)
        self.adapters = Gauge("stream_adapt_adapters", "Entities whose adapter this member holds.", registry=r)
        self.global_version = Gauge(
            "stream_adapt_global_adapter_version", "Version of the shared adapter in force.", registry=r
        )
        self.assigned = Gauge("stream_adapt_assigned_partitions", "Input partitions this member owns.", registry=r)
        self.paused = Gauge("stream_adapt_consumer_paused", "1 while consumption is paused (backpressure).", registry=r)
        self.backlog = Gauge(
            "stream_adapt_producer_backlog_messages",
            "Messages handed to the producer, not yet acknowledged.",
            registry=r,
        )
        self.ready = Gauge("stream_adapt_ready", "1 when /readyz answers ready.", registry=r)
        self._lag = _LagCollector()
        r.register(self._lag)
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)

    # ---- feeding --------------------------------------------------------------------------------
    def observe_batch(self, r: BatchResult) -> None:
        """A runner observer: add one batch's totals (a handful of operations, plus two histogram
        observations per adapted window)."""
        if r.records:
            self._records.inc(r.records)
            self._last_processed.set(time.time())
        for status, n in (("learned", r.learned), ("ignored_type", r.ignored), ("already_applied", r.already_applied)):
            if n:
                self._events[status].inc(n)
        if r.dead_letters:
            for reason, n in Tally(d.reason for d in r.dead_letters).items():
                _child(self._dead, self.dead_letters, reason).inc(n)
        if r.windows_filled:
            self._windows_filled.inc(r.windows_filled)
        if r.log:
            self._observe_log(r)
        if r.adapt_batch_sizes or r.adapt_seconds:
            self._batch_windows.observe_many(r.adapt_batch_sizes)
            self._adapt_seconds.observe(r.adapt_seconds)
        if r.entity_drifts:
            self._drift["entity"].inc(r.entity_drifts)
        if r.global_drifts:
            self._drift["global"].inc(r.global_drifts)
        if r.learned:
            self._abs_err[0].inc(r.abs_err)
            self._abs_err[1].inc(r.base_abs_err)
            self._sq_err[0].inc(r.sq_err)
            self._sq_err[1].inc(r.base_sq_err)
        if r.stage_seconds:
            for stage, seconds in r.stage_seconds.items():
                _child(self._stage, self._stage_counter, stage).inc(seconds)
            if r.records:
                self._batch_seconds.observe(sum(r.stage_seconds.values()))
        if r.stream_time is not None:
            self._last_event.set(r.stream_time)

    def _observe_log(self, r: BatchResult) -> None:
        outcomes: Tally[tuple[str, str]] = Tally()
        rollbacks: Tally[str] = Tally()
        before: list[float] = []
        after: list[float] = []
        for rec in r.log:
            outcomes[(rec.outcome, rec.trigger)] += 1
            if rec.outcome == "rolled_back":
                rollbacks[rec.reason] += 1
            if rec.loss_before is not None and rec.loss_after is not None:
                before.append(rec.loss_before)
                after.append(rec.loss_after)
        self._loss_before.observe_many(before)
        self._loss_after.observe_many(after)
        for key, n in outcomes.items():
            _child(self._adaptations, self.adaptations, key).inc(n)
        for reason, n in rollbacks.items():
            _child(self._rollbacks, self.rollbacks, reason).inc(n)

    def observe_update_delivered(self, update: ModelUpdate, acked_at: float) -> None:
        """`sink.on_update_delivered`: the brokers acknowledged `update` at wall time `acked_at`."""
        _child(self._updates, self._updates_counter, update.entity_kind).inc()
        if update.event_time_last is not None:
            self._freshness.observe(max(0.0, acked_at - update.event_time_last))
        self._delivery.observe(max(0.0, acked_at - update.created_at))

    def observe_lag(self, read: Mapping[TopicPartition, int], committed: Mapping[TopicPartition, int]) -> None:
        """Replace the lag series (partitions not in the mappings disappear: revoked or unknown)."""
        self._lag.snapshot = (dict(read), dict(committed))

    def observe_outputs(self, delivered: Mapping[str, int], failures: Mapping[tuple[str, str], int]) -> None:
        """Add deliveries and failures counted since the last call, by output (and failure reason)."""
        for output, n in delivered.items():
            if n:
                _child(self._delivered, self._delivered_counter, output).inc(n)
        for (output, reason), n in failures.items():
            if n:
                _child(self._failures, self._failures_counter, (output, reason)).inc(n)

    def set_build(self, *, base_fingerprint: str, group: str) -> None:
        self.build.info(
            {"version": __version__, "base_fingerprint": base_fingerprint, "topic": self.topic, "group": group}
        )


def _child(cache: dict[Any, Any], parent: Counter, key: str | tuple[str, ...]) -> Any:
    """The labelled child for `key` (a label value, or a tuple of them), cached. A value outside the
    known set is added: the sets are bounded by the code that produces them, not by the data."""
    child = cache.get(key)
    if child is None:
        child = cache[key] = parent.labels(*(key if isinstance(key, tuple) else (key,)))
    return child


class BatchHistogram:
    """A histogram fed a batch of values at once: each value's bucket is found by bisection outside the
    lock and the batch is added under one lock (prometheus_client's `Histogram` takes a lock and scans
    the buckets for every value: 2 us per window instead of 0.5). Exported like any histogram."""

    def __init__(self, name: str, documentation: str, *, buckets: Iterable[float], registry: CollectorRegistry):
        self.name = name
        self.documentation = documentation
        self.bounds = sorted(float(b) for b in buckets)
        self._labels = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, value: float) -> None:
        i = bisect_left(self.bounds, value)
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def observe_many(self, values: Iterable[float]) -> None:
        bounds, counts, total = self.bounds, [0] * len(self._counts), 0.0
        for v in values:
            counts[bisect_left(bounds, v)] += 1  # the first bucket whose bound is >= v: le semantics
            total += v
        with self._lock:
            for i, n in enumerate(counts):
                if n:
                    self._counts[i] += n
            self._sum += total

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, buckets = 0, []
        for label, n in zip(self._labels, counts, strict=True):
            cumulative += n
            buckets.append((label, float(cumulative)))
        return [HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)]


class _LagCollector:
    """Lag per owned partition from the latest librdkafka statistics, swapped in whole (no torn scrape)."""

    def __init__(self) -> None:
        self.snapshot: tuple[dict[TopicPartition, int], dict[TopicPartition, int]] = ({}, {})

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        read, committed = self.snapshot
        return list(self._families(read, committed))

    @staticmethod
    def _families(
        read: Mapping[TopicPartition, int] | None = None, committed: Mapping[TopicPartition, int] | None = None
    ) -> Iterator[Metric]:
        for name, doc, values in (
            (
                "stream_adapt_consumer_lag_records",
                "Records in an owned partition after this member's read position (is it keeping up?).",
                read,
            ),
            (
                "stream_adapt_consumer_committed_lag_records",
                "Records after the committed offset (what a restart re-reads; includes events held in open windows).",
                committed,
            ),
        ):
            family = GaugeMetricFamily(name, doc, labels=["topic", "partition"])
            for (topic, partition), n in sorted((values or {}).items()):
                family.add_metric([topic, str(partition)], n)
            yield family


def lags_from_statistics(
    stats: Mapping[str, Any], assigned: Collection[TopicPartition]
) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
    """(read lag, committed lag) per assigned partition from a librdkafka statistics object.

    Read lag: the partition's end (last stable offset, else high watermark) minus the read position
    (`app_offset`: the offset after the last record handed to the application; before the first one,
    the committed offset, else the log start, which is where `auto.offset.reset=earliest` begins).
    Committed lag: librdkafka's `consumer_lag`. Values librdkafka reports as unknown (-1, -1001) leave
    the partition out, rather than exporting a made-up number.
    """
    owned = set(assigned)
    read: dict[TopicPartition, int] = {}
    committed: dict[TopicPartition, int] = {}
    for topic, tstats in (stats.get("topics") or {}).items():
        for pid, p in (tstats.get("partitions") or {}).items():
            tp = (topic, int(pid))
            if tp not in owned:
                continue
            end = _offset(p, "ls_offset")
            end = end if end is not None else _offset(p, "hi_offset")
            position = _offset(p, "app_offset")
            for fallback in ("committed_offset", "lo_offset"):
                position = position if position is not None else _offset(p, fallback)
            if end is not None and position is not None:
                read[tp] = max(0, end - position)
            lag = p.get("consumer_lag")
            if isinstance(lag, int) and lag >= 0:
                committed[tp] = lag
    return read, committed


def _offset(p: Mapping[str, Any], key: str) -> int | None:
    value = p.get(key)
    return value if isinstance(value, int) and value >= 0 else None


class Readiness:
    """When a member is ready to serve: it owns partitions (their state restored: the source records an
    assignment only after the restore) and it has caught up with them once.

    Caught up: the read lag of every owned partition is known and the total is at most `max_lag`. It
    is latched for that set of partitions, so a burst of load does not flap readiness (lag has its own
    alert); owning a partition it has not caught up on (a rebalance) makes it unready until it has.
    """

    def __init__(self, max_lag: int) -> None:
        self.max_lag = max_lag
        self._caught_up_on: frozenset[TopicPartition] = frozenset()

    def update(self, assigned: Collection[TopicPartition], lag: Mapping[TopicPartition, int]) -> tuple[bool, str]:
        """(ready, why) for the current assignment and the latest read lag."""
        owned = frozenset(assigned)
        if not owned:
            return False, "no partitions assigned (joining the group, rebalancing, or more members than partitions)"
        if owned <= self._caught_up_on:
            self._caught_up_on = owned  # a partition given up and later regained is checked again
            return True, f"ready: {len(owned)} partition(s) assigned, caught up"
        unknown = sorted(owned - lag.keys())
        if unknown:
            return False, f"{len(owned)} partition(s) assigned; waiting for the lag of {_describe(unknown)}"
        total = sum(lag[tp] for tp in owned)
        if total > self.max_lag:
            return (
                False,
                f"catching up: {total} records behind on {len(owned)} partition(s) (ready at <= {self.max_lag})",
            )
        self._caught_up_on = owned
        return True, f"ready: {len(owned)} partition(s) assigned, caught up ({total} records behind)"


def _describe(tps: list[TopicPartition]) -> str:
    return ", ".join(f"{t}[{p}]" for t, p in tps[:8]) + (" ..." if len(tps) > 8 else "")


class Health:
    """What `/healthz` and `/readyz` answer. Written by the service thread, read by HTTP threads: each
    state is one tuple or float, replaced whole (an atomic rebinding), so no lock is needed."""

    def __init__(self, stall_after_s: float = DEFAULT_STALL_AFTER_S, clock: Callable[[], float] = time.monotonic):
        self.stall_after_s = stall_after_s
        self._clock = clock
        self._ready: tuple[bool, str] = (False, "starting (loading the model, connecting to Kafka)")
        self._beat: float | None = None  # None until the service loop runs
        self._stopped: str | None = None

    def beat(self) -> None:
        """The service loop came round (called between batches)."""
        self._beat = self._clock()

    def set_ready(self, ready: bool, reason: str) -> None:
        self._ready = (ready, reason)

    def stopped(self, reason: str) -> None:
        """The service loop ended: neither alive nor ready from now on."""
        self._stopped = reason
        self._ready = (False, reason)

    def liveness(self) -> tuple[bool, str]:
        """Alive unless the loop ended or has not come round for `stall_after_s` (hung). Waiting for
        Kafka at start counts as alive: a restart would not make Kafka reachable."""
        if self._stopped is not None:
            return False, self._stopped
        beat = self._beat
        if beat is None:
            return True, "alive (service starting)"
        silent = self._clock() - beat
        if silent > self.stall_after_s:
            return False, f"the service loop has not come round for {silent:.0f}s (stalled)"
        return True, "alive"

    def readiness(self) -> tuple[bool, str]:
        return self._ready


class ServiceMonitor:
    """Feeds `Metrics` and `Health` from a `KafkaService` through its seams (see the module doc)."""

    def __init__(self, service: KafkaService, metrics: Metrics, health: Health, *, ready_max_lag: int) -> None:
        self.service = service
        self.metrics = metrics
        self.health = health
        self.readiness = Readiness(ready_max_lag)
        kafka = service.settings.kafka
        self._outputs = {kafka.model_topic: "model", kafka.log_topic: "log", kafka.dead_letter_topic: "dead_letter"}
        self._seen_delivered: dict[str, int] = {}
        self._seen_failures: dict[tuple[str, str], int] = {}
        self._read_lag: dict[TopicPartition, int] = {}
        self._owned: frozenset[TopicPartition] = frozenset()
        metrics.set_build(base_fingerprint=service.pipeline.model.fingerprint, group=kafka.group)
        service.runner.observers.append(metrics.observe_batch)
        service.runner.hooks.append(self.refresh)
        service.sink.on_update_delivered.append(metrics.observe_update_delivered)
        previous = service.source.on_stats

        def on_stats(stats: dict[str, Any]) -> None:
            self.on_stats(stats)
            if previous is not None:
                previous(stats)

        service.source.on_stats = on_stats

    def on_stats(self, stats: Mapping[str, Any]) -> None:
        """librdkafka statistics (served inside the consumer's poll, on the service thread)."""
        read, committed = lags_from_statistics(stats, self.service.source.assignment)
        self._read_lag = read
        self.metrics.observe_lag(read, committed)
        self._update_readiness()

    def refresh(self) -> None:
        """Between batches: liveness beat, gauges, output counters, readiness."""
        self.health.beat()
        s, m = self.service, self.metrics
        m.windows_open.set(len(s.pipeline.windows))
        m.window_events.set(s.pipeline.windows.open_events)
        m.adapters.set(len(s.pipeline.table))
        m.global_version.set(s.pipeline.global_version)
        m.paused.set(1 if s.source.paused else 0)
        m.backlog.set(s.sink.backlog)
        self._count_outputs()
        self._update_readiness()

    def _count_outputs(self) -> None:
        delivered: Tally[str] = Tally()
        for topic, n in self.service.sink.delivered.items():
            delivered[self._outputs.get(topic, "other")] += n - self._seen_delivered.get(topic, 0)
            self._seen_delivered[topic] = n
        failures: Tally[tuple[str, str]] = Tally()
        for (topic, reason), n in self.service.sink.failures.items():
            key = (self._outputs.get(topic, "other"), failure_reason(reason))
            failures[key] += n - self._seen_failures.get((topic, reason), 0)
            self._seen_failures[(topic, reason)] = n
        self.metrics.observe_outputs(
            {k: v for k, v in delivered.items() if k in OUTPUTS}, {k: v for k, v in failures.items() if k[0] in OUTPUTS}
        )

    def _update_readiness(self) -> None:
        assigned = self.service.source.assignment
        owned = frozenset(assigned)
        for tp in owned - self._owned:  # newly assigned: a lag from before is stale, wait for fresh statistics
            self._read_lag.pop(tp, None)
        self._owned = owned
        ready, reason = self.readiness.update(assigned, self._read_lag)
        self.metrics.assigned.set(len(assigned))
        self.metrics.ready.set(1 if ready else 0)
        self.health.set_ready(ready, reason)


def failure_reason(reason: str) -> str:
    """The sink's failure reason (librdkafka error name) folded into the bounded metric label set."""
    if reason in ("too_large", "aborted"):
        return reason
    return "timed_out" if "timed_out" in reason else "other"


# ---- HTTP: /metrics, /healthz, /readyz ------------------------------------------------------------
class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in flight never holds up shutdown


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # one line per scrape would drown the log
        """Log nothing."""


WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def health_app(registry: CollectorRegistry, health: Health) -> WSGIApp:
    """A WSGI app: `/metrics` (Prometheus text or OpenMetrics, gzip when asked), `/healthz`, `/readyz`."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/readyz"):
            ok, why = health.liveness() if path == "/healthz" else health.readiness()
            body = f"{'ok' if ok else 'not ok'}: {why}\n".encode()
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")])
            return [body]
        if path in ("/metrics", "/"):
            return metrics_app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: try /metrics, /healthz or /readyz\n"]

    return app


class MetricsServer:
    """Serves `health_app` on a background thread. Port 0 picks a free port (tests, the demo)."""

    def __init__(self, registry: CollectorRegistry, health: Health, *, host: str = "0.0.0.0", port: int = 9464):
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
            server_class = _Server6 if family == socket.AF_INET6 else _Server
            self._server = make_server(
                host, port, health_app(registry, health), server_class=server_class, handler_class=_QuietHandler
            )
        except OSError as exc:
            raise StreamAdaptError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="metrics-http", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        """Where to scrape from this machine."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("[::1]" if self.host == "::" else self.host)
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class Observability:
    """Metrics, health and their HTTP endpoint for one process; `watch(service)` feeds them."""

    def __init__(
        self,
        *,
        topic: str,
        host: str = "0.0.0.0",
        port: int = 9464,
        ready_max_lag: int = 10_000,
        registry: CollectorRegistry | None = None,
        stall_after_s: float = DEFAULT_STALL_AFTER_S,
    ) -> None:
        self.metrics = Metrics(topic=topic, registry=registry)
        self.health = Health(stall_after_s)
        self.ready_max_lag = ready_max_lag
        self.server = MetricsServer(self.metrics.registry, self.health, host=host, port=port)
        self.monitor: ServiceMonitor | None = None
        log.info("metrics at %s (health: /healthz, readiness: /readyz)", self.server.url)

    @classmethod
    def from_settings(cls, settings: Settings) -> Observability | None:
        """The endpoint `settings` ask for (`metrics_port`), or None when it is not set."""
        if settings.metrics_port is None:
            return None
        return cls(
            topic=settings.kafka.topic,
            host=settings.metrics_host,
            port=settings.metrics_port,
            ready_max_lag=settings.ready_max_lag,
        )

    @property
    def url(self) -> str:
        return self.server.url

    def watch(self, service: KafkaService) -> ServiceMonitor:
        self.monitor = ServiceMonitor(service, self.metrics, self.health, ready_max_lag=self.ready_max_lag)
        return self.monitor

    def close(self, reason: str = "stopped") -> None:
        """Mark the service stopped (not alive, not ready) and stop serving."""
        self.health.stopped(reason)
        self.metrics.ready.set(0)
        self.server.close()

    def __enter__(self) -> Observability:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
