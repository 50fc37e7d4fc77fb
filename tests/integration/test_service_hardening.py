"""The Kafka service under sustained faults (issue #6, parts 4 and 5): publish failures while the
consumer keeps going, SIGTERM while a long adaptation runs, a loop of kill -9 at random points, and
adaptation slower than its input.

Every test ends with the audit (stream_adapt.audit): from the topics alone, no valid event is lost and
none is applied twice, and no entity's version repeats or goes back.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer
from confluent_kafka import TopicPartition as KafkaTopicPartition
from kafka_helpers import pump, tansu_behind_relay
from prometheus_client.parser import text_string_to_metric_families
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
    stop_process,
    tail,
    wait_for,
)

from stream_adapt.config import KafkaConfig
from stream_adapt.faults import KILL_POINTS, kill_plan
from stream_adapt.io.admin import client_config
from stream_adapt.io.broker import free_port
from stream_adapt.io.changelog import read_to_end
from stream_adapt.metrics import Observability
from stream_adapt.replay import replay_file
from stream_adapt.service import ServiceOptions
from stream_adapt.synth import synthetic_stream

pytestmark = pytest.mark.timeout(180)

#: SIGTERM to exit of an idle or fast member (test_service_faults.py measured 0.6-0.7 s), with margin.
GRACEFUL_EXIT_S = 5.0


# ---- a relay that cuts chosen clients only ---------------------------------------------------------
class ClientCut:
    """A TCP relay in front of a broker that drops and refuses the connections of chosen clients only.

    Every Kafka connection opens with a request whose header names the client (`client.id`); the relay
    reads that first request, then relays or refuses. So a test can take the member's *producer* off the
    broker while its consumer keeps fetching and committing (the case where committing past undelivered
    outputs would be possible, and must not happen), and a side reader keeps reaching the broker too.
    `CuttableLink` (kafka_helpers) cuts everyone, which cannot tell "did not commit" from "could not".
    """

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._blocked: tuple[str, ...] = ()
        self._conns: list[tuple[str, socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self.refused = 0
        threading.Thread(target=self._accept, name="client-cut", daemon=True).start()

    def block(self, *client_id_prefixes: str) -> None:
        """Drop the open connections of clients whose id starts with a prefix, and refuse new ones."""
        with self._lock:
            self._blocked = client_id_prefixes
            keep = []
            for client_id, a, b in self._conns:
                if client_id.startswith(client_id_prefixes):
                    for s in (a, b):
                        with contextlib.suppress(OSError):
                            s.shutdown(socket.SHUT_RDWR)  # wakes a pump blocked in recv()
                        s.close()
                else:
                    keep.append((client_id, a, b))
            self._conns = keep

    def unblock(self) -> None:
        with self._lock:
            self._blocked = ()

    def close(self) -> None:
        self.block("")
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._open, args=(client,), daemon=True).start()

    def _open(self, client: socket.socket) -> None:
        try:
            client.settimeout(10)
            first = _read_request(client)
            client_id = _client_id(first)
            with self._lock:
                if self._blocked and client_id.startswith(self._blocked):
                    self.refused += 1
                    client.close()
                    return
                upstream = socket.create_connection(self._target, timeout=2)
                upstream.settimeout(None)
                client.settimeout(None)
                upstream.sendall(first)
                self._conns.append((client_id, client, upstream))
        except OSError:
            client.close()
            return
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=pump, args=(a, b), daemon=True).start()


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise OSError("closed before a whole request")
        data += chunk
    return data


def _read_request(sock: socket.socket) -> bytes:
    size = _read_exact(sock, 4)
    return size + _read_exact(sock, struct.unpack(">i", size)[0])


def _client_id(request: bytes) -> str:
    """The client id in a request header (v1/v2: api key, version, correlation id, int16-sized string)."""
    (length,) = struct.unpack(">h", request[12:14])
    return "" if length < 0 else request[14 : 14 + length].decode(errors="replace")


@pytest.fixture
def broker_behind_client_cut(tmp_path: Path) -> Iterator[tuple[str, ClientCut]]:
    """A broker of its own whose clients all go through a `ClientCut`: (bootstrap, relay)."""
    inner = free_port()
    relay = ClientCut(inner)
    try:
        with tansu_behind_relay(inner, relay.port, tmp_path / "tansu.log") as bootstrap:
            yield bootstrap, relay
    finally:
        relay.close()


def _committed(kafka: KafkaConfig, partitions: int) -> dict[int, int]:
    """The group's committed offsets, read by a client of its own (`side-reader`, never blocked)."""
    consumer = Consumer(
        client_config(kafka, **{"group.id": kafka.group, "enable.auto.commit": False, "client.id": "side-reader"})
    )
    try:
        tps = consumer.committed([KafkaTopicPartition(kafka.topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: tp.offset for tp in tps if tp.offset >= 0}
    finally:
        consumer.close()


def _scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]] | None:
    """Every sample of a Prometheus exposition by sample name, or None while nothing answers there."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


def _total(samples: dict[str, list[tuple[dict[str, str], float]]] | None, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels` (0 when absent or unreachable)."""
    if samples is None:
        return 0.0
    return sum(v for ls, v in samples.get(name, []) if labels.items() <= ls.items())


