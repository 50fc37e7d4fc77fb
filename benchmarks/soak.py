"""Soak: one service member against a broker for a bounded time at a paced rate, as an operator runs it.

1. start the embedded broker (or use KAFKA_BOOTSTRAP_SERVERS), pretrain a small base model on a synthetic
   history, create the four topics;
2. start `stream-adapt run --source kafka --sink kafka --metrics-port P` as a child process (the process
   whose memory is measured holds nothing but the member);
3. replay synthetic feedback of `--users` users at `--rate` events/s for `--seconds` s with the production
   replayer, each event stamped with the wall time it is sent at (so event time -> update is end to end);
4. every `--sample-s` s: the member's resident set size (/proc/PID/status VmRSS), records processed,
   read lag, adapters and open windows held (from its /metrics);
5. when the input is processed: update latency quantiles from the member's histograms (window closed ->
   update acknowledged; event time -> acknowledged) and, exactly, window closed -> the update readable by
   a serving process (a reader tails the model topic here); then SIGTERM, and the audit.

Prints JSON: rss_mb_over_time, rss_growth_mb (last sample minus the first after warm-up; the second half's
growth alone too: bounded state such as the 200,000 event ids kept for deduplication fills first), events_per_s,
latency_p50_ms / latency_p99_ms (window closed -> acknowledged, from histogram buckets), the serving-side
quantiles, entities held, CPU per 1,000 events, the stop time and the audit.

    python benchmarks/soak.py [--seconds 120] [--rate 2000] [--users 2000] [--json soak.json]

Helpers here (`Bench`, `member_command`, `Scraper`, `rss_mb`) are shared with benchmarks/kill_loop.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _common import emit
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from stream_adapt.audit import audit
from stream_adapt.config import KafkaConfig
from stream_adapt.datasets import load_events
from stream_adapt.io.admin import client_config, default_topic_specs, ensure_topics
from stream_adapt.io.broker import EmbeddedBroker, free_port
from stream_adapt.learning.models import save_model
from stream_adapt.learning.pretrain import PretrainConfig, pretrain
from stream_adapt.learning.updates import METADATA_KEY, RejectedUpdate, read_metadata
from stream_adapt.replay import replay_file
from stream_adapt.synth import DEFAULT_CONFIG, generate, synthetic_stream

#: First group assignment in ~3 s on the local broker instead of ~23 s (KAFKA_LOCAL.md).
GROUP_TIMING = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "500"}

Samples = dict[str, list[tuple[dict[str, str], float]]]


@dataclasses.dataclass
class Bench:
    """A broker, a pretrained model and fresh topics for one benchmark run."""

    bootstrap: str
    work: Path
    model_dir: Path
    users: int
    items: int

    def topics(self, tag: str, partitions: int) -> KafkaConfig:
        kafka = KafkaConfig.prefixed(tag, self.bootstrap)
        ensure_topics(kafka, default_topic_specs(kafka, partitions, -1), timeout_s=30)
        return kafka


@contextmanager
def bench_setup(users: int, items: int = 500) -> Iterator[Bench]:
    """The broker (embedded unless KAFKA_BOOTSTRAP_SERVERS) and a base model pretrained on a synthetic
    history of `users` users (the live stream uses the same ids, so most users are warm)."""
    work = Path(tempfile.mkdtemp(prefix="stream-adapt-bench-"))
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    broker = None if external else EmbeddedBroker().start()
    try:
        live_min = DEFAULT_CONFIG.live_events_min  # the live file is not used: the smallest one allowed
        cfg = dataclasses.replace(DEFAULT_CONFIG, n_users=users, n_items=items, live_events_mean=live_min)
        generate(work / "data", cfg, seed=0)
        history, _ = load_events(work / "data" / "history.jsonl")
        model, _ = pretrain(history, PretrainConfig(epochs=4))
        save_model(model, work / "model")
        bootstrap = external or (broker.bootstrap_servers if broker is not None else "")
        yield Bench(bootstrap, work, work / "model", users, items)
    finally:
        if broker is not None:
            broker.stop()


def member_command(
    bench: Bench, kafka: KafkaConfig, *, metrics_port: int | None = None, args: Sequence[str] = ()
) -> list[str]:
    """`stream-adapt run` for `kafka`'s topics and group, with the tests' fast group timing."""
    cmd = [
        sys.executable, "-m", "stream_adapt", "run", "--model", str(bench.model_dir), "--source", "kafka",
        "--sink", "kafka", "--quiet", "--bootstrap-servers", kafka.bootstrap_servers, "--topic", kafka.topic,
        "--model-topic", kafka.model_topic, "--group", kafka.group,
        "--set", f'kafka.log_topic="{kafka.log_topic}"',
        "--set", f'kafka.dead_letter_topic="{kafka.dead_letter_topic}"',
        "--set", "kafka.extra=" + json.dumps({**GROUP_TIMING, "statistics.interval.ms": "1000"}),
        "--set", 'metrics_host="127.0.0.1"',
    ]  # fmt: skip
    if metrics_port is not None:
        cmd += ["--metrics-port", str(metrics_port)]
    return [*cmd, *args]


def start_process(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            cmd, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, stdout=log, stderr=subprocess.STDOUT
        )


def kill_quietly(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a member process if it still runs (cleanup after a failure or a deliberate kill)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def rss_mb(pid: int) -> float:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Scraper:
    """Reads a member's /metrics (and /readyz)."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def samples(self) -> Samples | None:
        """Every sample by name, or None while nothing answers."""
        try:
            with urllib.request.urlopen(f"{self.base}/metrics", timeout=10) as response:
                text = response.read().decode()
        except OSError:
            return None
        out: Samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
        return out

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/readyz", timeout=5) as response:
                return bool(response.status == 200)
        except OSError:
            return False


