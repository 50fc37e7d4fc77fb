"""The Kafka service against a real broker: end to end, crashes, two members, an unreachable broker.

Every test ends with the audit (stream_adapt.audit): from the topics alone, no valid event is lost and
none is applied twice, and no entity's version repeats or goes back.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from kafka_helpers import CuttableLink
from service_helpers import (
    FAST_GROUP,
    World,
    caught_up,
    kafka_topics,
    live_slice,
    logged_count,
    member_process,
    ok_audit,
    partition_ends,
    run_member,
    start_member,
    stop_process,
    wait_for,
)

from stream_adapt.config import KafkaConfig, Settings
from stream_adapt.io.changelog import read_to_end
from stream_adapt.learning.models import load_model
from stream_adapt.learning.updates import decode_update
from stream_adapt.replay import replay_file
from stream_adapt.service import KafkaService, ServiceOptions

pytestmark = pytest.mark.timeout(240)


def test_events_in_updates_out_with_lineage_a_complete_log_and_dead_letters_with_headers(
    world: World, kafka_bootstrap: str, tmp_path: Path
) -> None:
    kafka = kafka_topics(kafka_bootstrap, partitions=3)
    sent = replay_file(live_slice(world, tmp_path, 3000), kafka).sent
    member = start_member(world, kafka, "solo")
    wait_for(lambda: member.stats.records >= sent, 90, "the member to process every record")
    member.stop()

    model = load_model(world.model_dir)
    updates = list(read_to_end(kafka, kafka.model_topic, None, timeout_s=30))
    assert len(updates) == member.stats.updates > 20
    for msg in updates:
        headers = dict(msg.headers() or [])
        update, _ = decode_update(
            msg.value(), model.adapter_spec() if msg.key() != b"__global__" else model.global_spec(), model.fingerprint
        )
        assert headers["stream-adapt-version"] == str(update.version).encode()
        assert update.base_fingerprint == model.fingerprint
        if update.entity != "__global__":
            # routed to the partition of the events it consumed, so a new owner restores from one partition
            assert {p["partition"] for p in update.positions} == {msg.partition()}
            assert update.parent_version == (update.version - 1 or None)

    log = [json.loads(m.value()) for m in read_to_end(kafka, kafka.log_topic, None, timeout_s=30)]
    assert Counter(r["outcome"] for r in log)["accepted"] == member.stats.outcomes["accepted"]

    dead = list(read_to_end(kafka, kafka.dead_letter_topic, None, timeout_s=30))
    assert len(dead) == sum(member.stats.invalid.values()) > 0
    for msg in dead:
        headers = {k: v.decode() for k, v in msg.headers() or []}
        assert headers["stream-adapt-reason"] and headers["stream-adapt-detail"]
        assert headers["stream-adapt-source-topic"] == kafka.topic
        assert int(headers["stream-adapt-source-offset"]) >= 0

    summary = ok_audit(kafka)
    assert summary["records"] == sent
    assert summary["pending"] < sent * 0.2  # almost everything was used; only open windows are pending


@pytest.mark.parametrize(
    "failpoint",
    [
        "mid_batch=3",  # processed a batch, nothing of it published
        "after_publish=1",  # outputs delivered, offsets not committed
        "after_commit=1",  # committed, windows still open in memory
        "in_revoke=1",  # dying while handing partitions over (here: at shutdown)
    ],
)
def test_a_member_killed_at_any_point_loses_nothing_and_applies_nothing_twice_after_restart(
    world: World, kafka_bootstrap: str, tmp_path: Path, failpoint: str
) -> None:
    kafka = kafka_topics(kafka_bootstrap, partitions=2)
    sent = replay_file(live_slice(world, tmp_path, 3000), kafka).sent
    log_path = tmp_path / "member.log"
    proc = member_process(world, kafka, log_path, env={"STREAM_ADAPT_FAILPOINTS": failpoint})
    if failpoint.startswith("in_revoke"):
        wait_for(lambda: b"assigned" in log_path.read_bytes() or proc.poll() is not None, 60, "the member to start")
        wait_for(lambda: logged_count(kafka) > 0 or proc.poll() is not None, 60, "the member to log outcomes")
        stop_process(proc, timeout_s=30) if proc.poll() is None else None
    assert proc.wait(90) == -9, log_path.read_text()[-3000:]

    # A new member restarts from the committed offsets and the model topic.
    ends = partition_ends(kafka)
    member = start_member(world, kafka, "restarted")
    wait_for(lambda: caught_up([member], kafka, ends), 90, "the restarted member to reach the end")
    member.stop()
    assert member.stats.already_applied > 0 or failpoint.startswith("mid_batch"), member.service.restored
    summary = ok_audit(kafka)
    assert summary["records"] == sent


def test_two_members_split_the_partitions_and_one_continues_the_others_lineage(
    world: World, kafka_bootstrap: str, tmp_path: Path
) -> None:
    kafka = kafka_topics(kafka_bootstrap, partitions=4)
    a = start_member(world, kafka, "a")
    wait_for(lambda: len(a.service.source.assignment) == 4, 60, "a to own all partitions")
    b = start_member(world, kafka, "b")
    wait_for(
        lambda: (
            len(a.service.source.assignment) + len(b.service.source.assignment) == 4
            and bool(b.service.source.assignment)
            and bool(a.service.source.assignment)
        ),
        60,
        "the partitions to split between a and b",
    )
    first = live_slice(world, tmp_path, 2500)
    sent = replay_file(first, kafka).sent
    ends = partition_ends(kafka)
    wait_for(lambda: caught_up([a, b], kafka, ends), 90, "a and b to reach the end")
    b_partitions = {p for _, p in b.service.source.assignment}
    # each entity was adapted by one owner: its updates all sit on one partition
    before = _versions_by_entity(kafka)
    assert before and all(len(parts) == 1 for _, parts in before.values())

    b.stop()  # graceful: commits and hands its partitions over
    wait_for(lambda: len(a.service.source.assignment) == 4, 60, "a to take over b's partitions")
    rest = tmp_path / "rest.jsonl"
    rest.write_bytes(b"".join(world.live.read_bytes().splitlines(keepends=True)[2500:6000]))
    sent += replay_file(rest, kafka).sent
    ends = partition_ends(kafka)
    wait_for(lambda: caught_up([a], kafka, ends), 90, "a to reach the end of every partition")
    a.stop()

    after = _versions_by_entity(kafka)
    continued = [
        e
        for e, (versions, parts) in after.items()
        if parts <= b_partitions and e in before and max(versions) > max(before[e][0])
    ]
    assert continued, "a published no new version for an entity b used to own"
    for entity in continued:
        versions = after[entity][0]
        assert versions == list(range(1, len(versions) + 1))  # b's lineage continued, no repeat, no gap
    ok_audit(kafka)


def test_a_member_started_before_kafka_is_reachable_waits_with_clear_log_lines_then_works(
    world: World, broker_behind_link: tuple[str, CuttableLink], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bootstrap, link = broker_behind_link
    kafka = kafka_topics(bootstrap, partitions=2)
    sent = replay_file(live_slice(world, tmp_path, 1500), kafka).sent
    link.cut()
    caplog.set_level(logging.WARNING, logger="stream_adapt")
    stop = threading.Event()
    made: list[KafkaService | None] = []
    settings = Settings(kafka=kafka, batch_size=500, poll_timeout_s=0.2)
    options = ServiceOptions(consumer_overrides=FAST_GROUP)
    connecting = threading.Thread(
        target=lambda: made.append(
            KafkaService.connect(settings, load_model(world.model_dir), stop=stop, options=options)
        )
    )
    connecting.start()
    wait_for(lambda: f"cannot reach Kafka at {bootstrap}" in caplog.text, 30, "a clear 'cannot reach' warning")
    assert connecting.is_alive()  # still waiting, not crashed
    link.restore()
    connecting.join(60)
    assert made and made[0] is not None
    member = run_member(made[0], "late")
    ends = partition_ends(kafka)
    wait_for(lambda: caught_up([member], kafka, ends), 90, "the member to reach the end")
    member.stop()
    assert ok_audit(kafka)["records"] == sent


def test_an_outage_longer_than_the_session_loses_nothing_and_the_member_carries_on(
    world: World, broker_behind_link: tuple[str, CuttableLink], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bootstrap, link = broker_behind_link
    kafka = kafka_topics(bootstrap, partitions=2)
    lines = world.live.read_bytes().splitlines(keepends=True)
    (tmp_path / "a.jsonl").write_bytes(b"".join(lines[:1500]))
    (tmp_path / "b.jsonl").write_bytes(b"".join(lines[1500:3000]))
    sent = replay_file(tmp_path / "a.jsonl", kafka).sent
    caplog.set_level(logging.WARNING, logger="stream_adapt")
    member = start_member(world, kafka, "survivor")
    ends = partition_ends(kafka)
    wait_for(lambda: caught_up([member], kafka, ends), 90, "the member to reach the end")
    link.cut()
    wait_for(lambda: f"cannot reach Kafka at {bootstrap}" in caplog.text, 30, "a clear 'cannot reach' warning")
    deadline = time.monotonic() + 8  # longer than session.timeout.ms (6 s): the group drops the member
    wait_for(lambda: time.monotonic() > deadline, 10, "the outage to last 8 s")
    assert member.thread.is_alive() and not member.errors
    link.restore()
    sent += replay_file(tmp_path / "b.jsonl", kafka).sent
    ends = partition_ends(kafka)
    wait_for(lambda: caught_up([member], kafka, ends), 120, "the member to carry on after the outage")
    member.stop()
    assert ok_audit(kafka)["records"] == sent


def _versions_by_entity(kafka: KafkaConfig) -> dict[str, tuple[list[int], set[int]]]:
    out: dict[str, tuple[list[int], set[int]]] = {}
    for msg in read_to_end(kafka, kafka.model_topic, None, timeout_s=30):
        key = (msg.key() or b"").decode()
        if key == "__global__":
            continue
        versions, parts = out.setdefault(key, ([], set()))
        versions.append(int(dict(msg.headers() or [])["stream-adapt-version"]))
        parts.add(msg.partition())
    return out