def _sample(url: str, name: str, labels: dict[str, str]) -> float:
    return _total(_scrape(url), name, **labels)


def test_publish_failures_are_counted_never_committed_past_and_delivered_after_a_restart(
    world: World, broker_behind_client_cut: tuple[str, ClientCut], tmp_path: Path
) -> None:
    """The member's producer loses the broker while its consumer keeps reading and committing.

    Its outputs time out (`message.timeout.ms` 3 s) and are resent, over and over; the failures show in
    the sink's counters and in `stream_adapt_publish_failures_total{reason="timed_out"}`. The group's
    committed offsets, read by a client of its own while the producer is cut off, stay where they were
    although the member read and processed everything after them (its safe offsets moved on).

    When the producer reaches the broker again, Tansu answers PRODUCER_FENCED to every produce
    (librdkafka bumped the idempotent producer's epoch after the timeouts; KAFKA_LOCAL.md): this
    producer can deliver nothing more, so the member must stop with that error, not resend forever
    (it did before: alive, committing nothing, holding its partitions). A restarted member gets a new
    producer id, re-reads from the committed offsets and delivers everything: the audit passes. On
    Apache Kafka the epoch bump is accepted and the same member delivers the resent outputs itself.
    """
    bootstrap, relay = broker_behind_client_cut
    partitions = 2
    kafka = kafka_topics(bootstrap, partitions=partitions)
    sent = replay_file(live_slice(world, tmp_path, 1500), kafka).sent
    options = ServiceOptions(
        consumer_overrides=FAST_GROUP,
        stats_interval_ms=1000,
        producer_overrides={"client.id": "member-producer", "message.timeout.ms": 3000},
    )
    service = make_service(world, kafka, "pub", options=options)
    obs = Observability(topic=kafka.topic, host="127.0.0.1", port=0)
    obs.watch(service)
    member = run_member(service, "pub")
    try:
        ends = partition_ends(kafka)
        wait_for(lambda: caught_up([member], kafka, ends) and service.sink.backlog == 0, 60, "the member to catch up")
        # Idle, it commits every second: wait until the group holds what it would commit now.
        at_cut: dict[int, int] = {}
        wait_for(lambda: _poll_committed(kafka, partitions, at_cut) == _safe(member), 30, "the idle member's commit")

        relay.block("member-producer")
        sent += replay_file(live_slice(world, tmp_path, 1500, start=1500), kafka).sent
        ends = partition_ends(kafka)
        wait_for(lambda: caught_up([member], kafka, ends), 60, "the member to read the records after the cut")
        timed_out = {"output": "model", "reason": "timed_out"}
        wait_for(
            lambda: _sample(obs.url, "stream_adapt_publish_failures_total", timed_out) > 0,
            30,
            "timed-out deliveries in the member's metrics",
        )
        # Resent, timed out again (3 s each time), never committed: several commit rounds pass here.
        failed_once = sum(service.sink.failures.values())
        wait_for(lambda: sum(service.sink.failures.values()) > 2 * failed_once, 30, "resent outputs to time out again")
        during = _committed(kafka, partitions)
        safe_now = _safe(member)
        metrics = {
            labels["output"]: _sample(obs.url, "stream_adapt_publish_failures_total", labels)
            for labels in ({"output": o, "reason": "timed_out"} for o in ("model", "log"))
        }
        backlog = _sample(obs.url, "stream_adapt_producer_backlog_messages", {})
        print(f"cut at {at_cut}; during the cut: committed {during}, safe {safe_now}; failures {metrics}")
        assert during == at_cut, (at_cut, during)
        assert any(safe_now[p] > at_cut[p] for p in at_cut), "nothing new to commit: the check could not fail"
        assert metrics["model"] > 0 and metrics["log"] > 0 and backlog > 0, (metrics, backlog)
        assert set(service.sink.failures) <= {(t, "msg_timed_out") for t in _outputs(kafka)}, service.sink.failures
        assert member.thread.is_alive() and not member.errors

        relay.unblock()
        member.thread.join(30)
        assert not member.thread.is_alive(), "the member kept resending through a fenced producer"
    finally:
        if member.thread.is_alive():
            service.stop()
            member.thread.join(30)
        obs.close()
    assert member.errors and "PRODUCER_FENCED" in str(member.errors[0]), member.errors
    # The failure itself, not a second report of it from leaving the group, and the producer closed.
    assert member.errors[0].__context__ is None, member.errors[0].__context__
    assert service.sink._closed
    assert _committed(kafka, partitions) == at_cut  # not even at shutdown

    restarted = start_member(world, kafka, "restarted")
    wait_for(lambda: caught_up([restarted], kafka, ends), 60, "the restarted member to reach the end")
    restarted.stop()
    assert not restarted.service.sink.failures and restarted.stats.updates > 0
    assert ok_audit(kafka)["records"] == sent


