"""KafkaSource and KafkaSink against a real Kafka-protocol broker (no mocks of Kafka).

Every test makes its own topics and group and waits by polling against deadlines. Output topics are
read back with a plain consumer assigned to every partition (no group join: faster, and independent
of the code under test).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, Producer, TopicPartition
from kafka_helpers import CuttableLink, consume_n, consumer_config, producer_config, unique_name, wait_until

from stream_adapt.config import KafkaConfig, PipelineConfig, WindowConfig
from stream_adapt.errors import StreamAdaptError
from stream_adapt.events import GLOBAL_ENTITY, AdaptationRecord, DecodeError, Position, Record
from stream_adapt.io.admin import default_topic_specs, ensure_topics
from stream_adapt.io.broker import free_port
from stream_adapt.io.directory import update_headers
from stream_adapt.io.kafka import KafkaSink, KafkaSource
from stream_adapt.io.ports import Sink, Source
from stream_adapt.learning.models import NeuralRecommender, RecommenderConfig, freeze
from stream_adapt.learning.pipeline import BatchResult, Pipeline, PublishedUpdate
from stream_adapt.learning.updates import decode_update
from stream_adapt.synth import synthetic_stream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

#: Fast group joins on Tansu (first assignment takes about session.timeout.ms / 2).
FAST_GROUP = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}
PARTITIONS = 3
BASE_TS_MS = 1_700_000_000_000


# ---- fixtures and helpers ---------------------------------------------------------------------------
@pytest.fixture
def service(kafka_bootstrap: str, topic_factory: Callable[..., str], group_id: str) -> KafkaConfig:
    """The service's four topics, created with the configs `default_topic_specs` gives them."""
    specs = default_topic_specs(KafkaConfig(), PARTITIONS, 1)
    feedback, models, adaptations, dead = (topic_factory(s.name, PARTITIONS, s.config) for s in specs)
    return KafkaConfig(
        bootstrap_servers=kafka_bootstrap,
        topic=feedback,
        model_topic=models,
        log_topic=adaptations,
        dead_letter_topic=dead,
        group=group_id,
    )


@pytest.fixture
def closing() -> Iterator[Callable[[Any], Any]]:
    """Registers sources and sinks to close at the end of the test, whatever happens."""
    opened: list[Any] = []

    def register(thing: Any) -> Any:
        opened.append(thing)
        return thing

    yield register
    for thing in reversed(opened):
        thing.close()


@dataclass
class Listener:
    """Records rebalance events, with what the source owned while each callback ran."""

    source: KafkaSource | None = None
    events: list[tuple[str, list[tuple[str, int]]]] = field(default_factory=list)
    owned_during_revoke: list[list[tuple[str, int]]] = field(default_factory=list)
    commit_on_revoke: dict[tuple[str, int], int] = field(default_factory=dict)

    def on_assign(self, partitions: list[tuple[str, int]]) -> None:
        self.events.append(("assign", sorted(partitions)))

    def on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        self.events.append(("revoke", sorted(partitions)))
        assert self.source is not None
        self.owned_during_revoke.append(self.source.assignment)
        self.source.commit({tp: o for tp, o in self.commit_on_revoke.items() if tp in partitions})


def produce_at(bootstrap: str, topic: str, rows: list[tuple[int, bytes, bytes, int]]) -> list[tuple[int, int]]:
    """Produce (partition, key, value, timestamp_ms) rows; returns each row's (partition, offset)."""
    positions: dict[int, tuple[int, int]] = {}
    producer = Producer(producer_config(bootstrap))
    for i, (partition, key, value, ts) in enumerate(rows):

        def delivered(err: KafkaError | None, msg: Message, i: int = i) -> None:
            assert err is None, err
            positions[i] = (msg.partition() or 0, msg.offset() or 0)

        producer.produce(topic, value=value, key=key, partition=partition, timestamp=ts, on_delivery=delivered)
    assert producer.flush(15) == 0
    return [positions[i] for i in range(len(rows))]


def feedback_rows(n: int, partitions: int = PARTITIONS) -> list[tuple[int, bytes, bytes, int]]:
    return [(i % partitions, f"user-{i}".encode(), f"event-{i}".encode(), BASE_TS_MS + i) for i in range(n)]


