"""The Kafka service under faults and modes the happy path does not reach: kill -9 inside a rebalance,
a graceful stop mid-stream, exactly-once transactions, backpressure.

Every test ends with the audit (stream_adapt.audit): from the topics alone, no valid event is lost and
none is applied twice, and no entity's version repeats or goes back.
"""

from __future__ import annotations

import itertools
import logging
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from service_helpers import (
    FAST_GROUP,
    Feeder,
    Member,
    World,
    caught_up,
    kafka_topics,
    kill_quietly,
    live_slice,
    make_service,
    member_process,
    ok_audit,
    partition_ends,
    run_member,
    start_member,
    tail,
    wait_for,
)

from stream_adapt.audit import committed_offsets
from stream_adapt.config import KafkaConfig
from stream_adapt.events import Record
from stream_adapt.io.changelog import read_to_end
from stream_adapt.replay import replay_file
from stream_adapt.service import ServiceOptions

pytestmark = pytest.mark.timeout(180)

#: SIGTERM to exit of a member process mid-stream. Measured 0.6-0.7 s (2 shared cores, local broker:
#: finish the batch, flush, commit, leave the group, print the summary); ~7x margin for a loaded machine.
GRACEFUL_EXIT_S = 5.0


def _committed(kafka: KafkaConfig, partitions: int) -> dict[int, int]:
    return committed_offsets(kafka, kafka.topic, list(range(partitions)), timeout_s=10)


def _published(kafka: KafkaConfig) -> int:
    """Adapter versions in the model topic (accepted adaptations published so far)."""
    return sum(1 for _ in read_to_end(kafka, kafka.model_topic, None, timeout_s=30))


@pytest.mark.parametrize(
    "failpoint",
    [
        "in_revoke=1",  # B's join makes A revoke: A commits, then dies before dropping its partitions
        "in_assign=2",  # A revokes cleanly, is given a share of the partitions and dies before restoring them
    ],
)
def test_a_member_killed_inside_a_rebalance_leaves_all_partitions_to_the_other_with_nothing_lost(
    world: World, kafka_bootstrap: str, tmp_path: Path, failpoint: str
) -> None:
    """A (a process) owns every partition and has published adapter versions; B (in-process) joins the
    group; the rebalance that B's join starts kills A inside `on_revoke` / `on_assign`. Once A's session
    expires, B owns every partition, restores A's entities from the model topic, re-reads from the
    committed offsets and recognises the events A had already applied.

    Why `already_applied > 0` here: A published accepted versions before B joined, and offsets are
    committed only up to the oldest event still held in an open window of each partition
    (`Pipeline.safe_offsets`). With ~50 users per partition interleaved in the stream, many windows are
    open at any time and the oldest of them started long before the events of the windows A accepted,
    so B re-reads events that A applied and must skip them (measured: 570 and 1020 of them). It is a
    property of this data, not of every stream: if every open window started after the last accepted
    event, nothing applied would be re-read, and 0 would be right.
    """
    partitions = 3
    kafka = kafka_topics(kafka_bootstrap, partitions=partitions)
    sent = replay_file(live_slice(world, tmp_path, 3000), kafka).sent
    log_path = tmp_path / "a.log"
    a = member_process(world, kafka, log_path, env={"STREAM_ADAPT_FAILPOINTS": failpoint})
    b = None
    try:
        wait_for(lambda: _published(kafka) > 0 or a.poll() is not None, 60, "A to publish adapter versions")
        assert a.poll() is None, tail(log_path)
        b = start_member(world, kafka, "b")
        assert a.wait(60) == -9, tail(log_path)
        a_log = tail(log_path, 1_000_000)
        if failpoint.startswith("in_revoke"):  # died inside on_revoke: it began, never finished
            assert "kafka_source: revoking" in a_log and "service: revoked" not in a_log, a_log[-3000:]
        else:  # died inside its second on_assign, after a complete revocation
            assert a_log.count("kafka_source: assigned") == 2 and "service: revoked" in a_log, a_log[-3000:]
        ends = partition_ends(kafka)
        wait_for(
            lambda: len(b.service.source.assignment) == partitions and caught_up([b], kafka, ends),
            60,
            "B to own every partition and reach the end of each",
        )
        b.stop()
    finally:
        kill_quietly(a)
        if b is not None and b.thread.is_alive():
            b.stop()
    assert b.stats.already_applied > 0, b.service.restored
    assert ok_audit(kafka)["records"] == sent