def _outputs(kafka: KafkaConfig) -> tuple[str, str, str]:
    return kafka.model_topic, kafka.log_topic, kafka.dead_letter_topic


def _safe(member: Member) -> dict[int, int]:
    """What the member commits next: per input partition, the offset before its oldest open window.
    (Read from the test's thread while the member is idle or its loop only resends: nothing changes it.)"""
    runner = member.service.runner
    return {p: o for (_, p), o in runner.pipeline.safe_offsets(runner.pending).items()}


def _poll_committed(kafka: KafkaConfig, partitions: int, into: dict[int, int]) -> dict[int, int]:
    """The group's committed offsets now, also left in `into` (for a condition that must keep them)."""
    into.clear()
    into.update(_committed(kafka, partitions))
    return into


# ---- slow adaptation -------------------------------------------------------------------------------
#: Settings that make adaptation the slow part on purpose: 200 gradient steps (the most allowed) on
#: windows of 2 shots, so a user's window closes every other event and a batch is adapted in many
#: rounds. Measured on 2 shared cores with 150 synthetic users: ~900 events/s (default settings:
#: ~18,000/s), a 3,000-record batch ~3 s, of which ~98% adapting.
SLOW_ADAPTATION = (
    "--steps", "200", "--shots", "2", "--query-shots", "1", "--set", "pipeline.window.min_shots=2",
    "--set", 'metrics_host="127.0.0.1"',
)  # fmt: skip


