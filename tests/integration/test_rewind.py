"""Rewind against a real broker: offsets by record time (corrected on the client where the broker
looks up append time), refusal while the group has members, dry runs, and the CLI (`rewind`,
`run --start-from`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition
from kafka_helpers import consumer_config, wait_until

from stream_adapt.config import KafkaConfig
from stream_adapt.io.changelog import read_to_end
from stream_adapt.replay import replay_file
from stream_adapt.rewind import GroupActiveError, find_offsets, rewind_group

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TopicFactory = Callable[..., str]
T0 = 1_600_000_000  # record times in 2020; the broker appends them now: an append-time lookup is wrong
N = 600


@pytest.fixture
def replayed(kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path) -> tuple[str, dict[int, list[int]]]:
    """A 3-partition topic holding N events at T0 + i seconds: (topic, record times in ms per partition)."""
    topic = topic_factory("rewind", partitions=3)
    log = tmp_path / "events.jsonl"
    rows = [
        {"event_id": f"e{i}", "user_id": f"u{i % 29}", "item_id": "i1", "value": 3.0, "timestamp": T0 + i}
        for i in range(N)
    ]
    log.write_text("".join(json.dumps(dict(row, event_type="rating")) + "\n" for row in rows))
    assert replay_file(log, KafkaConfig(bootstrap_servers=kafka_bootstrap), topic=topic).sent == N
    times: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for msg in sorted(read_to_end(kafka_bootstrap, topic, None, timeout_s=20), key=lambda m: m.offset()):
        times[msg.partition()].append(msg.timestamp()[1])
    return topic, times


def expected(times: dict[int, list[int]], target_ms: int) -> dict[int, int]:
    """The first offset per partition whose record time is >= target (the end if none), by reading all."""
    return {
        p: next((o for o, ts in enumerate(ts_list) if ts >= target_ms), len(ts_list)) for p, ts_list in times.items()
    }


def committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    consumer = Consumer(consumer_config(bootstrap, group))
    try:
        return {tp.partition: tp.offset for tp in consumer.committed([TopicPartition(topic, p) for p in range(3)], 10)}
    finally:
        consumer.close()


def test_find_offsets_returns_the_first_record_at_or_after_the_time(
    kafka_bootstrap: str, replayed: tuple[str, dict[int, list[int]]]
) -> None:
    topic, times = replayed
    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap)
    for seconds in (-5, 0, 1, 299, 300, 599, 600, 10_000):  # before all, edges, middle, after all
        found = find_offsets(kafka, topic, T0 + seconds)
        want = expected(times, (T0 + seconds) * 1000)
        assert {p.partition: p.offset for p in found} == want, f"target T0{seconds:+d}"
        for p in found:
            in_range = p.offset < len(times[p.partition])
            assert p.timestamp_ms == (times[p.partition][p.offset] if in_range else None)
            assert p.corrected == (p.broker_offset != p.offset)  # Tansu answers 0 throughout


def test_rewind_commits_the_offsets_for_an_idle_group_and_a_dry_run_commits_nothing(
    kafka_bootstrap: str, replayed: tuple[str, dict[int, list[int]]], group_id: str
) -> None:
    topic, times = replayed
    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap)
    dry = rewind_group(kafka, group_id, topic, "2020-09-13T12:31:40Z", dry_run=True)  # T0 + 300
    assert not dry.committed and committed(kafka_bootstrap, group_id, topic) == {0: -1001, 1: -1001, 2: -1001}

    report = rewind_group(kafka, group_id, topic, str(T0 + 300))
    want = expected(times, (T0 + 300) * 1000)
    assert report.committed and {p.partition: p.offset for p in report.partitions} == want
    assert committed(kafka_bootstrap, group_id, topic) == want
    assert all(p.previous is None for p in report.partitions)
    text = report.describe()
    assert "partition 0: none -> " in text and "2020-09-13T12:31:40Z" in text

    again = rewind_group(kafka, group_id, topic, T0 + 100)  # backwards, from committed offsets
    assert {p.partition: p.previous for p in again.partitions} == want
    assert committed(kafka_bootstrap, group_id, topic) == expected(times, (T0 + 100) * 1000)


def test_rewind_refuses_a_group_with_an_active_member_and_moves_nothing(
    kafka_bootstrap: str, replayed: tuple[str, dict[int, list[int]]], group_id: str
) -> None:
    topic, times = replayed
    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap)
    member = Consumer(consumer_config(kafka_bootstrap, group_id))
    try:
        member.subscribe([topic])
        wait_until(lambda: bool(member.assignment()), 20, "the member's assignment", lambda: member.poll(0.1))
        member.commit(offsets=[TopicPartition(topic, p, 5) for p in range(3)], asynchronous=False)
        with pytest.raises(GroupActiveError, match=f"consumer group '{group_id}' is active.*stop its consumers"):
            rewind_group(kafka, group_id, topic, T0 + 300)
        assert committed(kafka_bootstrap, group_id, topic) == {0: 5, 1: 5, 2: 5}
    finally:
        member.close()  # leaves the group: it is empty now
    report = rewind_group(kafka, group_id, topic, T0 + 300)
    assert {p.partition: p.previous for p in report.partitions} == {0: 5, 1: 5, 2: 5}
    assert committed(kafka_bootstrap, group_id, topic) == expected(times, (T0 + 300) * 1000)


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_ADAPT_")}
    return subprocess.run(
        [sys.executable, "-m", "stream_adapt", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_cli_rewind_and_run_start_from_refuse_an_active_group(
    kafka_bootstrap: str, replayed: tuple[str, dict[int, list[int]]], group_id: str, tmp_path: Path
) -> None:
    topic, times = replayed
    kafka_flags = ["--bootstrap-servers", kafka_bootstrap, "--topic", topic, "--group", group_id]
    done = _cli("rewind", *kafka_flags, "--to", "2020-09-13T12:31:40Z")
    assert done.returncode == 0, done.stderr
    want = expected(times, (T0 + 300) * 1000)
    assert all(f"partition {p}: none -> {o} " in done.stdout for p, o in want.items()), done.stdout

    model_dir = tmp_path / "model"
    _tiny_model(model_dir)
    member = Consumer(consumer_config(kafka_bootstrap, group_id))
    try:
        member.subscribe([topic])
        wait_until(lambda: bool(member.assignment()), 20, "the member's assignment", lambda: member.poll(0.1))
        refused = _cli("rewind", *kafka_flags, "--to", str(T0))
        assert refused.returncode == 1 and f"consumer group '{group_id}' is active" in refused.stderr
        run = _cli("run", "--model", str(model_dir), "--source", "kafka", "--sink", "kafka", *kafka_flags,
                   "--start-from", str(T0))  # fmt: skip
        assert run.returncode == 1 and f"consumer group '{group_id}' is active" in run.stderr, run.stderr
        assert "Traceback" not in run.stderr
    finally:
        member.close()
    assert committed(kafka_bootstrap, group_id, topic) == want  # neither refused command moved it


def test_run_start_from_needs_a_kafka_source_and_a_valid_time(tmp_path: Path) -> None:
    bad_source = _cli("run", "--model", "m", "--source", "file:x.jsonl", "--sink", "dir:out", "--start-from", "0")
    assert bad_source.returncode == 2 and "--start-from rewinds the consumer group" in bad_source.stderr
    bad_time = _cli("run", "--model", "m", "--source", "kafka", "--sink", "kafka", "--start-from", "soon")
    assert bad_time.returncode == 2 and "expected ISO-8601" in bad_time.stderr


def _tiny_model(directory: Path) -> None:
    import torch

    from stream_adapt.learning.models import NeuralRecommender, RecommenderConfig, freeze, save_model

    torch.manual_seed(0)
    users, items = [f"u{i}" for i in range(29)], ["i1"]
    model = NeuralRecommender(RecommenderConfig(n_users=len(users), n_items=1, dim=4, hidden=8), users, items)
    freeze(model)
    save_model(model, directory)
