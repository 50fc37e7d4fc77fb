"""Helpers for tests that run the Kafka service: a tiny pretrained world, topics, in-process members and
member processes that can be killed with SIGKILL."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka_helpers import unique_name

from stream_adapt.audit import audit
from stream_adapt.config import KafkaConfig, Settings
from stream_adapt.io.admin import default_topic_specs, ensure_topics
from stream_adapt.io.changelog import read_to_end
from stream_adapt.learning.models import load_model, save_model
from stream_adapt.learning.pretrain import PretrainConfig, pretrain
from stream_adapt.learning.stats import RunStats
from stream_adapt.replay import ReplayReport, replay_file
from stream_adapt.service import KafkaService, ServiceOptions
from stream_adapt.synth import DEFAULT_CONFIG, generate

#: Group timing for tests: first assignment in ~3 s instead of 23 s.
FAST_GROUP = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class World:
    """A small synthetic world with a pretrained model, shared by the service tests."""

    data: Path
    model_dir: Path

    @property
    def live(self) -> Path:
        return self.data / "live.jsonl"


def make_world(root: Path, users: int = 150, items: int = 200) -> World:
    cfg = dataclasses.replace(DEFAULT_CONFIG, n_users=users, n_items=items, live_events_mean=40.0)
    data = root / "data"
    generate(data, cfg, seed=7)
    from stream_adapt.datasets import load_events

    history, _ = load_events(data / "history.jsonl")
    model, _ = pretrain(history, PretrainConfig(epochs=4, dim=8, hidden=16))
    save_model(model, root / "model")
    return World(data, root / "model")


def first_lines(src: Path, dst: Path, n: int) -> Path:
    with src.open("rb") as f, dst.open("wb") as out:
        for i, line in enumerate(f):
            if i >= n:
                break
            out.write(line)
    return dst


def kafka_topics(bootstrap: str, partitions: int = 3) -> KafkaConfig:
    """A KafkaConfig naming fresh topics (created) and a fresh group."""
    tag = unique_name("svc")
    kafka = KafkaConfig.prefixed(tag, bootstrap)
    ensure_topics(bootstrap, default_topic_specs(kafka, partitions, -1), timeout_s=20)
    return kafka


@dataclass
class Member:
    """A service running in a thread of the test process (so a test can wait on its exact progress)."""

    service: KafkaService
    thread: threading.Thread
    errors: list[BaseException] = field(default_factory=list)

    @property
    def stats(self) -> RunStats:
        return self.service.runner.stats

    def stop(self, timeout_s: float = 60.0) -> None:
        self.service.stop()
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "member did not stop in time"
        if self.errors:
            raise self.errors[0]


def make_service(
    world: World,
    kafka: KafkaConfig,
    name: str,
    *,
    options: ServiceOptions | None = None,
    batch_size: int = 500,
    **pipeline: Any,
) -> KafkaService:
    """A service for an in-process member (fast group timing unless `options` say otherwise), not started."""
    model = load_model(world.model_dir)
    settings = Settings(kafka=kafka, pipeline=pipeline or {}, batch_size=batch_size, poll_timeout_s=0.2)
    options = options or ServiceOptions(consumer_overrides=FAST_GROUP, stats_interval_ms=1000)
    return KafkaService(settings, model, options=options, name=name)


def start_member(world: World, kafka: KafkaConfig, name: str, **pipeline: Any) -> Member:
    return run_member(make_service(world, kafka, name, **pipeline), name)


def run_member(service: KafkaService, name: str) -> Member:
    """Run a built service in a thread of the test process."""
    member = Member(service, threading.Thread(target=lambda: None))

    def run() -> None:
        try:
            service.run()
        except BaseException as exc:
            member.errors.append(exc)

    member.thread = threading.Thread(target=run, name=f"member-{name}", daemon=True)
    member.thread.start()
    return member


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.1)


def member_process(
    world: World,
    kafka: KafkaConfig,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    *,
    args: Sequence[str] = (),
    kafka_extra: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """`stream-adapt run --source kafka --sink kafka` as a child process (kill -9 needs a process).

    `args` are appended to the command line (a later `--batch-size` wins); `kafka_extra` adds librdkafka
    keys to the fast group timing (one `kafka.extra` setting holds both)."""
    extra = json.dumps({"session.timeout.ms": "6000", "heartbeat.interval.ms": "500", **(kafka_extra or {})})
    cmd = [
        sys.executable, "-m", "stream_adapt", "run", "--model", str(world.model_dir), "--source", "kafka",
        "--sink", "kafka", "--quiet", "--bootstrap-servers", kafka.bootstrap_servers, "--topic", kafka.topic,
        "--model-topic", kafka.model_topic, "--group", kafka.group, "--batch-size", "500",
        "--set", f'kafka.log_topic="{kafka.log_topic}"',
        "--set", f'kafka.dead_letter_topic="{kafka.dead_letter_topic}"',
        "--set", f"kafka.extra={extra}", *args,
    ]  # fmt: skip
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("ab") as log:
        return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT)


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout_s)


def partition_ends(kafka: KafkaConfig) -> dict[int, int]:
    """Next offset after the last record, per input partition (read, not asked: see KAFKA_LOCAL.md)."""
    ends: dict[int, int] = {}
    for msg in read_to_end(kafka, kafka.topic, None, timeout_s=30):
        partition, offset = msg.partition(), msg.offset()
        assert partition is not None and offset is not None  # a consumed record has both
        ends[partition] = max(ends.get(partition, 0), offset + 1)
    return ends


def logged_count(kafka: KafkaConfig) -> int:
    """Records in the adaptation log (outcomes published so far)."""
    return sum(1 for _ in read_to_end(kafka, kafka.log_topic, None, timeout_s=30))


def caught_up(members: list[Member], kafka: KafkaConfig, ends: dict[int, int]) -> bool:
    """Every partition processed to its end by the member that owns it now."""
    done: dict[int, int] = {}
    for m in members:
        owned = {p for _, p in m.service.source.assignment}
        for (topic, p), nxt in list(m.service.runner.pending.items()):
            if topic == kafka.topic and p in owned:
                done[p] = max(done.get(p, 0), nxt)
    return all(end == 0 or done.get(p, 0) >= end for p, end in ends.items())


def ok_audit(kafka: KafkaConfig) -> dict[str, Any]:
    """Run the audit and fail the test unless it passes; returns its summary."""
    report = audit(kafka, timeout_s=60)
    summary = report.as_dict()
    assert report.ok, summary
    return summary


def live_slice(world: World, directory: Path, n: int, start: int = 0) -> Path:
    """Lines `start` to `start + n` of the world's live stream, as a file of their own."""
    if not start:
        return first_lines(world.live, directory / f"live-{n}.jsonl", n)
    lines = world.live.read_bytes().splitlines(keepends=True)[start : start + n]
    path = directory / f"live-{start}-{n}.jsonl"
    path.write_bytes(b"".join(lines))
    return path


