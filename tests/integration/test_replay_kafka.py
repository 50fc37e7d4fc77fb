"""Replay against a real broker: per-entity order and event-time stamps, every format with malformed
lines, time windows, pacing (a one-sided bound, never an absolute time), and resume after an exception
and after SIGKILL with nothing sent twice."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, TIMESTAMP_CREATE_TIME, Consumer, Message, TopicPartition
from kafka_helpers import consumer_config, unique_name

from stream_adapt.config import KafkaConfig
from stream_adapt.io.changelog import read_to_end
from stream_adapt.replay import REPLAY_HEADER, Checkpoint, ReplayReport, TimeWindow, replay_file

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TopicFactory = Callable[..., str]
T0 = 1_600_000_000  # 2020: far from the broker's append time, as for any historical log


def event(n: int, user: int, *, value: float = 3.0, ts: float | None = None) -> dict[str, object]:
    """Event n of user `user` (event_id e<n> says which line it came from)."""
    return {
        "event_id": f"e{n}",
        "user_id": f"u{user}",
        "item_id": f"i{n % 37}",
        "event_type": "rating",
        "value": value,
        "timestamp": T0 + n if ts is None else ts,
    }


def write_jsonl(path: Path, n: int, users: int = 23, invalid_every: int = 0) -> Path:
    """n events, users interleaved; every `invalid_every`-th has a rating of 11 (parses, fails validation)."""
    lines = []
    for i in range(n):
        bad = invalid_every and i % invalid_every == invalid_every - 1
        lines.append(json.dumps(event(i, (i * 7) % users, value=11.0 if bad else 1 + i % 5)))
    path.write_text("\n".join(lines) + "\n")
    return path


def read_topic(bootstrap: str, topic: str) -> list[Message]:
    return list(read_to_end(bootstrap, topic, None, timeout_s=20))


def by_key(messages: list[Message]) -> dict[bytes | None, list[dict[str, object]]]:
    out: dict[bytes | None, list[dict[str, object]]] = defaultdict(list)
    for msg in sorted(messages, key=lambda m: (m.partition(), m.offset())):
        out[msg.key()].append(json.loads(msg.value() or b"null"))
    return out


def line_of(msg: Message) -> int:
    return int(json.loads(msg.value() or b"{}")["event_id"][1:]) + 1


def test_replay_keys_by_entity_keeps_each_entitys_order_and_stamps_event_time(
    kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    topic = topic_factory("replay", partitions=3)
    log = write_jsonl(tmp_path / "events.jsonl", 900, invalid_every=50)
    report = replay_file(log, KafkaConfig(bootstrap_servers=kafka_bootstrap), topic=topic)

    assert (report.sent, report.invalid, report.bad_lines, report.complete) == (900, 18, 0, True)
    messages = read_topic(kafka_bootstrap, topic)
    assert len(messages) == 900
    assert len({m.partition() for m in messages}) == 3
    for msg in messages:
        value = json.loads(msg.value() or b"{}")
        assert msg.key() == str(value["user_id"]).encode()
        assert msg.timestamp() == (TIMESTAMP_CREATE_TIME, int(value["timestamp"]) * 1000)
    for key, events in by_key(messages).items():
        ids = [int(str(e["event_id"])[1:]) for e in events]
        assert ids == sorted(ids), f"events of {key!r} out of file order"
        assert len({m.partition() for m in messages if m.key() == key}) == 1


def write_format(directory: Path, fmt: str) -> tuple[Path, int, list[int]]:
    """A tiny log in `fmt` with malformed lines: (path, number of good lines, bad line numbers)."""
    good = [(u, i, r, T0 + 60 * n) for n, (u, i, r) in enumerate([(1, 10, 4), (2, 11, 3), (1, 12, 5), (3, 10, 2)])]
    header: str | None
    if fmt == "movielens":
        name, header = "u.data", None
        rows = [(f"{u}\t{i}\t{r}\t{t}", True) for u, i, r, t in good]
        rows[2:2] = [("1\t13\tfour\t99", False), ("7\t8", False)]  # not a number; too few fields
    elif fmt == "ml-latest":
        name, header = "ratings.csv", "userId,movieId,rating,timestamp"
        rows = [(f"{u},{i},{r}.0,{t}", True) for u, i, r, t in good]
        rows[1:1] = [("1,2,3", False)]
    elif fmt == "recbole":
        name, header = "ml.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float"
        rows = [(f"{u}\t{i}\t{r}\t{t}", True) for u, i, r, t in good]
        rows[3:3] = [("5\t6\t\t7\t8", False)]
    elif fmt == "csv":
        name, header = "events.csv", "event_id,user_id,item_id,event_type,value,timestamp"
        rows = [(f"x{n},{u},{i},rating,{r},{t}", True) for n, (u, i, r, t) in enumerate(good)]
        rows[0:0] = [('"unterminated,1,2,rating,3,4', False)]
    else:
        raise AssertionError(fmt)
    first = 2 if header else 1  # line number of the first row
    path = directory / name
    path.write_text("\n".join(([header] if header else []) + [text for text, _ in rows]) + "\n")
    return path, len(good), [first + n for n, (_, ok) in enumerate(rows) if not ok]


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("fmt", ["movielens", "ml-latest", "recbole", "csv"])
def test_every_format_replays_its_good_lines_and_reports_malformed_ones_by_line_number(
    kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path, fmt: str, gz: bool
) -> None:
    topic = topic_factory(f"fmt-{fmt}", partitions=2)
    path, n_good, bad_lines = write_format(tmp_path, fmt)
    if gz:
        gz_path = path.with_name(path.name + ".gz")
        gz_path.write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
        path = gz_path
    report = replay_file(path, KafkaConfig(bootstrap_servers=kafka_bootstrap), topic=topic)  # format: auto

    assert report.sent == n_good and report.bad_lines == len(bad_lines) > 0
    name = path.name.removesuffix(".gz")
    assert [b.split(":")[1] for b in report.first_bad] == [str(n) for n in bad_lines]
    assert all(b.startswith(f"{name}:") for b in report.first_bad)
    messages = read_topic(kafka_bootstrap, topic)
    assert sorted((m.key(), m.timestamp()[1]) for m in messages) == sorted(
        [(b"1", T0 * 1000), (b"2", (T0 + 60) * 1000), (b"1", (T0 + 120) * 1000), (b"3", (T0 + 180) * 1000)]
    )


def test_since_until_and_skip_invalid_select_what_is_sent(
    kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    topic = topic_factory("window")
    log = write_jsonl(tmp_path / "events.jsonl", 200, invalid_every=10)
    report = replay_file(
        log,
        KafkaConfig(bootstrap_servers=kafka_bootstrap),
        topic=topic,
        window=TimeWindow(since=T0 + 50, until=T0 + 150),
        skip_invalid=True,
    )
    assert (report.sent, report.skipped_invalid, report.outside_window, report.invalid) == (90, 10, 100, 0)
    stamps = sorted(m.timestamp()[1] for m in read_topic(kafka_bootstrap, topic))
    assert len(stamps) == 90 and stamps[0] >= (T0 + 50) * 1000 and stamps[-1] < (T0 + 150) * 1000


def test_rate_is_never_exceeded(kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path) -> None:
    # One-sided on purpose: a shared machine may be slower than the pace, never faster (the schedule is
    # absolute). Achieved vs requested rates are measured by benchmarks/bench_replay.py.
    topic = topic_factory("paced")
    log = write_jsonl(tmp_path / "events.jsonl", 300)
    report = replay_file(log, KafkaConfig(bootstrap_servers=kafka_bootstrap), topic=topic, rate=600.0)
    assert report.sent == 300
    assert report.seconds >= 299 / 600 and report.waited_s > 0


def assert_each_line_once_in_order(bootstrap: str, topic: str, n: int) -> None:
    messages = read_topic(bootstrap, topic)
    lines = Counter(line_of(m) for m in messages)
    assert sorted(lines) == list(range(1, n + 1)), "a line is missing"
    assert max(lines.values()) == 1, f"sent twice: {[line for line, c in lines.items() if c > 1][:10]}"
    for key, events in by_key(messages).items():
        ids = [int(str(e["event_id"])[1:]) for e in events]
        assert ids == sorted(ids), f"events of {key!r} out of order after the resume"


def test_resume_after_an_exception_continues_where_it_stopped(
    kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    topic = topic_factory("resume", partitions=3)
    log = write_jsonl(tmp_path / "events.jsonl", 1000)
    checkpoint = tmp_path / "ck.json"
    kafka = KafkaConfig(bootstrap_servers=kafka_bootstrap)

    def stop_at_300(report: ReplayReport) -> None:
        if report.line >= 300:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        replay_file(log, kafka, topic=topic, checkpoint=checkpoint, progress=stop_at_300, progress_interval_s=0)
    state = Checkpoint.load(checkpoint)
    assert state.next_line == 301 and not state.complete  # what was produced was confirmed and recorded

    report = replay_file(log, kafka, topic=topic, checkpoint=checkpoint, resume=True)
    assert (report.resumed_at, report.sent, report.already_delivered, report.total_sent) == (301, 700, 0, 1000)
    assert report.complete and Checkpoint.load(checkpoint).complete
    assert_each_line_once_in_order(kafka_bootstrap, topic, 1000)


def wait_for_records(bootstrap: str, topic: str, partitions: int, n: int, proc: subprocess.Popen[Any]) -> None:
    """Read `topic` until it holds `n` records (the running replay `proc` must not end first)."""
    watcher = Consumer(consumer_config(bootstrap, unique_name("watch")))
    try:
        watcher.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        seen, deadline = 0, time.monotonic() + 30
        while seen < n:
            assert proc.poll() is None, "the replay ended before it could be interrupted"
            assert time.monotonic() < deadline, f"only {seen} records within 30s"
            seen += sum(m.error() is None for m in watcher.consume(num_messages=500, timeout=0.2))
    finally:
        watcher.close()


CHILD = """
import sys
from pathlib import Path
from stream_adapt.config import KafkaConfig
from stream_adapt.replay import replay_file
bootstrap, topic, log, checkpoint, interval = sys.argv[1:]
replay_file(Path(log), KafkaConfig(bootstrap_servers=bootstrap), topic=topic, rate=2500.0,
            checkpoint=Path(checkpoint), checkpoint_interval_s=float(interval))