def poll_until(source: KafkaSource, n: int, timeout_s: float = 20.0, max_records: int = 100) -> list[Record]:
    """Poll until at least `n` records came (fails at the deadline, saying how many)."""
    got: list[Record] = []
    wait_until(
        lambda: len(got) >= n,
        timeout_s,
        f"{n} records (got {len(got)})",
        lambda: got.extend(source.poll_batch(max_records, 0.2)),
    )
    return got


def read_all(bootstrap: str, topics: list[str], n: int, partitions: int = PARTITIONS) -> list[Message]:
    """Exactly the `n` records the given topics hold, read from the start of every partition."""
    reader = Consumer(consumer_config(bootstrap, unique_name("reader"), **{"fetch.max.bytes": 16 * 1024 * 1024}))
    try:
        reader.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t in topics for p in range(partitions)])
        got = consume_n(reader, n)
        assert not reader.consume(num_messages=1, timeout=0.5), "more records than expected"
        return got
    finally:
        reader.close()


def source_for(kafka: KafkaConfig, **kw: Any) -> KafkaSource:
    return KafkaSource(kafka, overrides={**FAST_GROUP, **kw.pop("overrides", {})}, **kw)


def pipeline_result(input_topic: str) -> tuple[BatchResult, NeuralRecommender]:
    """A real Pipeline run on synthetic events spread over the input partitions, plus one bad record."""
    raw = synthetic_stream(120, n_users=6, n_items=30, seed=0)
    users = sorted({json.loads(r)["user_id"] for r in raw})
    items = sorted({json.loads(r)["item_id"] for r in raw})
    torch.manual_seed(0)
    model = NeuralRecommender(RecommenderConfig(n_users=len(users), n_items=len(items), dim=8, hidden=16), users, items)
    with torch.no_grad():
        model.global_bias.fill_(3.0)
    freeze(model)
    model.fingerprint = "sha256:" + "ab" * 32
    pipeline = Pipeline(model, PipelineConfig(window=WindowConfig(shots=4, query_shots=1, min_shots=2)))
    records: list[Record] = []
    for offset, line in enumerate(raw):
        user = json.loads(line)["user_id"]
        partition = int(user[1:]) % PARTITIONS  # keyed by user: one user, one partition
        records.append(Record(line, Position(input_topic, partition, offset), user.encode(), BASE_TS_MS + offset))
    records.append(Record(b"{not json", Position(input_topic, 2, 999), b"user-x", BASE_TS_MS + 999))
    result = pipeline.process(records)
    assert result.updates and result.log and result.dead_letters, "the fixture must exercise all three topics"
    return result, model


def headers_of(msg: Message) -> dict[str, str]:
    return {k: (v or b"").decode() for k, v in (msg.headers() or [])}


# ---- KafkaSource ------------------------------------------------------------------------------------
def test_source_yields_exact_positions_keys_and_timestamps_after_on_assign(
    service: KafkaConfig, closing: Callable[[Any], Any]
) -> None:
    rows = feedback_rows(30)
    positions = produce_at(service.bootstrap_servers, service.topic, rows)
    source = closing(source_for(service, stats_interval_ms=60_000))
    assert isinstance(source, Source)
    listener = Listener(source)
    source.set_listener(listener)

    got = poll_until(source, len(rows))

    expected = {
        (service.topic, p, o): (key, value, ts) for (_, key, value, ts), (p, o) in zip(rows, positions, strict=True)
    }
    assert {r.position: (r.key, r.value, r.timestamp_ms) for r in got} == expected
    assert len(got) == len(rows)
    assert not source.exhausted
    all_partitions = [(service.topic, p) for p in range(PARTITIONS)]
    assert listener.events == [("assign", all_partitions)]  # once, and before any record was returned
    assert sorted(source.assignment) == all_partitions