def tail(path: Path, n: int = 3000) -> str:
    """The end of a member's log, for an assertion message."""
    return path.read_text(errors="replace")[-n:]


def kill_quietly(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a member process if it still runs (test cleanup)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


class FeedStopped(Exception):
    """Raised from the replay's progress callback to end a feed early (it flushes what it sent)."""


class Feeder(threading.Thread):
    """Replays a file at a fixed rate in the background (input arriving while a member works)."""

    def __init__(self, path: Path, kafka: KafkaConfig, rate: float) -> None:
        super().__init__(name="feeder", daemon=True)
        self.path, self.kafka, self.rate = path, kafka, rate
        self.report: ReplayReport | None = None
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        def progress(_: ReplayReport) -> None:
            if self._halt.is_set():
                raise FeedStopped

        try:
            self.report = replay_file(self.path, self.kafka, rate=self.rate, progress=progress, progress_interval_s=0.2)
        except FeedStopped:
            pass
        except BaseException as exc:
            self.error = exc

    def sent(self, timeout_s: float) -> int:
        self.join(timeout_s)
        assert not self.is_alive(), "the replay did not finish"
        if self.error is not None:
            raise self.error
        assert self.report is not None
        return self.report.sent

    def stop(self, timeout_s: float = 30.0) -> None:
        """End the feed now; everything it produced is confirmed by the broker when this returns."""
        self._halt.set()
        self.join(timeout_s)
        assert not self.is_alive(), "the replay did not stop"
        if self.error is not None:
            raise self.error
