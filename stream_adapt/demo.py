"""`stream-adapt demo` (what `make demo` runs): the whole service on an embedded default.

Kafka mode (default): start the embedded broker, create the topics, generate a synthetic world with cold
users and drift, pretrain on its history, run the service as a consumer-group member, replay the live
stream into the input topic (keyed by user, paced over `seconds`), wait until the service has processed
every record, then read the model topic the way a serving process does and print the summary.
Offline mode: the same learning through a file source and a directory sink, no broker.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from stream_adapt.errors import StreamAdaptError

if TYPE_CHECKING:
    from stream_adapt.serving import ModelSubscriber


def _step(n: int, total: int, text: str) -> None:
    print(f"[{n}/{total}] {text}", flush=True)


def _prepare(out: Path, seed: int, n: int, total: int) -> tuple[Path, Path]:
    from stream_adapt import commands

    data, model_dir = out / "data", out / "model"
    _step(n, total, f"synthetic feedback with cold users, preference drift and a few invalid records -> {data}/")
    from stream_adapt.synth import DEFAULT_CONFIG, generate

    world = generate(data, DEFAULT_CONFIG, seed=seed)
    print(
        f"  {world.n_users} users ({world.n_cold_users} cold), {world.n_items} items; history {world.history_events} "
        f"events, live {world.live_lines} ({world.n_drifted_users} users change taste half-way, "
        f"{world.n_invalid} invalid records)"
    )
    _step(n + 1, total, f"pretraining the base recommender on {data}/history.jsonl -> {model_dir}/")
    commands.pretrain(
        argparse.Namespace(
            events=data / "history.jsonl", format="jsonl", out=model_dir, entity="user", epochs=12, dim=16,
            hidden=64, lora_rank=0, seed=seed,
        )
    )  # fmt: skip
    return data, model_dir


def run_demo(
    out: Path,
    *,
    seed: int = 0,
    seconds: float = 20.0,
    partitions: int = 4,
    offline: bool = False,
    metrics_port: int | None = 0,
) -> int:
    """`metrics_port`: serve /metrics, /healthz and /readyz on loopback while the service runs (0: any
    free port, None: not at all)."""
    t0 = time.perf_counter()
    if offline:
        return _offline(out, seed, t0)
    return _kafka(out, seed, seconds, partitions, t0, metrics_port)


def _offline(out: Path, seed: int, t0: float) -> int:
    from stream_adapt import commands
    from stream_adapt.cli import build_parser

    data, model_dir = _prepare(out, seed, 1, 3)
    _step(3, 3, f"streaming {data}/live.jsonl through the pipeline (file source, directory sink)")
    args = build_parser().parse_args(
        [
            "run", "--model", str(model_dir), "--source", f"file:{data}/live.jsonl", "--sink",
            f"dir:{out}/results", "--summary-json", str(out / "summary.json"),
        ]
    )  # fmt: skip
    code = commands.run(args)
    print(f"demo finished in {time.perf_counter() - t0:.0f}s; summary JSON in {out}/summary.json")
    return code


def _kafka(out: Path, seed: int, seconds: float, partitions: int, t0: float, metrics_port: int | None) -> int:
    from stream_adapt import runtime
    from stream_adapt.config import KafkaConfig, Settings
    from stream_adapt.io.admin import default_topic_specs, ensure_topics
    from stream_adapt.io.broker import EmbeddedBroker
    from stream_adapt.learning.models import load_model
    from stream_adapt.learning.stats import format_summary
    from stream_adapt.metrics import Observability
    from stream_adapt.progress import ProgressPrinter
    from stream_adapt.replay import replay_file
    from stream_adapt.service import KafkaService, ServiceOptions
    from stream_adapt.serving import ModelSubscriber

    total = 6
    _step(1, total, "starting the embedded Kafka-protocol broker (Tansu, memory storage)")
    with EmbeddedBroker() as broker:
        kafka = KafkaConfig.prefixed("demo", broker.bootstrap_servers, group="stream-adapt-demo")
        created = ensure_topics(kafka, default_topic_specs(kafka, partitions, -1))
        print(f"  broker at {broker.bootstrap_servers}; topics: {', '.join(sorted(created))}")
        data, model_dir = _prepare(out, seed, 2, total)
        model = load_model(model_dir)
        runtime.tune(1)
        settings = Settings(kafka=kafka)
        # Short session timeout: the first assignment takes half of it (3 s instead of 23 s).
        group_timing = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}
        service = KafkaService(settings, model, options=ServiceOptions(consumer_overrides=group_timing))
        service.runner.observers.append(ProgressPrinter(service.runner.stats, every_s=2.0))
        observability = None
        if metrics_port is not None:
            observability = Observability(topic=kafka.topic, host="127.0.0.1", port=metrics_port)
            observability.watch(service)
            print(f"  metrics at {observability.url} (liveness /healthz, readiness /readyz)")
        failure: list[BaseException] = []

        def serve() -> None:
            try:
                service.run()
            except BaseException as exc:
                failure.append(exc)

        thread = threading.Thread(target=serve, name="stream-adapt-service", daemon=True)
        thread.start()
        _wait(lambda: bool(service.source.assignment) or bool(failure), 60, "the service to join its group")
        live = data / "live.jsonl"
        n_lines = sum(1 for _ in live.open("rb"))
        rate = n_lines / seconds if seconds > 0 else None
        pace = f"at {rate:.0f} events/s" if rate else "as fast as possible"
        _step(4, total, f"replaying {live} into {kafka.topic!r} ({n_lines} records, keyed by user, {pace})")
        try:
            report = replay_file(live, kafka, rate=rate)
            print(f"  sent {report.sent} records in {report.seconds:.1f}s")
            _step(5, total, "waiting until the service has processed every record")
            _wait(lambda: service.runner.stats.records >= report.sent or bool(failure), 120, "the service to catch up")
        finally:
            service.stop()
            thread.join(60)
            if observability is not None:
                observability.close()
        if failure:
            raise StreamAdaptError(f"the service failed: {failure[0]}") from failure[0]
        stats = service.runner.stats
        summary = stats.summary(*service.handed_over)  # open windows at the end: handed over at shutdown
        _step(6, total, f"serving: reading {kafka.model_topic!r} as a serving process does (ModelSubscriber)")
        with ModelSubscriber(model, kafka, kafka.model_topic) as subscriber:
            subscriber.wait_until_caught_up(60)
            served = subscriber.stats
            example = _example(subscriber, data)
        print(
            f"  {served.records} records read, {served.entities} users with an adapter, global version "
            f"{served.global_version}, rejected {dict(served.rejected) or 'none'}"
        )
        if example:
            print(f"  {example}")
        print()
        print(format_summary(summary))
        serving = {"records": served.records, "entities": served.entities, "rejected": dict(served.rejected)}
        (out / "summary.json").write_text(json.dumps({"service": summary, "serving": serving}, indent=2))
        print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s; summary JSON in {out}/summary.json")
    return 0


def _example(sub: ModelSubscriber, data: Path) -> str | None:
    """One cold user's predictions with no adaptation vs with its served adapter, against the truth."""
    from stream_adapt.synth import load_truth

    truth = load_truth(data / "truth.npz")
    for user in truth.cold_users.tolist():
        version = sub.version(user)
        if version:
            items = truth.item_ids[:3].tolist()
            served = sub.predict(user, items)
            expected = truth.expected_rating([user] * len(items), items, [truth.drift_time] * len(items))
            cold = sub.predict("a user never seen", items)
            show = ", ".join(
                f"{i}: {c:.2f} -> {s:.2f} (true {t:.2f})"
                for i, c, s, t in zip(items, cold, served, expected, strict=True)
            )
            return f"cold user {user} (v{version}): no adaptation -> served adapter: {show}"
    return None


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise StreamAdaptError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.2)  # a progress loop for a person watching, not a test waiting on a condition