def _synthetic(path: Path, n: int, *, seed: int, users: int = 150, pad_bytes: int = 0) -> Path:
    """`n` valid rating events of `users` users (the world's user and item ids), one JSON per line.

    `pad_bytes` adds a field the service ignores, to make records as large as real ones with context:
    then a backlog held in memory would show plainly in the resident set size. The padding is random
    (base64), so it does not compress: librdkafka's fetch limits count compressed bytes, and a padding of
    one repeated letter let one fetch bring the whole backlog into memory."""
    rng = random.Random(seed)
    with path.open("wb") as out:
        for line in synthetic_stream(n, n_users=users, n_items=200, seed=seed):
            if pad_bytes:
                padding = base64.b64encode(rng.randbytes(pad_bytes * 3 // 4))
                line = line[:-1] + b',"padding":"' + padding + b'"}'
            out.write(line + b"\n")
    return path


def _rss_mb(pid: int) -> float:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def test_sigterm_during_a_long_adaptation_finishes_the_batch_commits_and_exits_0_within_the_bound(
    world: World, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """SIGTERM reaches a member process in the middle of a batch whose adaptation takes seconds.

    The stop is graceful, not abrupt: the batch in flight is finished (its records show in the exit
    summary, not only in the offsets of a later run), its outputs flushed and offsets committed, then the
    member leaves the group and exits 0. The bound is one batch plus GRACEFUL_EXIT_S: a batch is never cut
    in the middle (the adaptation is one vectorised computation). Measured: batches of ~3 s, SIGTERM 1 s
    into one, exit 2.5-3 s later.
    """
    partitions = 2
    kafka = kafka_topics(kafka_bootstrap, partitions=partitions)
    sent = replay_file(_synthetic(tmp_path / "input.jsonl", 7500, seed=11), kafka).sent
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    log_path, summary_path = tmp_path / "member.log", tmp_path / "summary.json"
    args = [*SLOW_ADAPTATION, "--batch-size", "1500", "--metrics-port", str(port), "--summary-json", str(summary_path)]
    proc = member_process(world, kafka, log_path, args=args)
    try:
        wait_for(
            lambda: _total(_scrape(url), "stream_adapt_batch_duration_seconds_count") >= 1 or proc.poll() is not None,
            90,
            "the member's first batch",
        )
        assert proc.poll() is None, tail(log_path)
        before = _committed(kafka, partitions)
        # One batch just finished and the next (records are waiting) is being adapted: 1 s into it.
        started = time.monotonic()
        wait_for(lambda: time.monotonic() - started > 1.0, 5, "1 s into the next batch")
        samples = _scrape(url)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        records_at_signal = _total(samples, "stream_adapt_records_consumed_total")
        batches = _total(samples, "stream_adapt_batch_duration_seconds_count")
        batch_s = _total(samples, "stream_adapt_batch_duration_seconds_sum") / batches
        adapt_share = _total(samples, "stream_adapt_adaptation_duration_seconds_sum") / (batch_s * batches)
        bound = 2 * batch_s + GRACEFUL_EXIT_S
        try:
            code = proc.wait(bound)
        except subprocess.TimeoutExpired:
            pytest.fail(f"no exit within {bound:.1f}s of SIGTERM (batches take {batch_s:.1f}s):\n{tail(log_path)}")
        exit_s = time.monotonic() - t0
    finally:
        kill_quietly(proc)
    print(f"batches of {batch_s:.2f}s ({adapt_share:.0%} adapting); SIGTERM -> exit {code} in {exit_s:.2f}s")
    assert code == 0, tail(log_path)
    assert "SIGTERM: finishing the batch" in tail(log_path, 100_000)
    assert adapt_share > 0.8, adapt_share  # so "during a batch" is "during adaptation"
    summary = json.loads(summary_path.read_text())
    assert summary["records"] > records_at_signal, (summary["records"], records_at_signal)  # the batch finished
    after = _committed(kafka, partitions)
    assert all(after.get(p, 0) >= before.get(p, 0) for p in range(partitions)), (before, after)
    assert sum(before.values()) < sum(after.values()) <= summary["records"], (before, after, summary["records"])

    ends = partition_ends(kafka)
    member = start_member(world, kafka, "restarted")
    wait_for(lambda: caught_up([member], kafka, ends), 60, "the restarted member to reach the end")
    member.stop()
    assert ok_audit(kafka)["records"] == sent


def test_adaptation_slower_than_input_leaves_the_backlog_in_kafka_memory_flat_then_catches_up(
    world: World, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Input arrives ~10x faster than the member can adapt. The loop is synchronous (poll, process,
    publish), so a slow adaptation only polls less often: the backlog stays in Kafka, the read lag grows,
    and the member's memory holds at most one batch plus librdkafka's prefetch queue, bounded by
    `queued.max.messages.kbytes` (4 MiB here; librdkafka's default is 64 MiB). Records carry 32 KiB of
    context, so a backlog held in memory would show plainly in the resident set size (the peak backlog
    is over 100 MiB). When the input stops the member catches up (lag 0) and the audit passes.
    """
    partitions = 2
    kafka = kafka_topics(kafka_bootstrap, partitions=partitions)
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    log_path = tmp_path / "member.log"
    queue_kb, batch, pad, users = 4096, 250, 32 * 1024, 90  # 90 users: many rounds per batch, ~250 events/s
    kafka_extra = {"statistics.interval.ms": "500", "queued.max.messages.kbytes": str(queue_kb)}
    args = [*SLOW_ADAPTATION, "--batch-size", str(batch), "--metrics-port", str(port)]
    proc = member_process(world, kafka, log_path, args=args, kafka_extra=kafka_extra)
    try:
        # Warm up on the same users: model, torch and every user's state in memory before the baseline.
        warm = _synthetic(tmp_path / "warm.jsonl", 1000, seed=21, users=users, pad_bytes=pad)
        sent = replay_file(warm, kafka).sent
        wait_for(
            lambda: _total(_scrape(url), "stream_adapt_records_consumed_total") >= sent or proc.poll() is not None,
            90,
            "the member to process the warm-up",
        )
        assert proc.poll() is None, tail(log_path)
        baseline = _rss_mb(proc.pid)
        n = 3000
        burst = _synthetic(tmp_path / "burst.jsonl", n, seed=22, users=users, pad_bytes=pad)
        record_mb = burst.stat().st_size / n / 2**20
        feeder = Feeder(burst, kafka, rate=2500)
        feeder.start()
        trace: list[tuple[float, float, float, float]] = []  # (s, RSS MB, metric lag, records processed)
        t0 = time.monotonic()

        def observe() -> bool:
            samples = _scrape(url)
            lag = _total(samples, "stream_adapt_consumer_lag_records", topic=kafka.topic)
            done = _total(samples, "stream_adapt_records_consumed_total")
            trace.append((time.monotonic() - t0, _rss_mb(proc.pid), lag, done))
            return not feeder.is_alive()

        wait_for(observe, 30, "the burst to be produced")
        fed_s = trace[-1][0]
        sent += feeder.sent(10)
        wait_for(lambda: observe() and trace[-1][3] >= sent and trace[-1][2] == 0, 80, "the member to catch up")
    finally:
        rc = proc.poll()
        stop_code = stop_process(proc) if rc is None else rc
    assert rc is None, tail(log_path)
    assert stop_code == 0, tail(log_path)
    peak_lag = max(t[2] for t in trace)
    peak_rss = max(t[1] for t in trace)
    growth = peak_rss - baseline
    held_mb = peak_lag * record_mb
    bound_mb = queue_kb / 1024 + 3 * batch * record_mb + 10  # prefetch + a batch (bytes, text, JSON) + slack
    print(
        f"burst of {n} x {record_mb * 1024:.0f} KiB in {fed_s:.1f}s; peak lag {peak_lag:.0f} records (~{held_mb:.0f} "
        f"MiB left in Kafka); RSS {baseline:.0f} MB -> peak {peak_rss:.0f} MB (+{growth:.1f}, bound {bound_mb:.0f}); "
        f"caught up {trace[-1][0] - fed_s:.1f}s after the input stopped"
    )
    every = max(1, len(trace) // 25)
    print("trace (s, RSS MB, lag, processed):", [tuple(round(x, 1) for x in t) for t in trace[::every]])
    # The member fell behind: the lag grew while the input came ...
    assert peak_lag > n / 2, peak_lag
    assert trace[0][2] < n / 10, trace[0]
    # ... and memory held far less than the backlog: at most the prefetch bound and one batch.
    assert growth < bound_mb < held_mb / 2, (growth, bound_mb, held_mb)
    assert ok_audit(kafka)["records"] == sent


# ---- kill -9 in a loop -----------------------------------------------------------------------------


def test_kill_9_at_random_points_in_a_loop_loses_nothing_and_no_version_repeats(
    world: World, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A member process is killed with SIGKILL at a seeded random point, restarted, killed again, N times,
    while input keeps arriving; a last member then runs to the end. The audit passes and every entity's
    published versions are exactly 1, 2, 3, ... in topic order: no repeat, no gap, no regression, however
    the kills fell between processing, publishing and committing. (benchmarks/kill_loop.py runs 20.)

    Each restart waits for the dead member's session (6 s) to expire before the group assigns its
    partitions again, so N is small here: 4 kills take ~60 s.
    """
    partitions = 2
    kafka = kafka_topics(kafka_bootstrap, partitions=partitions)
    plan = kill_plan(seed=3, n=4)
    assert {p for p, _ in plan} == set(KILL_POINTS), plan  # this seed visits every kind of kill point once
    feeder = Feeder(_synthetic(tmp_path / "input.jsonl", 20_000, seed=31), kafka, rate=200)
    feeder.start()
    survived: list[str] = []
    try:
        for i, (point, arg) in enumerate(plan):
            log_path = tmp_path / f"member-{i}.log"
            env = {"STREAM_ADAPT_FAILPOINTS": f"{point}={arg:g}"} if point != "random_time" else {}
            proc = member_process(world, kafka, log_path, env=env)
            try:
                if point == "random_time":
                    wait_for(
                        lambda: b"assigned" in log_path.read_bytes() or proc.poll() is not None,  # noqa: B023
                        60,
                        "the member to be assigned its partitions",
                    )
                    at = time.monotonic() + float(arg)
                    wait_for(lambda: time.monotonic() >= at or proc.poll() is not None, 10, "the kill time")  # noqa: B023
                    assert proc.poll() is None, tail(log_path)
                    proc.kill()
                code = proc.wait(60)
            finally:
                kill_quietly(proc)
            assert code == -signal.SIGKILL, f"kill {i} at {point}={arg}: exit {code}\n{tail(log_path)}"
            survived.append(f"{point}={arg:g}")
    finally:
        feeder.stop()
    print(f"kill points survived: {len(survived)}: {', '.join(survived)}")

    ends = partition_ends(kafka)
    member = start_member(world, kafka, "last")
    wait_for(lambda: caught_up([member], kafka, ends), 60, "the last member to reach the end")
    member.stop()
    summary = ok_audit(kafka)
    assert summary["records"] == sum(ends.values()) and summary["updates"] > 0, summary
    versions = _versions_by_entity(kafka)
    gaps = {e: v for e, v in versions.items() if v != list(range(1, len(v) + 1))}
    assert not gaps, gaps


def _versions_by_entity(kafka: KafkaConfig) -> dict[str, list[int]]:
    """Each entity's published versions, in topic order (the global adapter left out)."""
    out: dict[str, list[int]] = {}
    for msg in read_to_end(kafka, kafka.model_topic, None, timeout_s=30):
        key = (msg.key() or b"").decode()
        if key != "__global__":
            version = dict(msg.headers() or [])["stream-adapt-version"]
            assert isinstance(version, bytes), msg.headers()
            out.setdefault(key, []).append(int(version))
    return out
