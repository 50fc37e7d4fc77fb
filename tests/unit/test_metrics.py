"""Metrics, lag from librdkafka statistics, readiness, liveness and the HTTP endpoint, without a broker.

Every test builds its own `CollectorRegistry` and reads values back with `get_sample_value`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from stream_adapt.events import DECODE_REASONS, AdaptationRecord, DecodeError, ModelUpdate, Position
from stream_adapt.learning.pipeline import BatchResult
from stream_adapt.metrics import (
    OUTCOMES,
    OUTPUTS,
    PUBLISH_FAILURE_REASONS,
    ROLLBACK_LABELS,
    TRIGGERS,
    BatchHistogram,
    Health,
    Metrics,
    MetricsServer,
    Readiness,
    failure_reason,
    lags_from_statistics,
)

REPO = Path(__file__).resolve().parents[2]
TOPIC = "feedback"
#: Label names that would grow with entities: none may exist on any metric.
ENTITY_LABELS = {"entity", "user", "user_id", "item", "item_id", "event_id", "key", "offset"}


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(topic=TOPIC, registry=CollectorRegistry())


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def record(
    entity: str,
    outcome: str = "accepted",
    reason: str = "improved",
    trigger: str = "window_full",
    loss: tuple[float | None, float | None] = (1.0, 0.5),
) -> AdaptationRecord:
    return AdaptationRecord(
        entity=entity,
        entity_kind="user",
        outcome=outcome,  # type: ignore[arg-type]
        reason=reason,
        trigger=trigger,  # type: ignore[arg-type]
        version=1 if outcome == "accepted" else None,
        parent_version=None,
        base_fingerprint="sha256:test",
        positions=[{"topic": TOPIC, "partition": 0, "offset": 1}],
        n_support=6,
        n_query=2,
        loss_before=loss[0],
        loss_after=loss[1],
        event_time_first=1.7e9,
        event_time_last=1.7e9 + 10,
        created_at=1.7e9 + 20,
    )


def update(entity: str, kind: str = "user", event_time_last: float | None = 1000.0) -> ModelUpdate:
    return ModelUpdate(
        entity=entity,
        entity_kind=kind,  # type: ignore[arg-type]
        version=1,
        parent_version=None,
        base_fingerprint="sha256:test",
        trigger="window_full",
        positions=[],
        loss_before=1.0,
        loss_after=0.5,
        n_support=6,
        n_query=2,
        event_time_first=None,
        event_time_last=event_time_last,
        created_at=1010.0,
        tensors={},
    )


def dead(reason: str) -> DecodeError:
    return DecodeError(b"x", reason, "detail", Position(TOPIC, 0, 0))


def series(m: Metrics) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """Every (sample name, labels) the registry exports now, values aside."""
    return {
        (s.name, tuple(sorted(s.labels.items())))
        for family in m.registry.collect()
        for s in family.samples
        if not s.name.startswith(("process_", "python_"))
    }


# ---- what is exported ------------------------------------------------------------------------------
def test_every_labelled_series_is_exported_at_zero_before_anything_happens(metrics: Metrics) -> None:
    for reason in DECODE_REASONS:
        assert value(metrics, "stream_adapt_dead_letters_total", reason=reason) == 0
    for outcome in OUTCOMES:
        for trigger in TRIGGERS:
            assert value(metrics, "stream_adapt_adaptations_total", outcome=outcome, trigger=trigger) == 0
    for reason in ROLLBACK_LABELS:
        assert value(metrics, "stream_adapt_adaptation_rollbacks_total", reason=reason) == 0
    for output in OUTPUTS:
        assert value(metrics, "stream_adapt_messages_delivered_total", output=output) == 0
        for why in PUBLISH_FAILURE_REASONS:
            assert value(metrics, "stream_adapt_publish_failures_total", output=output, reason=why) == 0
    for scope in ("entity", "global"):
        assert value(metrics, "stream_adapt_drift_detections_total", scope=scope) == 0
    for status in ("learned", "ignored_type", "already_applied"):
        assert value(metrics, "stream_adapt_events_consumed_total", status=status) == 0
    assert value(metrics, "stream_adapt_records_consumed_total", topic=TOPIC) == 0
    assert value(metrics, "stream_adapt_update_freshness_seconds_count") == 0
    assert value(metrics, "stream_adapt_ready") == 0
    info = {"version": "0.1.0", "base_fingerprint": "", "topic": TOPIC, "group": ""}
    assert value(metrics, "stream_adapt_build_info", **info) == 1


def test_names_follow_prometheus_conventions(metrics: Metrics) -> None:
    for family in metrics.registry.collect():
        if family.name.startswith(("process_", "python_")):
            continue
        assert family.name.startswith("stream_adapt_"), family.name
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
        assert not family.name.endswith(("_milliseconds", "_ms", "_minutes", "_hours")), "base units: seconds"
        assert not any(n.endswith("_created") for n in {s.name for s in family.samples}), "no *_created series"


@pytest.mark.skipif(not shutil.which("promtool") and not os.environ.get("CI"), reason="promtool not installed")
def test_the_exposition_passes_promtool_lint(metrics: Metrics) -> None:
    metrics.observe_batch(_busy_batch())
    metrics.observe_lag({(TOPIC, 0): 3}, {(TOPIC, 0): 7})
    text = generate_latest(metrics.registry)
    done = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()


# ---- feeding -------------------------------------------------------------------------------------
def _busy_batch() -> BatchResult:
    return BatchResult(
        records=100,
        events=96,
        learned=90,
        ignored=4,
        already_applied=2,
        dead_letters=[dead("not_json"), dead("not_json"), dead("value_out_of_range"), dead("duplicate_event_id")],
        log=[
            record("u1"),
            record("u2", trigger="drift", loss=(2.0, 1.0)),
            record("u3", "rolled_back", "not_better", loss=(0.5, 0.75)),
            record("u4", "rolled_back", "norm_jump", "max_age"),
            record("u5", "expired", "too_few_shots", "evicted", loss=(None, None)),
        ],
        windows_filled=3,
        entity_drifts=2,
        global_drifts=1,
        abs_err=45.0,
        sq_err=30.0,
        base_abs_err=54.0,
        base_sq_err=40.0,
        adapt_batch_sizes=[3, 1],
        adapt_seconds=0.02,
        stream_time=1.7e9 + 10,
        stage_seconds={"decode": 0.01, "score_window": 0.02, "adapt": 0.03},
    )


def test_a_batch_is_counted_by_status_reason_outcome_trigger_and_scope(metrics: Metrics) -> None:
    metrics.observe_batch(_busy_batch())
    metrics.observe_batch(BatchResult(records=5, events=5, learned=5, abs_err=1.0, base_abs_err=2.0))
    m = metrics
    assert value(m, "stream_adapt_records_consumed_total", topic=TOPIC) == 105
    assert value(m, "stream_adapt_events_consumed_total", status="learned") == 95
    assert value(m, "stream_adapt_events_consumed_total", status="ignored_type") == 4
    assert value(m, "stream_adapt_events_consumed_total", status="already_applied") == 2
    assert value(m, "stream_adapt_dead_letters_total", reason="not_json") == 2
    assert value(m, "stream_adapt_dead_letters_total", reason="duplicate_event_id") == 1
    assert value(m, "stream_adapt_windows_filled_total") == 3
    assert value(m, "stream_adapt_adaptations_total", outcome="accepted", trigger="window_full") == 1
    assert value(m, "stream_adapt_adaptations_total", outcome="accepted", trigger="drift") == 1
    assert value(m, "stream_adapt_adaptations_total", outcome="rolled_back", trigger="window_full") == 1
    assert value(m, "stream_adapt_adaptations_total", outcome="rolled_back", trigger="max_age") == 1
    assert value(m, "stream_adapt_adaptations_total", outcome="expired", trigger="evicted") == 1
    assert value(m, "stream_adapt_adaptation_rollbacks_total", reason="not_better") == 1
    assert value(m, "stream_adapt_adaptation_rollbacks_total", reason="norm_jump") == 1
    # loss histograms: the four adapted windows, not the expired one
    assert value(m, "stream_adapt_adaptation_query_loss_before_count") == 4
    assert value(m, "stream_adapt_adaptation_query_loss_before_sum") == 4.5
    assert value(m, "stream_adapt_adaptation_query_loss_after_sum") == 2.75
    assert value(m, "stream_adapt_adaptation_query_loss_after_bucket", le="0.5") == 2
    assert value(m, "stream_adapt_adaptation_batch_size_count") == 2
    assert value(m, "stream_adapt_adaptation_batch_size_sum") == 4
    assert value(m, "stream_adapt_adaptation_duration_seconds_count") == 1
    assert value(m, "stream_adapt_batch_duration_seconds_count") == 1  # the second batch reported no stage times
    assert value(m, "stream_adapt_stage_seconds_total", stage="adapt") == pytest.approx(0.03)
    assert value(m, "stream_adapt_drift_detections_total", scope="entity") == 2
    assert value(m, "stream_adapt_drift_detections_total", scope="global") == 1
    assert value(m, "stream_adapt_prequential_absolute_error_total", model="adapted") == 46
    assert value(m, "stream_adapt_prequential_absolute_error_total", model="no_adaptation") == 56
    assert value(m, "stream_adapt_last_event_timestamp_seconds") == 1.7e9 + 10
    assert (value(m, "stream_adapt_last_processed_timestamp_seconds") or 0) > 1.7e9


def test_batch_histogram_exports_what_prometheus_clients_histogram_would() -> None:
    from prometheus_client import Histogram

    values = [0.0, 0.01, 0.05, 0.0500001, 0.7, 1.0, 3.9, 64.0, 65.0, -1.0]
    reference, ours = CollectorRegistry(), CollectorRegistry()
    buckets = (0.01, 0.05, 1.0, 4.0, 64.0)
    h = Histogram("h", "doc", buckets=buckets, registry=reference)
    for v in values:
        h.observe(v)
    batch = BatchHistogram("h", "doc", buckets=buckets, registry=ours)
    batch.observe_many(values[:6])
    for v in values[6:]:
        batch.observe(v)

    def samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
        return {
            (s.name, s.labels.get("le", "")): s.value
            for f in registry.collect()
            for s in f.samples
            if not s.name.endswith("_created")
        }

    assert samples(ours) == samples(reference)


def test_an_empty_poll_changes_no_counter(metrics: Metrics) -> None:
    before = {s: v for s, v in _values(metrics).items()}
    metrics.observe_batch(BatchResult())
    assert _values(metrics) == before


def _values(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in m.registry.collect()
        for s in family.samples
        if not s.name.startswith(("process_", "python_"))
    }


def test_a_delivered_update_is_timed_from_its_event_time_and_from_its_window_closing(metrics: Metrics) -> None:
    metrics.observe_update_delivered(update("u1"), acked_at=1010.25)
    metrics.observe_update_delivered(update("u2", event_time_last=2000.0), acked_at=1010.5)  # clock skew: 0
    metrics.observe_update_delivered(update("__global__", "global", None), acked_at=1011.0)
    assert value(metrics, "stream_adapt_updates_published_total", entity_kind="user") == 2
    assert value(metrics, "stream_adapt_updates_published_total", entity_kind="global") == 1
    assert value(metrics, "stream_adapt_update_freshness_seconds_count") == 2  # the global one has no event time
    assert value(metrics, "stream_adapt_update_freshness_seconds_sum") == 10.25
    assert value(metrics, "stream_adapt_update_delivery_seconds_sum") == 0.25 + 0.5 + 1.0
    assert value(metrics, "stream_adapt_update_delivery_seconds_bucket", le="0.25") == 1


def test_no_series_appears_per_entity_however_many_entities_flow_through(metrics: Metrics) -> None:
    metrics.observe_batch(_busy_batch())
    metrics.observe_update_delivered(update("u0"), 1010.0)
    known = series(metrics)
    for i in range(2000):
        metrics.observe_batch(BatchResult(records=1, learned=1, log=[record(f"user-{i}")]))
        metrics.observe_update_delivered(update(f"user-{i}"), 1010.0 + i)
    assert series(metrics) == known
    labels = {name for _, pairs in known for name, _ in pairs}
    assert not labels & ENTITY_LABELS, labels


def test_deliveries_and_failures_are_counted_by_output_and_bounded_reason(metrics: Metrics) -> None:
    metrics.observe_outputs({"model": 3, "log": 5}, {("model", "timed_out"): 2, ("dead_letter", "too_large"): 1})
    assert value(metrics, "stream_adapt_messages_delivered_total", output="log") == 5
    assert value(metrics, "stream_adapt_publish_failures_total", output="model", reason="timed_out") == 2
    assert value(metrics, "stream_adapt_publish_failures_total", output="dead_letter", reason="too_large") == 1
    assert [failure_reason(r) for r in ("msg_timed_out", "too_large", "aborted", "all_brokers_down")] == [
        "timed_out",
        "too_large",
        "aborted",
        "other",
    ]


# ---- lag from librdkafka statistics --------------------------------------------------------------
def _partition(**fields: int) -> dict[str, Any]:
    base = {
        "fetch_state": "active",
        "app_offset": -1001,
        "committed_offset": -1001,
        "hi_offset": -1001,
        "lo_offset": -1001,
        "ls_offset": -1001,
        "consumer_lag": -1,
    }
    return {**base, **fields}


STATS: dict[str, Any] = {
    "topics": {
        TOPIC: {
            "partitions": {
                # read 300 of 502, nothing committed yet
                "0": _partition(app_offset=300, hi_offset=502, ls_offset=502, lo_offset=0),
                # nothing read since the assignment: from the committed offset
                "1": _partition(committed_offset=50, hi_offset=498, ls_offset=498, lo_offset=0, consumer_lag=448),
                # nothing read, nothing committed: from the start of the log (auto.offset.reset=earliest)
                "2": _partition(hi_offset=10, ls_offset=10, lo_offset=4),
                # no fetch answered yet: unknown, left out
                "3": _partition(),
                # not owned by this member
                "4": _partition(app_offset=1, hi_offset=9, ls_offset=9, lo_offset=0),
                # librdkafka's internal "unassigned" partition
                "-1": _partition(),
            }
        }
    }
}


def test_lag_per_partition_comes_from_statistics_and_unknown_or_foreign_partitions_are_left_out() -> None:
    owned = [(TOPIC, p) for p in range(4)]
    read, committed = lags_from_statistics(STATS, owned)
    assert read == {(TOPIC, 0): 202, (TOPIC, 1): 448, (TOPIC, 2): 6}
    assert committed == {(TOPIC, 1): 448}


def test_the_lag_series_are_replaced_whole(metrics: Metrics) -> None:
    metrics.observe_lag({(TOPIC, 0): 5, (TOPIC, 1): 7}, {(TOPIC, 1): 9})
    assert value(metrics, "stream_adapt_consumer_lag_records", topic=TOPIC, partition="1") == 7
    assert value(metrics, "stream_adapt_consumer_committed_lag_records", topic=TOPIC, partition="1") == 9
    metrics.observe_lag({(TOPIC, 0): 6}, {})  # partition 1 revoked
    assert value(metrics, "stream_adapt_consumer_lag_records", topic=TOPIC, partition="0") == 6
    assert value(metrics, "stream_adapt_consumer_lag_records", topic=TOPIC, partition="1") is None
    assert value(metrics, "stream_adapt_consumer_committed_lag_records", topic=TOPIC, partition="1") is None


# ---- readiness and liveness ----------------------------------------------------------------------
def test_readiness_needs_partitions_and_a_known_small_lag_then_holds_until_new_partitions_arrive() -> None:
    ready = Readiness(max_lag=100)
    p0, p1 = (TOPIC, 0), (TOPIC, 1)
    assert ready.update([], {})[0] is False
    assert "no partitions" in ready.update([], {p0: 0})[1]
    assert ready.update([p0, p1], {p0: 0})[0] is False  # p1's lag unknown
    not_yet, why = ready.update([p0, p1], {p0: 60, p1: 50})
    assert not not_yet and "110 records behind" in why
    assert ready.update([p0, p1], {p0: 60, p1: 40})[0] is True
    assert ready.update([p0, p1], {p0: 5000, p1: 5000})[0] is True  # latched: a burst does not flap it
    assert ready.update([p0], {p0: 5000})[0] is True  # fewer partitions after a rebalance: still caught up
    assert ready.update([p0, p1], {p0: 5000, p1: 5000})[0] is False  # p1 regained: checked again
    p2 = (TOPIC, 2)
    assert ready.update([p0, p2], {p0: 5000, p2: 0})[0] is False  # a new partition: catch up again
    assert ready.update([p0, p2], {p0: 20, p2: 0})[0] is True
    assert ready.update([], {})[0] is False


def test_liveness_fails_when_the_loop_stalls_or_stops_but_not_while_waiting_for_kafka() -> None:
    now = [0.0]
    health = Health(stall_after_s=120, clock=lambda: now[0])
    now[0] = 1000.0
    assert health.liveness()[0] is True  # never beat: starting (waiting for Kafka)
    health.beat()
    now[0] += 119
    assert health.liveness()[0] is True
    now[0] += 2
    alive, why = health.liveness()
    assert not alive and "stalled" in why
    health.beat()
    assert health.liveness()[0] is True
    health.stopped("stopped")
    assert health.liveness() == (False, "stopped")
    assert health.readiness()[0] is False


def _fake_service() -> Any:
    """The parts of a KafkaService that ServiceMonitor touches."""
    from collections import Counter
    from types import SimpleNamespace

    from stream_adapt.config import KafkaConfig

    kafka = KafkaConfig(topic=TOPIC, model_topic="m", log_topic="l", dead_letter_topic="d", group="g")
    return SimpleNamespace(
        settings=SimpleNamespace(kafka=kafka),
        runner=SimpleNamespace(observers=[], hooks=[]),
        source=SimpleNamespace(assignment=[(TOPIC, 0)], paused=False, on_stats=None),
        sink=SimpleNamespace(delivered=Counter(), failures=Counter(), backlog=3, on_update_delivered=[]),
        pipeline=SimpleNamespace(
            windows=type("W", (), {"open_events": 12, "__len__": lambda self: 4})(),
            table=[1, 2, 3],
            global_version=2,
            model=SimpleNamespace(fingerprint="sha256:abc"),
        ),
    )


def test_the_monitor_feeds_gauges_output_deltas_lag_and_readiness_through_the_service_seams(metrics: Metrics) -> None:
    from stream_adapt.metrics import ServiceMonitor

    service = _fake_service()
    seen: list[dict[str, Any]] = []
    service.source.on_stats = seen.append  # a hook set before: still called
    health = Health()
    monitor = ServiceMonitor(service, metrics, health, ready_max_lag=100)
    assert service.runner.observers == [metrics.observe_batch]
    assert service.sink.on_update_delivered == [metrics.observe_update_delivered]
    (refresh,) = service.runner.hooks

    service.sink.delivered.update({"m": 5, "l": 7})
    service.sink.failures.update({("m", "msg_timed_out"): 2})
    refresh()
    assert health.readiness()[0] is False  # no lag known yet
    service.sink.delivered.update({"m": 1})
    refresh()
    assert value(metrics, "stream_adapt_messages_delivered_total", output="model") == 6  # deltas, not totals
    assert value(metrics, "stream_adapt_messages_delivered_total", output="log") == 7
    assert value(metrics, "stream_adapt_publish_failures_total", output="model", reason="timed_out") == 2
    assert (value(metrics, "stream_adapt_windows_open"), value(metrics, "stream_adapt_window_events")) == (4, 12)
    assert (value(metrics, "stream_adapt_adapters"), value(metrics, "stream_adapt_global_adapter_version")) == (3, 2)
    assert value(metrics, "stream_adapt_producer_backlog_messages") == 3
    stats = {"topics": {TOPIC: {"partitions": {"0": _partition(app_offset=90, hi_offset=100, ls_offset=100)}}}}
    service.source.on_stats(stats)
    assert seen == [stats]
    assert value(metrics, "stream_adapt_consumer_lag_records", topic=TOPIC, partition="0") == 10
    assert health.readiness() == (True, "ready: 1 partition(s) assigned, caught up (10 records behind)")
    assert value(metrics, "stream_adapt_ready") == 1
    build = {"version": "0.1.0", "base_fingerprint": "sha256:abc", "topic": TOPIC, "group": "g"}
    assert value(metrics, "stream_adapt_build_info", **build) == 1
    service.source.assignment = [(TOPIC, 0), (TOPIC, 1)]  # a rebalance adds a partition
    refresh()
    assert health.readiness()[0] is False
    assert monitor.readiness.max_lag == 100


# ---- the HTTP endpoint ---------------------------------------------------------------------------
@pytest.fixture
def server(metrics: Metrics) -> Iterator[tuple[MetricsServer, Health]]:
    health = Health()
    srv = MetricsServer(metrics.registry, health, host="127.0.0.1", port=0)
    yield srv, health
    srv.close()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_endpoint_serves_metrics_liveness_and_readiness(server: tuple[MetricsServer, Health]) -> None:
    srv, health = server
    base = srv.url.removesuffix("/metrics")
    status, text = _get(srv.url)
    assert status == 200 and 'stream_adapt_records_consumed_total{topic="feedback"} 0.0' in text
    assert _get(base + "/healthz")[0] == 200
    status, text = _get(base + "/readyz")
    assert status == 503 and text.startswith("not ok: starting")
    health.set_ready(True, "ready: 2 partition(s) assigned, caught up")
    assert _get(base + "/readyz") == (200, "ok: ready: 2 partition(s) assigned, caught up\n")
    assert _get(base + "/nothing-here")[0] == 404


def test_a_busy_port_is_a_clear_error(server: tuple[MetricsServer, Health]) -> None:
    from stream_adapt.errors import StreamAdaptError

    srv, health = server
    with pytest.raises(StreamAdaptError, match=f"cannot serve metrics on 127.0.0.1:{srv.port}"):
        MetricsServer(CollectorRegistry(), health, host="127.0.0.1", port=srv.port)


# ---- boundaries ----------------------------------------------------------------------------------
def test_the_learning_core_does_not_import_prometheus_client() -> None:
    offenders = [
        str(path.relative_to(REPO))
        for path in (REPO / "stream_adapt" / "learning").rglob("*.py")
        if "prometheus" in path.read_text()
    ]
    assert not offenders


def test_rollback_labels_are_the_gates_reasons_and_the_rate_limit() -> None:
    from stream_adapt.learning.adapt import ROLLBACK_REASONS

    assert (*ROLLBACK_REASONS, "rate_limited") == ROLLBACK_LABELS


def test_serving_metrics_does_not_wait_for_torch() -> None:
    code = "import sys, stream_adapt.metrics; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_the_readme_lists_every_metric_the_exporter_serves(metrics: Metrics) -> None:
    metrics.observe_lag({(TOPIC, 0): 1}, {(TOPIC, 0): 1})
    readme = (REPO / "README.md").read_text()
    suffix = {"counter": "_total", "info": "_info"}
    families = [f for f in metrics.registry.collect() if f.name.startswith("stream_adapt_")]
    exported = {f.name + suffix.get(f.type, "") for f in families}
    missing = sorted(n for n in exported if f"`{n}`" not in readme)
    assert not missing, f"README 'Observability' does not list: {missing}"


def test_settings_read_the_metrics_port_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from stream_adapt.config import load_settings

    monkeypatch.setenv("STREAM_ADAPT_METRICS_PORT", "9464")
    monkeypatch.setenv("STREAM_ADAPT_READY_MAX_LAG", "500")
    settings = load_settings()
    assert (settings.metrics_port, settings.ready_max_lag, settings.metrics_host) == (9464, 500, "0.0.0.0")
    assert json.loads(json.dumps(settings.model_dump(mode="json")))["metrics_port"] == 9464
