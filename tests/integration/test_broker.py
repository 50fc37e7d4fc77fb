"""The broker plumbing against a real Kafka-protocol broker: topic setup, consumer-group resume, errors."""

from __future__ import annotations

import socket
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource
from kafka_helpers import consume_n, consumer_config, delete_topics, produce_all, unique_name

from stream_adapt.config import KafkaConfig
from stream_adapt.errors import StreamAdaptError
from stream_adapt.io.admin import MODEL_MAX_MESSAGE_BYTES, default_topic_specs, ensure_topics
from stream_adapt.io.broker import BrokerError, EmbeddedBroker, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def test_ensure_topics_creates_with_configs_then_reports_exists(kafka_bootstrap: str) -> None:
    prefix = unique_name("svc")
    kafka = KafkaConfig(
        bootstrap_servers=kafka_bootstrap,
        topic=f"{prefix}.feedback",
        model_topic=f"{prefix}.models",
        log_topic=f"{prefix}.adaptations",
        dead_letter_topic=f"{prefix}.dead-letters",
    )
    specs = default_topic_specs(kafka, partitions=3, replication=1)
    names = [s.name for s in specs]

    try:
        assert ensure_topics(kafka, specs, timeout_s=15) == dict.fromkeys(names, "created")
        assert ensure_topics(kafka_bootstrap, specs, timeout_s=15) == dict.fromkeys(names, "exists")

        admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
        metadata = admin.list_topics(timeout=10)
        assert {n: len(metadata.topics[n].partitions) for n in names} == dict.fromkeys(names, 3)
        resource = ConfigResource("topic", kafka.model_topic)
        [future] = admin.describe_configs([resource], request_timeout=10).values()
        configs = {k: v.value for k, v in future.result(timeout=10).items()}
        assert configs["cleanup.policy"] == "compact"
        assert configs["max.message.bytes"] == str(MODEL_MAX_MESSAGE_BYTES)
    finally:
        delete_topics(kafka_bootstrap, names)


def test_new_group_member_resumes_exactly_after_the_committed_offset(
    kafka_bootstrap: str, topic_factory: Callable[..., str], group_id: str
) -> None:
    topic = topic_factory("resume", partitions=2)
    n = 40
    produce_all(kafka_bootstrap, topic, ((f"user-{i % 7}".encode(), str(i).encode()) for i in range(n)))

    first = Consumer(consumer_config(kafka_bootstrap, group_id))
    try:
        first.subscribe([topic])
        records = consume_n(first, n)
        by_partition: dict[int, list[int]] = defaultdict(list)
        for msg in records:
            by_partition[msg.partition()].append(msg.offset())
        assert sorted(int(m.value()) for m in records) == list(range(n))
        # Commit the middle of what was read: everything before `commit_at` is done, the rest is not.
        commit_at = {p: offsets[len(offsets) // 2] for p, offsets in by_partition.items()}
        first.commit(offsets=[TopicPartition(topic, p, o) for p, o in commit_at.items()], asynchronous=False)
        committed = first.committed([TopicPartition(topic, p) for p in commit_at], timeout=10)
        assert {tp.partition: tp.offset for tp in committed} == commit_at
    finally:
        first.close()

    expected = sorted((p, o) for p, offsets in by_partition.items() for o in offsets if o >= commit_at[p])
    second = Consumer(consumer_config(kafka_bootstrap, group_id))
    try:
        second.subscribe([topic])
        resumed = consume_n(second, len(expected))
        assert sorted((m.partition(), m.offset()) for m in resumed) == expected
    finally:
        second.close()


def test_ensure_topics_fails_fast_and_clearly_when_the_broker_is_unreachable() -> None:
    bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(StreamAdaptError, match=rf"Kafka at {bootstrap}: not reachable within 2s"):
        ensure_topics(bootstrap, default_topic_specs(KafkaConfig(), 1, 1), timeout_s=2)
    assert time.monotonic() - started < 10  # bounded by timeout_s, not librdkafka's minute-long defaults


def test_embedded_broker_serves_logs_and_stops_idempotently(tmp_path: Path) -> None:
    log_path = tmp_path / "broker.log"
    with EmbeddedBroker(log_path=log_path) as broker:
        host, port = broker.bootstrap_servers.rsplit(":", 1)
        assert host == "127.0.0.1" and broker.running
        assert ensure_topics(broker.bootstrap_servers, [], timeout_s=5) == {}
    assert not broker.running
    broker.stop()  # a second stop is harmless
    assert "ready" in log_path.read_text()
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=1):
        pass
    with pytest.raises(BrokerError, match="not running"):
        _ = broker.bootstrap_servers


def test_embedded_broker_start_failure_reports_the_log_tail(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        broker = EmbeddedBroker(port=port, log_path=tmp_path / "broker.log", start_timeout_s=10)
        with pytest.raises(BrokerError) as caught:
            broker.start()
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message
    assert "tansu broker" in message  # the tail of the broker's own output
    assert not broker.running
