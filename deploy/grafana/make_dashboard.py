"""Writes deploy/grafana/dashboards/stream-adapt.json, the Grafana dashboard of stream-adapt.

The JSON is generated, not edited by hand, so that every panel is one readable line of intent below and
the file stays consistent (datasource, variables, layout). A unit test fails when the committed JSON and
this script disagree; regenerate with:

    python deploy/grafana/make_dashboard.py

Every expression uses only metrics the exporter serves (stream_adapt/metrics.py): another unit test
checks the names, and tests/integration/test_observability.py runs every expression against a real
Prometheus that scraped a running member, so no panel shows "No data".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "stream-adapt.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Filters every panel applies: the instance variable, and the topic where the metric carries it.
INST = 'instance=~"$instance"'
INST_TOPIC = 'instance=~"$instance", topic=~"$topic"'
R = "$__rate_interval"


def rate(metric: str, selector: str = INST, by: str = "") -> str:
    grouping = f" by ({by}) " if by else ""
    return f"sum{grouping}(rate({metric}{{{selector}}}[{R}]))"


def quantile(q: float, histogram: str, selector: str = INST) -> str:
    return f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket{{{selector}}}[{R}])))"


def mean(histogram: str, selector: str = INST) -> str:
    return f"{rate(histogram + '_sum', selector)} / {rate(histogram + '_count', selector)}"


ADAPTATIONS = "stream_adapt_adaptations_total"
ROLLED_BACK = rate(ADAPTATIONS, INST + ', outcome="rolled_back"')
ADAPTED = rate(ADAPTATIONS, INST + ', outcome=~"accepted|rolled_back"')
ROLLBACK_RATIO = f"{ROLLED_BACK} / {ADAPTED}"
ABS_ERR = "stream_adapt_prequential_absolute_error_total"
LEARNED = rate("stream_adapt_events_consumed_total", INST + ', status="learned"')
MAE_BY_MODEL = f"{rate(ABS_ERR, INST, 'model')} / on() group_left() {LEARNED}"
MAE_ADAPTED = rate(ABS_ERR, INST + ', model="adapted"')
MAE_NONE = rate(ABS_ERR, INST + ', model="no_adaptation"')
MAE_CHANGE = f"1 - {MAE_ADAPTED} / {MAE_NONE}"
ENTITY_DRIFTS = rate("stream_adapt_drift_detections_total", INST + ', scope="entity"')
ENTITY_DRIFT_PER_1K = f"1000 * {ENTITY_DRIFTS} / {LEARNED}"
# process_* also comes from other jobs (Prometheus itself): keep only the targets that export stream-adapt.
MEMBERS = f"group by (job, instance) (stream_adapt_build_info{{{INST}}})"

Target = tuple[str, str]  # (expr, legend)

# Stat panels: (title, description, unit, targets, thresholds [(value, color)]).
STATS: list[tuple[str, str, str, list[Target], list[tuple[float | None, str]]]] = [
    (
        "Members ready",
        "Members whose /readyz answers ready, of those exporting metrics.",
        "short",
        [(f"sum(stream_adapt_ready{{{INST}}})", "ready"), (f"count(stream_adapt_ready{{{INST}}})", "members")],
        [(None, "red"), (1, "green")],
    ),
    (
        "Records / s",
        "Records read from the input topic (valid or not).",
        "ops",
        [(rate("stream_adapt_records_consumed_total", INST_TOPIC), "")],
        [(None, "blue")],
    ),
    (
        "Lag (records)",
        "Records waiting after the members' read positions, all partitions.",
        "short",
        [(f"sum(stream_adapt_consumer_lag_records{{{INST_TOPIC}}})", "")],
        [(None, "green"), (1000, "orange"), (100000, "red")],
    ),
    (
        "Update delivery p99",
        "Window closed -> update acknowledged by the brokers, 99th percentile.",
        "s",
        [(quantile(0.99, "stream_adapt_update_delivery_seconds"), "")],
        [(None, "green"), (1, "orange"), (10, "red")],
    ),
    (
        "Rollback ratio",
        "Adaptations the gate rolled back, of those adapted (accepted + rolled back).",
        "percentunit",
        [(ROLLBACK_RATIO, "")],
        [(None, "green"), (0.65, "orange"), (0.8, "red")],
    ),
    (
        "Error cut by adaptation",
        "1 - prequential MAE with adaptation / without: above 0 adaptation helps, below 0 it hurts.",
        "percentunit",
        [(MAE_CHANGE, "")],
        [(None, "red"), (0, "green")],
    ),
    (
        "Entity drift / 1k events",
        "Per-entity drift detections per thousand learned events.",
        "short",
        [(ENTITY_DRIFT_PER_1K, "")],
        [(None, "green"), (10, "orange"), (20, "red")],
    ),
    (
        "Since last batch",
        "Seconds since a member last processed a non-empty batch.",
        "s",
        [(f"time() - max(stream_adapt_last_processed_timestamp_seconds{{{INST}}} > 0)", "")],
        [(None, "green"), (60, "orange"), (300, "red")],
    ),
]

# Time-series rows: (row title, [(title, description, unit, targets)]), two panels per line.
ROWS: list[tuple[str, list[tuple[str, str, str, list[Target]]]]] = [
    (
        "Keeping up",
        [
            (
                "Throughput",
                "Records read per member, and valid events by what happened to them.",
                "ops",
                [
                    (rate("stream_adapt_records_consumed_total", INST_TOPIC, "instance"), "records {{instance}}"),
                    (rate("stream_adapt_events_consumed_total", INST, "status"), "events {{status}}"),
                ],
            ),
            (
                "Lag per partition",
                "Records after the owner's read position, from librdkafka statistics.",
                "short",
                [
                    (
                        f"sum by (topic, partition) (stream_adapt_consumer_lag_records{{{INST_TOPIC}}})",
                        "{{topic}}[{{partition}}]",
                    )
                ],
            ),
            (
                "Committed lag per partition",
                "Records after the committed offset: what a restart re-reads (includes events held in open windows).",
                "short",
                [
                    (
                        f"sum by (topic, partition) (stream_adapt_consumer_committed_lag_records{{{INST_TOPIC}}})",
                        "{{topic}}[{{partition}}]",
                    )
                ],
            ),
            (
                "Pipeline time per stage",
                "Seconds spent per second of wall clock, by stage (1 = one core busy), and batch time quantiles.",
                "s",
                [
                    (rate("stream_adapt_stage_seconds_total", INST, "stage"), "{{stage}} (s/s)"),
                    (quantile(0.5, "stream_adapt_batch_duration_seconds"), "batch p50"),
                    (quantile(0.99, "stream_adapt_batch_duration_seconds"), "batch p99"),
                ],
            ),
            (
                "Members",
                "Partitions owned, readiness, paused consumption (backpressure) per member.",
                "short",
                [
                    (f"stream_adapt_assigned_partitions{{{INST}}}", "partitions {{instance}}"),
                    (f"stream_adapt_ready{{{INST}}}", "ready {{instance}}"),
                    (f"stream_adapt_consumer_paused{{{INST}}}", "paused {{instance}}"),
                ],
            ),
            (
                "Producer backlog",
                "Messages handed to the producer and not acknowledged yet (consumption pauses above a bound).",
                "short",
                [(f"stream_adapt_producer_backlog_messages{{{INST}}}", "{{instance}}")],
            ),
        ],
    ),
    (
        "Adaptation",
        [
            (
                "Adaptation outcomes",
                "Closed windows per second: accepted, rolled back, expired (too few shots).",
                "ops",
                [(rate("stream_adapt_adaptations_total", INST, "outcome"), "{{outcome}}")],
            ),
            (
                "Adaptations by trigger",
                "What closed the windows: full, max age, drift, eviction; global drift re-adapts the shared part.",
                "ops",
                [(rate("stream_adapt_adaptations_total", INST, "trigger"), "{{trigger}}")],
            ),
            (
                "Rollbacks by reason",
                "Why the gate refused adapted versions.",
                "ops",
                [(rate("stream_adapt_adaptation_rollbacks_total", INST, "reason"), "{{reason}}")],
            ),
            (
                "Query loss before / after adapting",
                "Mean query-shot MSE of adapted windows with the adapter in force, and with the candidate.",
                "short",
                [
                    (mean("stream_adapt_adaptation_query_loss_before"), "before"),
                    (mean("stream_adapt_adaptation_query_loss_after"), "after"),
                    (quantile(0.9, "stream_adapt_adaptation_query_loss_before"), "before p90"),
                    (quantile(0.9, "stream_adapt_adaptation_query_loss_after"), "after p90"),
                ],
            ),
            (
                "Prequential MAE: adapted vs no adaptation",
                "Every event scored before it is learned from, with the served adapters and with none.",
                "short",
                [(MAE_BY_MODEL, "{{model}}")],
            ),
            (
                "Adaptation batches",
                "Windows per vectorised call, and time adapting per polled batch.",
                "short",
                [
                    (quantile(0.5, "stream_adapt_adaptation_batch_size"), "windows p50"),
                    (quantile(0.99, "stream_adapt_adaptation_batch_size"), "windows p99"),
                    (quantile(0.99, "stream_adapt_adaptation_duration_seconds"), "seconds p99"),
                ],
            ),
        ],
    ),
    (
        "Freshness",
        [
            (
                "Window closed -> update delivered",
                "From the moment a window closes to the brokers' acknowledgement of its update.",
                "s",
                [(quantile(q, "stream_adapt_update_delivery_seconds"), f"p{round(q * 100)}") for q in (0.5, 0.9, 0.99)],
            ),
            (
                "Event time -> update delivered",
                "From the newest event of a window (its event time) to the acknowledgement; old for a replayed log.",
                "s",
                [
                    (quantile(q, "stream_adapt_update_freshness_seconds"), f"p{round(q * 100)}")
                    for q in (0.5, 0.9, 0.99)
                ],
            ),
            (
                "Updates published",
                "Adapter versions acknowledged on the model topic, and messages delivered per output.",
                "ops",
                [
                    (rate("stream_adapt_updates_published_total", INST, "entity_kind"), "updates {{entity_kind}}"),
                    (rate("stream_adapt_messages_delivered_total", INST, "output"), "delivered {{output}}"),
                ],
            ),
            (
                "Last event time",
                "How far the newest event processed is behind the wall clock (large for a replayed log).",
                "s",
                [(f"time() - max(stream_adapt_last_event_timestamp_seconds{{{INST}}} > 0)", "event time behind now")],
            ),
        ],
    ),
    (
        "Drift",
        [
            (
                "Drift detections",
                "Per-entity and global (shared model) drift detections per second.",
                "ops",
                [(rate("stream_adapt_drift_detections_total", INST, "scope"), "{{scope}}")],
            ),
            (
                "Entity drift per 1k learned events",
                "A storm shows as a jump here (alert above 20).",
                "short",
                [(ENTITY_DRIFT_PER_1K, "entity drifts / 1k events")],
            ),
            (
                "State held",
                "Open windows, events held in them, adapters held, and the shared adapter's version.",
                "short",
                [
                    (f"sum(stream_adapt_windows_open{{{INST}}})", "windows open"),
                    (f"sum(stream_adapt_window_events{{{INST}}})", "events in windows"),
                    (f"sum(stream_adapt_adapters{{{INST}}})", "adapters"),
                    (f"max(stream_adapt_global_adapter_version{{{INST}}})", "global version"),
                ],
            ),
            (
                "Windows filled",
                "Windows that reached K shots per second.",
                "ops",
                [(rate("stream_adapt_windows_filled_total"), "filled")],
            ),
        ],
    ),
    (
        "Errors",
        [
            (
                "Dead letters by reason",
                "Invalid records per second, by reason (they go to the dead-letter topic with their position).",
                "ops",
                [(rate("stream_adapt_dead_letters_total", INST, "reason"), "{{reason}}")],
            ),
            (
                "Publish failures",
                "Failed or refused deliveries per second, by output and reason.",
                "ops",
                [(rate("stream_adapt_publish_failures_total", INST, "output, reason"), "{{output}} {{reason}}")],
            ),
            (
                "CPU",
                "Cores used per member.",
                "short",
                [
                    (
                        f"rate(process_cpu_seconds_total[{R}]) * on (job, instance) group_left() {MEMBERS}",
                        "{{instance}}",
                    )
                ],
            ),
            (
                "Memory",
                "Resident memory per member.",
                "bytes",
                [(f"process_resident_memory_bytes * on (job, instance) group_left() {MEMBERS}", "{{instance}}")],
            ),
        ],
    ),
]


def _targets(targets: list[Target]) -> list[dict[str, Any]]:
    return [
        {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend or "__auto"}
        for i, (expr, legend) in enumerate(targets)
    ]


def _thresholds(steps: list[tuple[float | None, str]]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"value": v, "color": c} for v, c in steps]}


def build() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    next_id = iter(range(1, 1000))
    y = 0
    for i, (title, description, unit, targets, steps) in enumerate(STATS):
        panels.append(
            {
                "id": next(next_id),
                "type": "stat",
                "title": title,
                "description": description,
                "datasource": DATASOURCE,
                "gridPos": {"h": 4, "w": 3, "x": 3 * i, "y": y},
                "targets": _targets(targets),
                "fieldConfig": {"defaults": {"unit": unit, "thresholds": _thresholds(steps)}, "overrides": []},
                "options": {
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value",
                    "graphMode": "area",
                    "textMode": "auto",
                },
            }
        )
    y += 4
    for row_title, row_panels in ROWS:
        panels.append(
            {
                "id": next(next_id),
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        y += 1
        for j, (title, description, unit, targets) in enumerate(row_panels):
            panels.append(
                {
                    "id": next(next_id),
                    "type": "timeseries",
                    "title": title,
                    "description": description,
                    "datasource": DATASOURCE,
                    "gridPos": {"h": 8, "w": 12, "x": 12 * (j % 2), "y": y + 8 * (j // 2)},
                    "targets": _targets(targets),
                    "fieldConfig": {
                        "defaults": {"unit": unit, "custom": {"lineWidth": 1, "fillOpacity": 10}},
                        "overrides": [],
                    },
                    "options": {
                        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"},
                    },
                }
            )
        y += 8 * ((len(row_panels) + 1) // 2)
    return {
        "uid": "stream-adapt",
        "title": "stream-adapt",
        "description": "Is it keeping up, does adaptation help, is there drift, what fails.",
        "tags": ["stream-adapt", "kafka", "recommender"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": _variables()},
        "panels": panels,
    }


def _variables() -> list[dict[str, Any]]:
    def query_variable(name: str, label: str, query: str) -> dict[str, Any]:
        return {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": DATASOURCE,
            "query": {"query": query, "refId": f"{name}-variable"},
            "definition": query,
            "refresh": 2,  # on time range change: members come and go
            "includeAll": True,
            "multi": True,
            "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "sort": 1,
            "hide": 0,
        }

    return [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus", "hide": 0},
        query_variable("topic", "Input topic", "label_values(stream_adapt_records_consumed_total, topic)"),
        query_variable(
            "instance", "Member", 'label_values(stream_adapt_records_consumed_total{topic=~"$topic"}, instance)'
        ),
    ]


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