def total(samples: Samples | None, name: str, **labels: str) -> float:
    if samples is None:
        return 0.0
    return sum(v for ls, v in samples.get(name, []) if labels.items() <= ls.items())


def histogram_quantile(samples: Samples, name: str, q: float) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding the quantile."""
    buckets = sorted(
        (float("inf") if ls["le"] == "+Inf" else float(ls["le"]), v) for ls, v in samples.get(f"{name}_bucket", [])
    )
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-12)
        lower_bound, lower_count = bound, count
    return None


def wait_until(condition: Any, timeout_s: float, what: str, every_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(every_s)  # a benchmark's polling loop


class ModelTail(threading.Thread):
    """Tails the model topic as a serving process would: window closed -> update readable, per update."""

    def __init__(self, kafka: KafkaConfig, partitions: int) -> None:
        super().__init__(name="model-tail", daemon=True)
        conf = client_config(kafka, **{"group.id": "soak-tail", "enable.auto.commit": False, "fetch.wait.max.ms": 10})
        self.consumer = Consumer(conf)
        self.consumer.assign([TopicPartition(kafka.model_topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        self.latencies: list[float] = []
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                for msg in self.consumer.consume(num_messages=1000, timeout=0.05):
                    seen = time.time()
                    if msg.error() or msg.key() == b"__global__":
                        continue
                    try:
                        meta = json.loads(read_metadata(msg.value() or b"")[METADATA_KEY])
                    except (RejectedUpdate, KeyError, ValueError):
                        continue
                    self.latencies.append(seen - float(meta["created_at"]))
        finally:
            self.consumer.close()


def quantile_ms(xs: list[float], q: int) -> float | None:
    return round(1000 * statistics.quantiles(xs, n=100)[q - 1], 1) if len(xs) >= 2 else None


def paced_stream(path: Path, n: int, users: int, items: int, rate: float, lead_s: float = 2.0) -> tuple[Path, float]:
    """`n` rating events stamped start + i/rate, the wall time the paced replay sends each one at, and
    `start`. The start is chosen once the events exist, after the time writing them will take: stamps
    taken before generating a long stream were that long in the past when it was sent, and every
    freshness figure carried that offset (it grew with the soak's length)."""
    lines = synthetic_stream(n, n_users=users, n_items=items, seed=3, events_per_second=rate)
    events = [json.loads(raw) for raw in lines]
    t = time.perf_counter()
    for event in events[:10_000]:
        json.dumps(event)
    writing_s = (time.perf_counter() - t) / max(1, min(n, 10_000)) * n
    start = time.time() + lead_s + 2 * writing_s
    with path.open("wb") as out:
        for i, event in enumerate(events):
            event["timestamp"] = start + i / rate
            out.write(json.dumps(event).encode() + b"\n")
    if time.time() >= start:
        raise RuntimeError(f"writing {n} events took longer than planned; their stamps would be late")
    return path, start


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=120.0, help="how long the input is fed")
    p.add_argument("--rate", type=float, default=2000.0, help="input events per second")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--sample-s", type=float, default=5.0, help="RSS and metrics sampling period")
    p.add_argument("--warmup-s", type=float, default=20.0, help="RSS growth is measured from this point")
    p.add_argument("--json", type=Path, help="also write the result JSON to this file")
    args = p.parse_args()

    with bench_setup(args.users) as bench:
        kafka = bench.topics(f"soak-{int(time.time())}", args.partitions)
        port = free_port()
        scraper = Scraper(port)
        log_path = bench.work / "member.log"
        summary_path = bench.work / "summary.json"
        proc = start_process(
            member_command(bench, kafka, metrics_port=port, args=["--summary-json", str(summary_path)]), log_path
        )
        tail = ModelTail(kafka, args.partitions)
        try:
            wait_until(lambda: scraper.ready() or proc.poll() is not None, 120, "the member to be ready")
            if proc.poll() is not None:
                raise RuntimeError(f"the member exited: {log_path.read_text()[-3000:]}")
            tail.start()
            n = int(args.rate * args.seconds)
            stream, start = paced_stream(bench.work / "paced.jsonl", n, bench.users, bench.items, args.rate)
            wait_until(lambda: time.time() >= start, start - time.time() + 10, "the stream's start", every_s=0.005)
            fed: dict[str, Any] = {}
            feeder = threading.Thread(
                target=lambda: fed.update(report=replay_file(stream, kafka, rate=args.rate)), daemon=True
            )
            t0 = time.monotonic()
            cpu0 = total(scraper.samples(), "process_cpu_seconds_total")
            feeder.start()
            series: list[dict[str, float]] = []

            def sample() -> Samples | None:
                samples = scraper.samples()
                series.append(
                    {
                        "t_s": round(time.monotonic() - t0, 1),
                        "rss_mb": round(rss_mb(proc.pid), 1),
                        "processed": total(samples, "stream_adapt_records_consumed_total"),
                        "lag": total(samples, "stream_adapt_consumer_lag_records"),
                        "adapters": total(samples, "stream_adapt_adapters"),
                        "windows_open": total(samples, "stream_adapt_windows_open"),
                    }
                )
                return samples

            next_sample = time.monotonic()
            while feeder.is_alive():
                if time.monotonic() >= next_sample:
                    sample()
                    next_sample += args.sample_s
                feeder.join(min(0.2, max(0.0, next_sample - time.monotonic())))
            fed_s = time.monotonic() - t0
            sent = fed["report"].sent
            wait_until(
                lambda: (s := sample()) is not None and total(s, "stream_adapt_records_consumed_total") >= sent,
                120,
                "the member to process everything",
                every_s=1.0,
            )
            done_s = time.monotonic() - t0
            final = scraper.samples() or {}
            cpu_s = total(final, "process_cpu_seconds_total") - cpu0
            wait_until(
                lambda: len(tail.latencies) >= total(final, "stream_adapt_updates_published_total", entity_kind="user"),
                30,
                "the tail reader",
            )
            t_stop = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
            stop_s = time.monotonic() - t_stop
        finally:
            tail.halt.set()
            kill_quietly(proc)
        tail.join(10)
        report = audit(kafka, timeout_s=120).as_dict()
        report.pop("examples", None)

        warm = [s for s in series if s["t_s"] >= args.warmup_s] or series
        rss = [s["rss_mb"] for s in series]
        delivery = {q: histogram_quantile(final, "stream_adapt_update_delivery_seconds", q) for q in (0.5, 0.99)}
        fresh = {q: histogram_quantile(final, "stream_adapt_update_freshness_seconds", q) for q in (0.5, 0.99)}
        emit(
            {
                "benchmark": "soak",
                "broker": "external" if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") else "embedded Tansu",
                "seconds": args.seconds,
                "rate": args.rate,
                "users": args.users,
                "partitions": args.partitions,
                "events_sent": sent,
                "events_per_s": round(sent / done_s),
                "input_events_per_s": round(sent / fed_s),
                "drained_s_after_input": round(done_s - fed_s, 1),
                "rss_mb_over_time": [[s["t_s"], s["rss_mb"]] for s in series],
                "rss_start_mb": rss[0],
                "rss_after_warmup_mb": warm[0]["rss_mb"],
                "rss_end_mb": rss[-1],
                "rss_max_mb": max(rss),
                "rss_growth_mb": round(rss[-1] - warm[0]["rss_mb"], 1),
                # Bounded state (adapters, open windows, the event-id dedup set) fills first; then flat.
                "rss_growth_last_half_mb": round(rss[-1] - rss[len(rss) // 2], 1),
                "latency_p50_ms": _ms(delivery[0.5]),
                "latency_p99_ms": _ms(delivery[0.99]),
                "latency_source": "update_delivery_seconds histogram (window closed -> acknowledged), interpolated",
                "freshness_p50_ms": _ms(fresh[0.5]),
                "freshness_p99_ms": _ms(fresh[0.99]),
                "serving_visible_p50_ms": quantile_ms(tail.latencies, 50),
                "serving_visible_p99_ms": quantile_ms(tail.latencies, 99),
                "updates_seen_by_reader": len(tail.latencies),
                "lag_max": max(s["lag"] for s in series),
                "entities_held": {"adapters": series[-1]["adapters"], "windows_open": series[-1]["windows_open"]},
                "cpu_s_per_1k_events": round(1000 * cpu_s / max(sent, 1), 3),
                "stop_exit_code": code,
                "stop_s": round(stop_s, 2),
                "audit": report,
            },
            args.json,
        )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


if __name__ == "__main__":
    main()
