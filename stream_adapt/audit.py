"""Prove from the topics alone that no feedback was lost and none was applied twice.

Reads the input topic, the adaptation log, the dead-letter topic, the model topic and the consumer
group's committed offsets, and checks, for every input record:
- accounted for: dead-lettered, or used by an adaptation outcome (logged, or carried by a published
  update), or valid but of a type the model does not learn from, or still pending (at or after the
  group's committed offset: the next member re-reads it) — otherwise it is **lost**;
- applied at most once: no position appears in two published updates (a crash may repeat a
  rolled-back or expired evaluation, never an applied one) — otherwise it is **applied twice**;
and, per entity, that published versions strictly increase in topic order (never repeat, never go back).

Run it as `stream-adapt audit` against a stopped (or idle) group for an exact answer.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, Message, TopicPartition

from stream_adapt.config import KafkaConfig
from stream_adapt.events import DecodeError, EventType, Position, decode
from stream_adapt.io.admin import client_config
from stream_adapt.io.changelog import read_to_end
from stream_adapt.learning.updates import METADATA_KEY, RejectedUpdate, read_metadata


@dataclass
class AuditReport:
    records: int = 0
    dead_lettered: int = 0
    logged: int = 0
    published: int = 0
    ignored: int = 0
    pending: int = 0
    lost: list[Position] = field(default_factory=list)
    applied_twice: list[Position] = field(default_factory=list)
    version_regressions: list[str] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    entities: int = 0
    updates: int = 0
    unreadable_updates: int = 0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.applied_twice or self.version_regressions)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "dead_lettered": self.dead_lettered,
            "logged": self.logged,
            "published": self.published,
            "ignored_type": self.ignored,
            "pending": self.pending,
            "lost": len(self.lost),
            "applied_twice": len(self.applied_twice),
            "version_regressions": len(self.version_regressions),
            "outcomes": dict(self.outcomes),
            "entities_published": self.entities,
            "updates": self.updates,
            "unreadable_updates": self.unreadable_updates,
            "examples": {
                "lost": [list(p) for p in self.lost[:5]],
                "applied_twice": [list(p) for p in self.applied_twice[:5]],
                "version_regressions": self.version_regressions[:5],
            },
        }


def _position(msg: Message) -> Position:
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    assert topic is not None and partition is not None and offset is not None  # a consumed record has all three
    return Position(topic, partition, offset)


def _headers(msg: Message) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in msg.headers() or []:
        key, value = item[0], item[1]
        out[str(key)] = value.decode() if isinstance(value, bytes) else str(value or "")
    return out


def committed_offsets(kafka: KafkaConfig, topic: str, partitions: list[int], timeout_s: float) -> dict[int, int]:
    """The group's committed next offset per partition (-1001 / absent: nothing committed)."""
    consumer = Consumer(client_config(kafka, **{"group.id": kafka.group, "enable.auto.commit": False}))
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=timeout_s)
        return {tp.partition: tp.offset for tp in tps if tp.offset >= 0}
    finally:
        consumer.close()


def audit(
    kafka: KafkaConfig,
    learn_types: tuple[EventType, ...] = (EventType.RATING,),
    timeout_s: float = 120.0,
) -> AuditReport:
    """Audit the service's topics for `kafka.group`. Read-only: joins no group, commits nothing."""
    report = AuditReport()
    inputs: dict[Position, bytes] = {}
    for msg in read_to_end(kafka, kafka.topic, None, timeout_s=timeout_s):
        inputs[_position(msg)] = msg.value() or b""
    report.records = len(inputs)

    dead: set[Position] = set()
    for msg in read_to_end(kafka, kafka.dead_letter_topic, None, timeout_s=timeout_s):
        headers = _headers(msg)
        dead.add(
            Position(
                headers["stream-adapt-source-topic"],
                int(headers["stream-adapt-source-partition"]),
                int(headers["stream-adapt-source-offset"]),
            )
        )

    logged: set[Position] = set()
    for msg in read_to_end(kafka, kafka.log_topic, None, timeout_s=timeout_s):
        record = json.loads(msg.value() or b"{}")
        report.outcomes[record["outcome"]] += 1
        logged.update(Position(p["topic"], p["partition"], p["offset"]) for p in record["positions"])

    applied: Counter[Position] = Counter()
    versions: dict[str, int] = {}
    for msg in read_to_end(kafka, kafka.model_topic, None, timeout_s=timeout_s):
        try:
            meta = json.loads(read_metadata(msg.value() or b"")[METADATA_KEY])
        except (RejectedUpdate, KeyError, ValueError):
            report.unreadable_updates += 1
            continue
        report.updates += 1
        entity, version = meta["entity"], meta["version"]
        previous = versions.get(entity)
        if previous is not None and version <= previous:
            report.version_regressions.append(f"{entity}: v{version} after v{previous} (offset {msg.offset()})")
        versions[entity] = max(version, previous or 0)
        applied.update(Position(p["topic"], p["partition"], p["offset"]) for p in meta["positions"])
    report.entities = len(versions)
    report.applied_twice = sorted(p for p, n in applied.items() if n > 1)

    committed = committed_offsets(kafka, kafka.topic, sorted({p.partition for p in inputs}), timeout_s)
    learned = frozenset(learn_types)
    counts: dict[str, int] = defaultdict(int)
    for pos, raw in inputs.items():
        if pos in dead:
            counts["dead"] += 1
        elif pos in logged:
            counts["logged"] += 1
        elif pos in applied:
            counts["published"] += 1
        elif pos.offset >= committed.get(pos.partition, 0):
            counts["pending"] += 1
        else:
            event = decode(raw, pos, max_bytes=len(raw) + 1, max_future_s=float("inf"))
            if not isinstance(event, DecodeError) and event.event_type not in learned:
                counts["ignored"] += 1
            else:
                report.lost.append(pos)
    report.dead_lettered, report.logged = counts["dead"], counts["logged"]
    report.published, report.pending, report.ignored = counts["published"], counts["pending"], counts["ignored"]
    report.lost.sort()
    return report