def test_second_member_joining_revokes_while_partitions_are_still_owned(
    service: KafkaConfig, closing: Callable[[Any], Any]
) -> None:
    produce_at(service.bootstrap_servers, service.topic, feedback_rows(6))
    first = closing(source_for(service, client_id="first"))
    listener = Listener(first, commit_on_revoke={(service.topic, p): 1 for p in range(PARTITIONS)})
    first.set_listener(listener)
    poll_until(first, 6)
    assert len(first.assignment) == PARTITIONS

    second = closing(source_for(service, client_id="second"))
    second_listener = Listener(second)
    second.set_listener(second_listener)

    def both_poll() -> None:
        first.poll_batch(100, 0.1)
        second.poll_batch(100, 0.1)

    wait_until(
        lambda: bool(first.assignment) and bool(second.assignment),
        30,
        "the group to split the partitions between both members",
        both_poll,
    )
    revoked = [tps for kind, tps in listener.events if kind == "revoke"]
    assert revoked and revoked[0] == sorted((service.topic, p) for p in range(PARTITIONS))
    assert sorted(listener.owned_during_revoke[0]) == revoked[0]  # still owned when on_revoke ran
    assert first.committed == {(service.topic, p): 1 for p in range(PARTITIONS)}  # so the runner can commit
    assert sorted(first.assignment + second.assignment) == [(service.topic, p) for p in range(PARTITIONS)]
    assert ("assign", sorted(second.assignment)) in second_listener.events


def test_new_source_resumes_at_the_committed_offset_and_skips_unowned_partitions(
    service: KafkaConfig, closing: Callable[[Any], Any]
) -> None:
    rows = [(0, b"k", f"v{i}".encode(), BASE_TS_MS + i) for i in range(20)]
    produce_at(service.bootstrap_servers, service.topic, rows)
    tp = (service.topic, 0)
    first = source_for(service)
    try:
        poll_until(first, 20)
        first.commit({tp: 12, (service.topic + "-other", 0): 3})  # a partition it does not own: skipped
        assert first.committed == {tp: 12}
    finally:
        first.close()

    second = closing(source_for(service))
    resumed = poll_until(second, 8)
    assert [r.position.offset for r in resumed if r.position.partition == 0] == list(range(12, 20))
    assert [r.value for r in resumed] == [f"v{i}".encode() for i in range(12, 20)]


def test_pause_all_stops_delivery_and_resume_all_continues_without_gaps(
    service: KafkaConfig, closing: Callable[[Any], Any]
) -> None:
    rows = [(0, b"k", f"v{i}".encode(), BASE_TS_MS + i) for i in range(40)]
    produce_at(service.bootstrap_servers, service.topic, rows)
    source = closing(source_for(service))
    got = poll_until(source, 1, max_records=5)

    source.pause_all()
    assert source.paused
    while_paused = [source.poll_batch(100, 0.2) for _ in range(5)]
    assert while_paused == [[]] * 5
    source.resume_all()
    assert not source.paused
    got += poll_until(source, 40 - len(got))

    assert [r.position.offset for r in got] == list(range(40))  # nothing lost or repeated around the pause


def test_lag_counts_records_after_the_committed_offset(service: KafkaConfig, closing: Callable[[Any], Any]) -> None:
    rows = [(p, b"k", b"v", BASE_TS_MS) for p in (0, 1) for _ in range(15)]
    produce_at(service.bootstrap_servers, service.topic, rows)
    source = closing(source_for(service, stats_interval_ms=500))
    seen: list[dict[str, Any]] = []
    source.on_stats = seen.append
    poll_until(source, 30)
    source.commit({(service.topic, 0): 10, (service.topic, 1): 15})

    expected = {(service.topic, 0): 5, (service.topic, 1): 0}
    wait_until(
        lambda: source.lag == expected, 15, f"lag {expected} (have {source.lag})", lambda: source.poll_batch(10, 0.2)
    )
    assert seen and "topics" in seen[-1]  # the metrics hook saw the parsed statistics