def test_sigterm_mid_stream_exits_0_promptly_with_offsets_committed_and_nothing_lost(
    world: World, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A member process gets SIGTERM while records are still arriving (a paced replay is running) and
    being processed: it finishes the batch, flushes, commits, leaves the group and exits with 0 within
    GRACEFUL_EXIT_S; the group's committed offsets did not go back, and a restarted member loses nothing.

    SIGTERM is sent once the member's periodic commits are past offset 0 on every partition: before that
    the oldest open windows still hold offset 0 (`Pipeline.safe_offsets`), and "> 0" could not be asked.
    """
    partitions = 3
    kafka = kafka_topics(kafka_bootstrap, partitions=partitions)
    log_path = tmp_path / "member.log"
    proc = member_process(world, kafka, log_path)
    feeder = Feeder(live_slice(world, tmp_path, 5000), kafka, rate=500)  # ~10 s of stream
    before: dict[int, int] = {}
    try:
        wait_for(lambda: b"assigned" in log_path.read_bytes() or proc.poll() is not None, 60, "the member to join")
        assert proc.poll() is None, tail(log_path)
        feeder.start()
        wait_for(
            lambda: _all_committed(kafka, partitions, before) or proc.poll() is not None,
            30,
            "the member to commit past offset 0 on every partition",
        )
        assert proc.poll() is None, tail(log_path)
        assert feeder.is_alive(), "the stream ended before the member was stopped: not mid-stream"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(GRACEFUL_EXIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"no exit within {GRACEFUL_EXIT_S:g}s of SIGTERM:\n{tail(log_path)}")
        print(f"SIGTERM -> exit {code} in {time.monotonic() - t0:.2f}s")
        assert code == 0, tail(log_path)
        assert "SIGTERM: finishing the batch" in tail(log_path, 100_000)
    finally:
        kill_quietly(proc)
        sent = feeder.sent(60) if feeder.ident is not None else 0

    after = _committed(kafka, partitions)
    assert all(after.get(p, 0) >= before[p] > 0 for p in range(partitions)), (before, after)

    ends = partition_ends(kafka)
    member = start_member(world, kafka, "restarted")
    wait_for(lambda: caught_up([member], kafka, ends), 60, "the restarted member to reach the end")
    member.stop()
    assert ok_audit(kafka)["records"] == sent


def _safe(member: Member) -> dict[int, int]:
    """What an idle member commits next: per input partition, the offset before its oldest open window.
    (Read from the test's thread: only while the member is caught up, so its loop changes nothing.)"""
    runner = member.service.runner
    return {p: o for (_, p), o in runner.pipeline.safe_offsets(runner.pending).items()}


def _all_committed(kafka: KafkaConfig, partitions: int, into: dict[int, int]) -> bool:
    """True once the group committed an offset > 0 on every partition; `into` gets the offsets."""
    return all(_poll_committed(kafka, partitions, into).get(p, 0) > 0 for p in range(partitions))


def _poll_committed(kafka: KafkaConfig, partitions: int, into: dict[int, int]) -> dict[int, int]:
    """The group's committed offsets now, also left in `into` (for a condition that must keep them)."""
    into.clear()
    into.update(_committed(kafka, partitions))
    return into


def test_exactly_once_commits_offsets_with_the_outputs_in_transactions(
    world: World, kafka_bootstrap: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`kafka.exactly_once`: each commit interval is one transaction holding the outputs and the input
    offsets (`send_offsets_to_transaction`); the consumer itself never commits.

    Checked here: the group's committed offsets advance although the consumer never committed, the outputs
    are published and counted exactly, transaction markers sit between them, and the audit passes.

    Not testable on the local Tansu broker (KAFKA_LOCAL.md), so left to a run against Apache Kafka:
    - fencing of an *open* transaction when its member crashes: Tansu does not fence it, so whether a
      crashed member's uncommitted outputs stay invisible to `read_committed` readers cannot be shown;
    - the verdict of a `read_committed` reader at all (Tansu was seen to show aborted records once and
      hide them once), so this test counts outputs with `read_uncommitted` and never builds on hiding.
    """
    partitions = 3
    kafka = kafka_topics(kafka_bootstrap, partitions=partitions).model_copy(update={"exactly_once": True})
    caplog.set_level(logging.WARNING, logger="stream_adapt")
    member = run_member(make_service(world, kafka, "eos"), "eos")
    try:
        sent = replay_file(live_slice(world, tmp_path, 1500), kafka).sent
        ends = partition_ends(kafka)
        wait_for(lambda: caught_up([member], kafka, ends), 60, "the member to reach the end")
        # The idle member commits a transaction every second: wait for the one holding everything so far.
        first: dict[int, int] = {}
        wait_for(lambda: _poll_committed(kafka, partitions, first) == _safe(member), 30, "a transaction's offsets")

        sent += replay_file(live_slice(world, tmp_path, 1500, start=1500), kafka).sent
        ends = partition_ends(kafka)
        wait_for(lambda: caught_up([member], kafka, ends), 60, "the member to reach the new end")
        later: dict[int, int] = {}
        wait_for(lambda: _poll_committed(kafka, partitions, later) == _safe(member), 30, "the next offsets")
        member.stop()
    finally:
        if member.thread.is_alive():
            member.stop()
    assert member.service.source.committed == {}  # every offset went through a transaction
    # A clean stop commits the last transaction and leaves none open for `close` to abort.
    assert "open transaction" not in caplog.text, caplog.text
    assert sum(first.values()) > 0, first
    assert all(later.get(p, 0) >= first.get(p, 0) for p in range(partitions)), (first, later)
    assert sum(later.values()) > sum(first.values()), (first, later)

    uncommitted = {"isolation.level": "read_uncommitted"}
    updates = list(read_to_end(kafka, kafka.model_topic, None, timeout_s=30, overrides=uncommitted))
    log = list(read_to_end(kafka, kafka.log_topic, None, timeout_s=30, overrides=uncommitted))
    stats = member.stats
    assert len(updates) == stats.updates > 0  # nothing aborted, nothing published twice
    assert len(log) == sum(stats.outcomes.values()) > 0
    # A commit marker takes an offset: records of more than one transaction leave gaps between them.
    by_partition: dict[int, list[int]] = {}
    for msg in log:
        partition, offset = msg.partition(), msg.offset()
        assert partition is not None and offset is not None
        by_partition.setdefault(partition, []).append(offset)
    gaps = sum(b - a - 1 for offs in by_partition.values() for a, b in itertools.pairwise(offs))
    assert gaps > 0, by_partition

    summary = ok_audit(kafka)
    assert summary["records"] == sent
    assert summary["updates"] == stats.updates


def test_backpressure_with_a_tiny_backlog_bound_pauses_resumes_and_processes_everything(
    world: World, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """max_backlog=1, resume_backlog=0: nearly every batch with outputs pauses consumption until the
    producer confirmed them. The member must still process everything, in order, and lose nothing."""
    partitions = 3
    kafka = kafka_topics(kafka_bootstrap, partitions=partitions)
    sent = replay_file(live_slice(world, tmp_path, 1200), kafka).sent
    options = ServiceOptions(consumer_overrides=FAST_GROUP, stats_interval_ms=1000, max_backlog=1, resume_backlog=0)
    # Small batches: several between two periodic commits (1 s), whose flush would empty the backlog.
    # Each pause costs ~1 s on the local broker (records flow again ~0.8 s after resume_all), hence few records.
    service = make_service(world, kafka, "bp", options=options, batch_size=100)
    calls: Counter[str] = Counter()
    source = service.source
    pause_all, resume_all, poll_batch = source.pause_all, source.resume_all, source.poll_batch

    def counting_pause() -> None:
        calls["pause"] += 1
        pause_all()

    def counting_resume() -> None:
        calls["resume"] += 1
        resume_all()

    def watched_poll(max_records: int, timeout_s: float) -> list[Record]:
        paused = source.paused
        out = poll_batch(max_records, timeout_s)
        if paused:
            calls["records_while_paused"] += len(out)
        return out

    source.pause_all, source.resume_all, source.poll_batch = counting_pause, counting_resume, watched_poll  # type: ignore[method-assign]
    member = run_member(service, "bp")
    try:
        ends = partition_ends(kafka)
        wait_for(lambda: caught_up([member], kafka, ends), 90, "the member to reach the end")
    finally:
        member.stop()
    print(f"backpressure: {dict(calls)}")
    assert calls["pause"] > 0, calls
    assert calls["resume"] >= calls["pause"] - 1, calls  # every pause but the last was lifted
    assert calls["records_while_paused"] == 0, calls
    assert ok_audit(kafka)["records"] == sent
