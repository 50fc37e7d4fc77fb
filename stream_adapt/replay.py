"""Replay an event log into a Kafka topic: keyed by entity, stamped with event time, optionally paced.

Each valid line is produced with key = its entity id (user id by default), so one entity's events stay in
one partition and in order, and with the record timestamp = the event's time. Lines that do not parse
are reported with their line number and not sent (the service would dead-letter them; a replay tool
should not send what it knows is broken). Invalid-but-parseable events are sent as they are: validation
belongs to the service, and the demo relies on it to show dead letters.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException, Producer

from stream_adapt.config import KafkaConfig
from stream_adapt.datasets import AUTO, iter_records
from stream_adapt.errors import StreamAdaptError
from stream_adapt.events import DecodeError
from stream_adapt.io.admin import client_config

log = logging.getLogger(__name__)


@dataclass
class ReplayReport:
    sent: int = 0
    bad_lines: int = 0
    first_bad: list[str] = field(default_factory=list)  # "line N: detail" for the first few
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


def _key_and_time(raw: bytes, entity_field: str) -> tuple[bytes | None, int | None]:
    """The record key (the entity id) and timestamp (event time, ms) of one event line."""
    try:
        event = json.loads(raw)
    except ValueError:
        return None, None
    if not isinstance(event, dict):
        return None, None
    entity, ts = event.get(entity_field), event.get("timestamp")
    key = str(entity).encode() if entity is not None else None
    stamp = int(ts * 1000) if isinstance(ts, int | float) and 0 < ts < 1e11 else None
    return key, stamp


def replay_file(
    path: Path,
    kafka: KafkaConfig,
    *,
    topic: str | None = None,
    fmt: str = AUTO,
    entity: str = "user",
    rate: float | None = None,
    progress: Callable[[ReplayReport], None] | None = None,
    overrides: Mapping[str, Any] | None = None,
    flush_timeout_s: float = 60.0,
) -> ReplayReport:
    """Produce every parseable line of `path` to `topic` (default: the service's input topic)."""
    topic = topic or kafka.topic
    conf = client_config(kafka, **{"enable.idempotence": True, "linger.ms": 20, "compression.type": "lz4"})
    conf.update(overrides or {})
    producer = Producer(conf)
    failures: list[str] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    report = ReplayReport()
    entity_field = f"{entity}_id"
    t0 = time.monotonic()
    last_progress = t0
    for item in iter_records(path, fmt):
        if isinstance(item, DecodeError):
            report.bad_lines += 1
            if len(report.first_bad) < 5:
                report.first_bad.append(f"line {item.position[2] + 1}: {item.detail}")
            continue
        if rate:
            ahead = report.sent / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)  # pacing a producer, not waiting for a condition
        key, ts = _key_and_time(item.value, entity_field)
        kwargs: dict[str, Any] = {"key": key, "value": item.value, "on_delivery": delivered}
        if ts is not None:
            kwargs["timestamp"] = ts
        while True:
            try:
                producer.produce(topic, **kwargs)
                break
            except BufferError:
                producer.poll(0.1)
            except KafkaException as exc:
                raise StreamAdaptError(f"cannot produce to {topic!r} at {kafka.bootstrap_servers}: {exc}") from exc
        producer.poll(0)
        report.sent += 1
        now = time.monotonic()
        if progress and now - last_progress >= 1.0:
            report.seconds = now - t0
            progress(report)
            last_progress = now
    remaining = producer.flush(flush_timeout_s)
    report.seconds = time.monotonic() - t0
    if remaining or failures:
        raise StreamAdaptError(
            f"replay to {topic!r}: {remaining} messages undelivered, {len(failures)} failed"
            + (f" (first: {failures[0]})" if failures else "")
        )
    return report