def test_source_keeps_polling_and_warns_when_the_broker_is_unreachable(caplog: pytest.LogCaptureFixture) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    source = KafkaSource(KafkaConfig(bootstrap_servers=bootstrap, topic="t", group="g"), overrides=FAST_GROUP)
    try:
        with caplog.at_level(logging.WARNING, logger="stream_adapt.io.kafka_source"):
            batches: list[list[Record]] = []
            wait_until(
                lambda: any(f"cannot reach Kafka at {bootstrap}" in r.getMessage() for r in caplog.records),
                10,
                "the unreachable warning",
                lambda: batches.append(source.poll_batch(10, 0.2)),
            )
            for _ in range(3):
                batches.append(source.poll_batch(10, 0.2))
        assert all(b == [] for b in batches)
        warnings = [r for r in caplog.records if "cannot reach Kafka" in r.getMessage()]
        assert len(warnings) == 1  # rate-limited, not one per poll
    finally:
        source.close(timeout_s=5)


# ---- KafkaSink --------------------------------------------------------------------------------------
def test_sink_publishes_updates_log_and_dead_letters_to_their_partitions(
    service: KafkaConfig, closing: Callable[[Any], Any]
) -> None:
    result, model = pipeline_result(service.topic)
    # A global update whose events came from partition 2 must still go to partition 0.
    donor = next(u for u in result.updates if u.update.positions[-1]["partition"] != 0)
    meta = donor.update.model_copy(update={"entity": GLOBAL_ENTITY, "entity_kind": "global"})
    result.updates.append(PublishedUpdate(GLOBAL_ENTITY, meta, donor.payload))
    sink = closing(KafkaSink(service))
    assert isinstance(sink, Sink)

    sink.publish(result)
    assert sink.flush(15)
    assert sink.backlog == 0
    counts = {
        service.model_topic: len(result.updates),
        service.log_topic: len(result.log),
        service.dead_letter_topic: len(result.dead_letters),
    }
    assert dict(sink.delivered) == counts
    assert not sink.failures

    got = read_all(service.bootstrap_servers, list(counts), sum(counts.values()))
    by_topic: dict[str, list[Message]] = {t: [m for m in got if m.topic() == t] for t in counts}
    updates = {(u.entity, u.update.version): u for u in result.updates}
    for msg in by_topic[service.model_topic]:
        entity, headers = (msg.key() or b"").decode(), headers_of(msg)
        sent = updates.pop((entity, int(headers["stream-adapt-version"])))
        assert msg.value() == sent.payload
        assert headers == update_headers(sent)
        if entity == GLOBAL_ENTITY:
            assert msg.partition() == 0
            continue
        assert msg.partition() == sent.update.positions[-1]["partition"] % PARTITIONS
        decoded, _ = decode_update(msg.value() or b"", model.adapter_spec(), model.fingerprint)
        assert (decoded.entity, decoded.version) == (entity, sent.update.version)
    assert not updates

    logged = sorted(
        AdaptationRecord.model_validate_json(m.value() or b"").model_dump_json() for m in by_topic[service.log_topic]
    )
    assert logged == sorted(r.model_dump_json() for r in result.log)
    for msg in by_topic[service.log_topic]:
        rec = AdaptationRecord.model_validate_json(msg.value() or b"")
        assert (msg.key() or b"").decode() == rec.entity
        assert msg.partition() == (rec.positions[-1]["partition"] % PARTITIONS if rec.positions else 0)

    [dead] = by_topic[service.dead_letter_topic]
    [bad] = result.dead_letters
    assert (dead.key(), dead.value(), dead.partition()) == (b"user-x", b"{not json", 2)
    assert headers_of(dead) == {
        "stream-adapt-reason": "not_json",
        "stream-adapt-detail": bad.detail,
        "stream-adapt-source-topic": service.topic,
        "stream-adapt-source-partition": "2",
        "stream-adapt-source-offset": "999",
        "stream-adapt-source-timestamp": str(BASE_TS_MS + 999),
    }


