"""The service through a Kafka broker vs the same pipeline offline, plus update latency. One run:

1. produce >= 200k synthetic events into the input topic of the local broker (or KAFKA_BOOTSTRAP_SERVERS);
2. raw_events_per_s: a plain consumer reading that topic and decoding every record (the I/O limit);
3. offline_events_per_s: the same events from a file through FileSource -> Pipeline -> DirSink;
4. events_per_s: the Kafka service (a consumer-group member) on that topic, adaptation on, from its
   first record to its last; ratio = events_per_s / offline_events_per_s;
5. latency: a fresh stream paced at --rate events/s (default 5,000) through a running service; for every
   published update, window closed -> update delivered (latency_p50_ms, latency_p99_ms) and the window's
   last event time -> delivered (freshness_p50_ms, freshness_p99_ms: includes produce and fetch).

    python benchmarks/bench_e2e.py --json bench-e2e.json [--users 3500] [--rate 5000] [--seconds 10]
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from _common import emit, parser
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from stream_adapt import runtime
from stream_adapt.config import KafkaConfig, PipelineConfig, Settings
from stream_adapt.datasets import load_events
from stream_adapt.events import ModelUpdate, Position, decode
from stream_adapt.io.admin import client_config, default_topic_specs, ensure_topics
from stream_adapt.io.directory import DirSink
from stream_adapt.io.files import FileSource
from stream_adapt.learning.pipeline import Pipeline
from stream_adapt.learning.pretrain import PretrainConfig, pretrain
from stream_adapt.replay import replay_file
from stream_adapt.runner import Runner, RunOptions
from stream_adapt.service import KafkaService, ServiceOptions
from stream_adapt.synth import DEFAULT_CONFIG, generate, synthetic_stream

GROUP_TIMING = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}


def topics(bootstrap: str, tag: str, partitions: int) -> KafkaConfig:
    kafka = KafkaConfig.prefixed(f"bench-{tag}", bootstrap)
    ensure_topics(kafka, default_topic_specs(kafka, partitions, -1), timeout_s=30)
    return kafka


def raw_consume(kafka: KafkaConfig, partitions: int, total: int) -> float:
    """Records/s of a bare consumer decoding every record of the topic."""
    conf = client_config(kafka, **{"group.id": f"{kafka.group}-raw", "enable.auto.commit": False})
    consumer = Consumer(conf)
    consumer.assign([TopicPartition(kafka.topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    n, started = 0, None
    try:
        while n < total:
            for msg in consumer.consume(num_messages=2000, timeout=1.0):
                if msg.error():
                    continue
                started = started or time.perf_counter()
                decode(msg.value() or b"", Position(kafka.topic, msg.partition() or 0, msg.offset() or 0))
                n += 1
        return n / (time.perf_counter() - (started or time.perf_counter()))
    finally:
        consumer.close()


def offline(live: Path, model: object, out: Path) -> float:
    source, sink = FileSource(live, "jsonl"), DirSink(out)
    runner = Runner(source, Pipeline(model, PipelineConfig()), sink, RunOptions(batch_size=2000))  # type: ignore[arg-type]
    t0 = time.perf_counter()
    stats = runner.run()
    rate = stats.records / (time.perf_counter() - t0)
    source.close()
    sink.close()
    return rate


def service_rate(kafka: KafkaConfig, model: object, total: int) -> tuple[float, dict[str, int]]:
    """Events/s of a service member from its first processed record to the last."""
    service = KafkaService(
        Settings(kafka=kafka),
        model,
        options=ServiceOptions(consumer_overrides=GROUP_TIMING),  # type: ignore[arg-type]
    )
    marks: dict[str, float] = {}

    def observe(_: object) -> None:
        marks.setdefault("first", time.perf_counter())

    service.runner.observers.append(observe)
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    while service.runner.stats.records < total:
        time.sleep(0.05)  # a benchmark's progress loop
    end = time.perf_counter()
    service.stop()
    thread.join(60)
    stats = service.runner.stats
    return total / (end - marks["first"]), {"accepted": stats.outcomes["accepted"], "updates": stats.updates}


def paced_latency(
    bootstrap: str, model: object, partitions: int, rate: float, seconds: float, users: int, work: Path
) -> dict[str, float]:
    kafka = topics(bootstrap, f"lat{int(time.time())}", partitions)
    service = KafkaService(
        Settings(kafka=kafka, poll_timeout_s=0.05),
        model,
        options=ServiceOptions(consumer_overrides=GROUP_TIMING),  # type: ignore[arg-type]
    )
    closed_to_delivered: list[float] = []
    event_to_delivered: list[float] = []

    def delivered(update: ModelUpdate, at: float) -> None:
        if update.entity_kind != "global":
            closed_to_delivered.append(at - update.created_at)
            if update.event_time_last is not None:
                event_to_delivered.append(at - update.event_time_last)

    service.sink.on_update_delivered.append(delivered)
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    while not service.source.assignment:
        time.sleep(0.05)
    n = int(rate * seconds)
    # Each event is stamped with the exact wall time it will be sent at (the replay starts on that clock
    # and keeps the pace), so event time -> delivered is end-to-end freshness: produce, fetch, adapt, publish.
    start = time.time() + 3
    lines = []
    for i, raw in enumerate(synthetic_stream(n, n_users=users, seed=3, events_per_second=rate)):
        event = json.loads(raw)
        event["timestamp"] = start + i / rate
        lines.append(json.dumps(event).encode())
    path = work / "paced.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    while time.time() < start:
        time.sleep(0.005)  # start the replay on the stream's clock
    replay_file(path, kafka, rate=rate)
    total = n
    deadline = time.monotonic() + 60
    while service.runner.stats.records < total and time.monotonic() < deadline:
        time.sleep(0.05)
    service.runner.commit_now()
    service.stop()
    thread.join(60)

    def q(xs: list[float], p: float) -> float:
        return round(1000 * statistics.quantiles(xs, n=100)[p - 1], 1) if len(xs) >= 2 else float("nan")

    return {
        "paced_events": n,
        "paced_rate": rate,
        "updates_measured": len(closed_to_delivered),
        "latency_p50_ms": q(closed_to_delivered, 50),
        "latency_p99_ms": q(closed_to_delivered, 99),
        "freshness_p50_ms": q(event_to_delivered, 50),
        "freshness_p99_ms": q(event_to_delivered, 99),
    }


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--users", type=int, default=3500, help="synthetic users (~64 live events each)")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--rate", type=float, default=5000.0, help="paced rate of the latency phase")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the latency phase")
    args = p.parse_args()

    from stream_adapt.io.broker import EmbeddedBroker

    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    broker = None if external else EmbeddedBroker().start()
    bootstrap = external or broker.bootstrap_servers  # type: ignore[union-attr]
    try:
        cfg = dataclasses.replace(DEFAULT_CONFIG, n_users=args.users, n_items=1000)
        summary = generate(work / "data", cfg, seed=0)
        live = work / "data" / "live.jsonl"
        history, _ = load_events(work / "data" / "history.jsonl")
        model, _ = pretrain(history, PretrainConfig(epochs=4))
        model.fingerprint = "sha256:bench-e2e"
        runtime.tune(1)

        kafka = topics(bootstrap, f"e2e{int(time.time())}", args.partitions)
        t0 = time.perf_counter()
        sent = replay_file(live, kafka).sent
        produce_rate = sent / (time.perf_counter() - t0)
        raw = raw_consume(kafka, args.partitions, sent)
        off = offline(live, model, work / "offline-out")
        svc, svc_stats = service_rate(kafka, model, sent)
        latency = paced_latency(bootstrap, model, args.partitions, args.rate, args.seconds, args.users, work)
        emit(
            {
                "benchmark": "bench_e2e",
                "events": sent,
                "live_lines": summary.live_lines,
                "partitions": args.partitions,
                "broker": "external" if external else "embedded Tansu",
                "produce_events_per_s": round(produce_rate),
                "raw_events_per_s": round(raw),
                "offline_events_per_s": round(off),
                "events_per_s": round(svc),
                "ratio": round(svc / off, 3),
                **latency,
                "service_run": svc_stats,
            },
            args.json,
        )
    finally:
        if broker is not None:
            broker.stop()


if __name__ == "__main__":
    main()