"""


@pytest.mark.parametrize("interval_s", [0.2, 3600.0], ids=["checkpoints", "only-the-first-checkpoint"])
def test_resume_after_sigkill_sends_nothing_twice(
    kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path, interval_s: float
) -> None:
    """With a checkpoint every 0.2 s the kill lands between checkpoints; with one every hour, only the
    starting checkpoint exists and everything delivered must be found in the topic by its header."""
    topic = topic_factory("killed", partitions=3)
    n = 6000
    log = write_jsonl(tmp_path / "events.jsonl", n)
    checkpoint = tmp_path / "ck.json"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, kafka_bootstrap, topic, str(log), str(checkpoint), str(interval_s)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_records(kafka_bootstrap, topic, 3, 1500, child)  # kill it mid-way: a quarter is in the topic
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    state = Checkpoint.load(checkpoint)
    assert not state.complete and state.next_line <= n

    report = replay_file(log, KafkaConfig(bootstrap_servers=kafka_bootstrap), topic=topic, checkpoint=checkpoint,
                         resume=True)  # fmt: skip
    assert report.complete and report.total_sent == n
    if interval_s > 1000:
        assert report.resumed_at == 1 and report.already_delivered >= 1500
    else:
        assert report.resumed_at is not None and report.resumed_at > 1
    assert_each_line_once_in_order(kafka_bootstrap, topic, n)
    headers = {dict(m.headers() or [])[REPLAY_HEADER].split(b":")[0] for m in read_topic(kafka_bootstrap, topic)}
    assert headers == {state.replay_id.encode()}


def test_cli_replay_prints_progress_to_stderr_and_the_summary_to_stdout(
    kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    topic = topic_factory("cli")
    log = write_jsonl(tmp_path / "events.jsonl", 120, invalid_every=40)
    with log.open("a") as f:
        f.write("not json at all\n")
    cmd = [sys.executable, "-m", "stream_adapt", "replay", str(log), "--topic", topic, "--bootstrap-servers",
           kafka_bootstrap]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_ADAPT_")}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert first.returncode == 0, first.stderr
    assert "sent 121 records" in first.stdout
    assert "of which 4 fail validation and will be dead-lettered by the service" in first.stdout
    assert "line 121/121" in first.stderr and "\r" not in first.stderr  # not a TTY: plain lines
    assert (tmp_path / f"events.jsonl.replay-{topic}.json").is_file()

    again = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=60, env=env, check=False)
    assert again.returncode == 0 and "complete" in again.stdout and "sent 0 records" in again.stdout
    assert len(read_topic(kafka_bootstrap, topic)) == 121


def test_cli_replay_stopped_by_sigterm_checkpoints_exactly_what_it_sent(
    kafka_bootstrap: str, topic_factory: TopicFactory, tmp_path: Path
) -> None:
    topic = topic_factory("sigterm", partitions=2)
    n = 6000
    log = write_jsonl(tmp_path / "events.jsonl", n)
    cmd = [sys.executable, "-m", "stream_adapt", "replay", str(log), "--topic", topic, "--bootstrap-servers",
           kafka_bootstrap]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_ADAPT_")}
    proc = subprocess.Popen(
        [*cmd, "--rate", "2000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        wait_for_records(kafka_bootstrap, topic, 2, 1000, proc)
        proc.send_signal(signal.SIGTERM)  # what systemd or Kubernetes send: handled like Ctrl-C
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "continue it with --resume" in err, err[-2000:]
    state = Checkpoint.load(tmp_path / f"events.jsonl.replay-{topic}.json")
    assert state.next_line - 1 == len(read_topic(kafka_bootstrap, topic)) < n  # confirmed and recorded on the way out

    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=60, env=env, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed at line {state.next_line}" in resumed.stdout and "0 found in the topic after it" in resumed.stdout
    assert_each_line_once_in_order(kafka_bootstrap, topic, n)
