"""Reading the model topic back against a real broker: read to the end, restore a pipeline, follow
the shared adapter."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
from confluent_kafka import KafkaError, Message, Producer
from kafka_helpers import producer_config, wait_until
from model_helpers import tiny_model

from stream_adapt.config import PipelineConfig, pipeline_config
from stream_adapt.errors import StreamAdaptError
from stream_adapt.events import GLOBAL_ENTITY, ModelUpdate, Position, Record
from stream_adapt.io.broker import free_port
from stream_adapt.io.changelog import GlobalFollower, latest_per_key, read_to_end, restore_pipeline
from stream_adapt.io.directory import update_headers
from stream_adapt.learning.models import NeuralRecommender
from stream_adapt.learning.pipeline import Pipeline, PublishedUpdate
from stream_adapt.learning.updates import encode_update

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TopicFactory = Callable[..., str]
#: (partition, key, value, headers)
Row = tuple[int, bytes | None, bytes | None, dict[str, str | bytes | None] | None]

USERS = [f"u{i}" for i in range(6)]
ITEMS = [f"i{i}" for i in range(10)]
FINGERPRINT = "sha256:" + "c4" * 32
T0 = 1_700_000_000.0


def produce_at(bootstrap: str, topic: str, rows: Iterable[Row], timeout_s: float = 15.0) -> None:
    """Produce to explicit partitions (the model topic's routing rule); fail unless all are acknowledged."""
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err)

    producer = Producer(producer_config(bootstrap))
    for partition, key, value, headers in rows:
        producer.produce(topic, value=value, key=key, partition=partition, headers=headers, on_delivery=on_delivery)
    assert producer.flush(timeout_s) == 0, "not every record was delivered in time"
    assert not errors, errors[:3]


def base_score(model: NeuralRecommender, user: str, item: str) -> float:
    with torch.no_grad():
        adapter = model.initial_adapter(model.entity_index([user]))
        return float(model.predict(adapter, model.counterpart_index([item]).unsqueeze(0), model.global_adapter()))


def pipeline_cfg() -> PipelineConfig:
    """One window per 4 events, no drift: every window of constant ratings is accepted."""
    return pipeline_config(
        {
            "window": {"shots": 4, "query_shots": 1, "min_shots": 2},
            "drift": {"global_detector": {"kind": "none"}, "entity_detector": {"kind": "none"}},
        }
    )