def test_sink_truncates_oversized_dead_letters_and_refuses_oversized_updates(
    service: KafkaConfig, closing: Callable[[Any], Any]
) -> None:
    result, _ = pipeline_result(service.topic)
    limit = 4096
    sink = closing(KafkaSink(service, max_message_bytes={service.dead_letter_topic: limit, service.model_topic: 600}))
    raw = bytes(range(256)) * 40  # 10240 bytes
    big = DecodeError(raw, "too_large", "10240 bytes > limit", Position(service.topic, 4, 7), b"k", BASE_TS_MS)
    sink.publish(BatchResult(dead_letters=[big], updates=result.updates[:1]))

    assert sink.flush(15)  # the refused update does not block the stream
    assert sink.failures == {(service.model_topic, "too_large"): 1}
    assert dict(sink.delivered) == {service.dead_letter_topic: 1}
    [msg] = read_all(service.bootstrap_servers, [service.dead_letter_topic, service.model_topic], 1)
    value = msg.value() or b""
    headers = headers_of(msg)
    assert 0 < len(value) < limit and raw.startswith(value)
    assert headers["stream-adapt-truncated"] == "true"
    assert headers["stream-adapt-original-size"] == str(len(raw))
    assert msg.partition() == 4 % PARTITIONS


def test_sink_names_the_missing_topic(service: KafkaConfig, kafka_bootstrap: str) -> None:
    kafka = service.model_copy(update={"log_topic": unique_name("absent")})
    with pytest.raises(StreamAdaptError, match=rf"no topic '{kafka.log_topic}'.*stream-adapt topics create"):
        KafkaSink(kafka)


def test_sink_fails_fast_naming_an_unreachable_bootstrap() -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(StreamAdaptError, match=rf"cannot reach Kafka at {bootstrap} within 3s"):
        KafkaSink(KafkaConfig(bootstrap_servers=bootstrap), connect_timeout_s=3)
    assert time.monotonic() - started < 10


def test_sink_keeps_failed_deliveries_and_sends_them_again(broker_behind_link: tuple[str, CuttableLink]) -> None:
    """Deliveries that fail in an outage longer than message.timeout.ms are counted, kept (backlog),
    hold flush() at False, and are produced again by every flush.

    Delivery after the outage is not checked here: Tansu answers the idempotent producer's epoch bump
    (which librdkafka makes after timed-out messages) with PRODUCER_FENCED, so on Tansu the resent
    messages never land; Apache Kafka accepts the bump.
    """
    bootstrap, link = broker_behind_link
    kafka = KafkaConfig(bootstrap_servers=bootstrap)
    ensure_topics(kafka, default_topic_specs(kafka, 1, 1), timeout_s=15)
    sink = KafkaSink(kafka, overrides={"message.timeout.ms": 1000})
    dead = [DecodeError(f"bad-{i}".encode(), "not_json", "x", Position("in", 0, i)) for i in range(4)]
    timed_out = (kafka.dead_letter_topic, "msg_timed_out")
    try:
        sink.publish(BatchResult(dead_letters=dead[:1]))
        assert sink.flush(10)
        link.cut()
        sink.publish(BatchResult(dead_letters=dead[1:]))
        # Three messages failing twice means each was produced again after its first failure.
        wait_until(lambda: sink.failures[timed_out] >= 6, 20, "two rounds of failures", lambda: sink.flush(0.2))
        assert not sink.flush(0.1)
        assert sink.backlog == 3 and dict(sink.delivered) == {kafka.dead_letter_topic: 1}
        assert set(sink.failures) == {timed_out}
    finally:
        link.restore()
        sink.close(timeout_s=1)


def test_transactional_commit_moves_the_groups_committed_offset(
    service: KafkaConfig, closing: Callable[[Any], Any]
) -> None:
    rows = [(0, b"k", f"v{i}".encode(), BASE_TS_MS + i) for i in range(10)]
    produce_at(service.bootstrap_servers, service.topic, rows)
    source = closing(source_for(service))
    poll_until(source, 10)  # a member of the group now
    result, _ = pipeline_result(service.topic)
    sink = closing(KafkaSink(service, transactional_id=unique_name("txn")))

    sink.begin()
    sink.publish(result)
    sink.commit({(service.topic, 0): 7}, source.group_metadata())

    assert sink.backlog == 0
    assert sum(sink.delivered.values()) == len(result.updates) + len(result.log) + len(result.dead_letters)
    checker = Consumer(consumer_config(service.bootstrap_servers, service.group))
    try:
        [committed] = checker.committed([TopicPartition(service.topic, 0)], timeout=10)
    finally:
        checker.close()
    assert committed.offset == 7