def feedback(
    model: NeuralRecommender, topic: str, users_by_partition: dict[int, list[str]], per_user: int
) -> list[Record]:
    """Ratings keyed by user, each user's events in its own input partition (as a keyed topic has them).

    Each user rates one clear step above the base model's score, a bigger step each window of 4, so
    every window has something to learn whatever the adaptation's tuning: all of them are accepted.
    """
    records = []
    offsets = dict.fromkeys(users_by_partition, 0)
    n = 0
    for k in range(per_user):
        for partition, users in users_by_partition.items():
            for user in users:
                item = ITEMS[(n * 3) % len(ITEMS)]
                event = {
                    "event_id": f"e{n}",
                    "user_id": user,
                    "item_id": item,
                    "event_type": "rating",
                    "value": round(base_score(model, user, item) + 0.6 * (1 + k // 4), 3),
                    "timestamp": T0 + n,
                }
                records.append(Record(json.dumps(event).encode(), Position(topic, partition, offsets[partition])))
                offsets[partition] += 1
                n += 1
    return records


def model_rows(updates: Iterable[PublishedUpdate]) -> list[Row]:
    """Updates routed as the service routes them: the input partition of their events; global to 0."""
    rows: list[Row] = []
    for upd in updates:
        partition = 0 if upd.entity == GLOBAL_ENTITY else upd.update.positions[0]["partition"]
        rows.append((partition, upd.entity.encode(), upd.payload, dict(update_headers(upd))))
    return rows


def global_payload(
    model: NeuralRecommender, version: int, fingerprint: str = FINGERPRINT
) -> tuple[bytes, dict[str, Any]]:
    gen = torch.Generator().manual_seed(version)
    tensors = {name: torch.randn(shape, generator=gen) for name, shape in model.global_spec().items()}
    meta = ModelUpdate(
        entity=GLOBAL_ENTITY,
        entity_kind="global",
        version=version,
        parent_version=version - 1 or None,
        base_fingerprint=fingerprint,
        trigger="global_drift",
        positions=[],
        loss_before=1.0,
        loss_after=0.9,
        n_support=200,
        n_query=50,
        event_time_first=None,
        event_time_last=T0,
        created_at=T0,
        tensors={k: list(v) for k, v in model.global_spec().items()},
    )
    return encode_update(meta, tensors), tensors


# ---- read_to_end / latest_per_key ---------------------------------------------------------------------


def test_read_to_end_stops_at_the_end_of_each_partition_and_handles_empty_ones(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topic = topic_factory("changelog", partitions=3)
    rows: list[Row] = [(0, f"k{i % 3}".encode(), f"p0-{i}".encode(), None) for i in range(7)]
    rows += [(1, f"k{i}".encode(), f"p1-{i}".encode(), None) for i in range(3)]
    produce_at(kafka_bootstrap, topic, rows)  # partition 2 stays empty

    got = list(read_to_end(kafka_bootstrap, topic, None, timeout_s=30))

    by_partition = {p: [(m.offset(), m.value()) for m in got if m.partition() == p] for p in range(3)}
    assert by_partition[0] == [(i, f"p0-{i}".encode()) for i in range(7)]
    assert by_partition[1] == [(i, f"p1-{i}".encode()) for i in range(3)]
    assert by_partition[2] == []
    only_1 = list(read_to_end(kafka_bootstrap, topic, [1], timeout_s=30))
    assert [(m.partition(), m.offset()) for m in only_1] == [(1, 0), (1, 1), (1, 2)]
    assert list(read_to_end(kafka_bootstrap, topic, [2], timeout_s=30)) == []


def test_latest_per_key_keeps_the_last_record_and_forgets_tombstoned_keys(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    topic = topic_factory("compact", partitions=1, config={"cleanup.policy": "compact"})
    rows: list[Row] = [(0, b"a", b"a1", None), (0, b"b", b"b1", None), (0, b"a", b"a2", None)]
    rows += [(0, b"c", b"c1", None), (0, b"c", None, None), (0, None, b"unkeyed", None), (0, b"b", b"b2", None)]
    produce_at(kafka_bootstrap, topic, rows)

    latest = latest_per_key(read_to_end(kafka_bootstrap, topic, None, timeout_s=30))

    assert {k: m.value() for k, m in latest.items()} == {b"a": b"a2", b"b": b"b2"}


def test_read_to_end_of_a_missing_topic_names_the_servers_and_the_topic(kafka_bootstrap: str) -> None:
    with pytest.raises(StreamAdaptError) as info:
        list(read_to_end(kafka_bootstrap, "no-such-topic-0f9e", None, timeout_s=10))
    assert kafka_bootstrap in str(info.value) and "'no-such-topic-0f9e'" in str(info.value)
    assert "does not exist" in str(info.value)


def test_read_to_end_of_a_missing_partition_fails_clearly(kafka_bootstrap: str, topic_factory: TopicFactory) -> None:
    topic = topic_factory("changelog", partitions=2)
    with pytest.raises(StreamAdaptError, match=r"no partition \[5\]"):
        list(read_to_end(kafka_bootstrap, topic, [0, 5], timeout_s=10))


def test_read_to_end_gives_up_at_the_deadline_when_the_broker_is_unreachable() -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(StreamAdaptError, match=rf"Kafka at {bootstrap}, topic 'models': not reachable"):
        list(read_to_end(bootstrap, "models", None, timeout_s=2))
    assert time.monotonic() - started < 10


# ---- restore_pipeline ---------------------------------------------------------------------------------


@pytest.fixture
def published(kafka_bootstrap: str, topic_factory: TopicFactory) -> dict[str, Any]:
    """A pipeline run over 2 input partitions whose every window was accepted, its updates on a model
    topic (routed by input partition) beside records that are not ours, a global version, and an old
    version published again late (as a zombie writer would)."""
    model = tiny_model(USERS, ITEMS, FINGERPRINT, noise=0.3)
    input_topic = "feedback-restore"
    records = feedback(model, input_topic, {0: ["u0", "u1"], 1: ["u2", "u3", "stranger"]}, per_user=8)
    first = Pipeline(model, pipeline_cfg())
    updates = []
    step = first.cfg.window.shots * 5  # each batch fills exactly one window per user
    for start in range(0, len(records), step):
        result = first.process(records[start : start + step], now=T0 + 1000)
        assert [r.outcome for r in result.log] == ["accepted"] * 5, [(r.entity, r.reason) for r in result.log]
        updates += result.updates
    assert sum(len(u.update.positions) for u in updates) == len(records)  # nothing left in open windows

    model_topic = topic_factory("models", partitions=2)
    foreign = next(u for u in updates if u.update.positions[0]["partition"] == 1)
    other_base = encode_update(
        foreign.update.model_copy(update={"base_fingerprint": "sha256:" + "01" * 32, "version": 99}),
        {k: torch.zeros(v) for k, v in model.adapter_spec().items()},
    )
    global_v1, global_tensors = global_payload(model, 1)
    rows = model_rows(updates)
    rows.insert(3, (1, foreign.entity.encode(), other_base, None))
    rows.insert(5, (0, b"u1", b"\x07garbage", None))
    rows.append((0, GLOBAL_ENTITY.encode(), global_v1, None))
    rows += [r for r, u in zip(model_rows(updates), updates, strict=True) if (u.entity, u.update.version) == ("u0", 1)]
    produce_at(kafka_bootstrap, model_topic, rows)
    return {
        "model": model,
        "first": first,
        "records": records,
        "input_topic": input_topic,
        "model_topic": model_topic,
        "global_tensors": global_tensors,
        "n_rows": len(rows),
    }


def test_restore_pipeline_restores_versions_and_consumed_marks_so_replayed_events_are_already_applied(
    kafka_bootstrap: str, published: dict[str, Any]
) -> None:
    first: Pipeline = published["first"]
    restored = Pipeline(published["model"], pipeline_cfg())
    topic = published["input_topic"]

    report = restore_pipeline(
        restored, kafka_bootstrap, published["model_topic"], [(topic, 0), (topic, 1)], timeout_s=30
    )

    entities = ["u0", "u1", "u2", "u3", "stranger"]
    assert report.partitions == (0, 1)
    assert report.records == published["n_rows"]
    assert (report.entities, report.skipped, report.global_version) == (5, 0, 1)
    assert report.rejected == {"foreign_fingerprint": 1, "corrupt": 1}
    for entity in entities:
        assert restored.table.version(entity) == first.table.version(entity) == 2
        adapter = restored.table.get(entity)
        expected = first.table.get(entity)
        assert adapter is not None and expected is not None
        assert all(torch.equal(adapter[k], expected[k]) for k in expected)
        assert restored.table.entities[entity].consumed == first.table.entities[entity].consumed
    assert restored.global_version == 1
    assert all(torch.equal(restored.shared[k], v) for k, v in published["global_tensors"].items())

    replay = restored.process(published["records"], now=T0 + 1000)

    assert replay.already_applied == len(published["records"])
    assert (replay.learned, replay.updates, replay.log) == (0, [], [])


def test_restore_pipeline_reads_only_the_model_partitions_of_its_input_partitions(
    kafka_bootstrap: str, published: dict[str, Any]
) -> None:
    restored = Pipeline(published["model"], pipeline_cfg())
    topic = published["input_topic"]

    report = restore_pipeline(restored, kafka_bootstrap, published["model_topic"], [(topic, 1)], timeout_s=30)

    assert report.partitions == (1,)
    assert sorted(restored.table.entities) == ["stranger", "u2", "u3"]
    assert report.global_version is None and restored.global_version == 0  # global lives on partition 0
    assert report.rejected == {"foreign_fingerprint": 1}
    replay = restored.process(published["records"], now=T0 + 1000)
    partition_1 = sum(1 for r in published["records"] if r.position.partition == 1)
    assert replay.already_applied == partition_1
    assert replay.learned == len(published["records"]) - partition_1


def test_restore_pipeline_with_no_input_partitions_reads_nothing(kafka_bootstrap: str) -> None:
    pipeline = Pipeline(tiny_model(USERS, ITEMS, FINGERPRINT, noise=0.3), pipeline_cfg())
    report = restore_pipeline(pipeline, kafka_bootstrap, "never-read", [], timeout_s=5)
    assert (report.records, report.entities, len(pipeline.table)) == (0, 0, 0)


def test_restore_pipeline_of_a_missing_model_topic_fails_naming_it(kafka_bootstrap: str) -> None:
    pipeline = Pipeline(tiny_model(USERS, ITEMS, FINGERPRINT, noise=0.3), pipeline_cfg())
    with pytest.raises(StreamAdaptError, match=r"'no-models-7c1d'.*does not exist"):
        restore_pipeline(pipeline, kafka_bootstrap, "no-models-7c1d", [("feedback", 0)], timeout_s=10)


# ---- GlobalFollower -----------------------------------------------------------------------------------


def test_global_follower_applies_newer_global_versions_and_skips_foreign_ones(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    model = tiny_model(USERS, ITEMS, FINGERPRINT, noise=0.3)
    topic = topic_factory("models", partitions=2)
    v1, _ = global_payload(model, 1)
    foreign, _ = global_payload(model, 7, fingerprint="sha256:" + "02" * 32)
    entity_rows = model_rows(
        Pipeline(model, pipeline_cfg()).process(feedback(model, "fb", {0: ["u0"]}, per_user=4), now=T0 + 1000).updates
    )
    produce_at(
        kafka_bootstrap, topic, [*entity_rows, (0, GLOBAL_ENTITY.encode(), v1, None), (0, b"__global__", foreign, None)]
    )
    pipeline = Pipeline(model, pipeline_cfg())

    with GlobalFollower(kafka_bootstrap, topic, timeout_s=15) as follower:
        assert follower.catch_up(pipeline, timeout_s=30)
        assert pipeline.global_version == 1
        assert follower.rejected == {"foreign_fingerprint": 1}
        assert follower.poll(pipeline) is None  # nothing new: never blocks, changes nothing

        v2, v2_tensors = global_payload(model, 2)
        produce_at(kafka_bootstrap, topic, [(0, GLOBAL_ENTITY.encode(), v2, None)])
        wait_until(
            lambda: pipeline.global_version == 2,
            timeout_s=30,
            what="global version 2",
            step=lambda: follower.poll(pipeline, timeout_s=0.2),
        )
    assert all(torch.equal(pipeline.shared[k], v) for k, v in v2_tensors.items())
    assert len(pipeline.table) == 0  # entity records on partition 0 are not the follower's business
