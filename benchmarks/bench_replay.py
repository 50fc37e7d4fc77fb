"""Replay pacing and throughput against the local broker (or KAFKA_BOOTSTRAP_SERVERS). Prints JSON.

- `unpaced_records_per_s`: as fast as possible, without and with a checkpoint (the replay header on
  every record, and a flush + checkpoint write every 2 s);
- `rate`: for each requested rate, the achieved rate over the run (sent / seconds) and the ratio;
- `speed`: a log whose events have irregular gaps (exponential, mean 10 ms of event time) replayed at
  each speed factor: the achieved duration vs the log's event-time span / speed, as a ratio.

Each paced run lasts about `--seconds`; the rounds are interleaved and repeated (`--repeats`), medians
are reported. A ratio below 1 means the replay could not keep up (a shared machine); the absolute
schedule means it is never above 1 by more than the first record's slot.

    python benchmarks/bench_replay.py --json bench-replay.json [--seconds 2] [--repeats 3]
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from _common import emit, median, parser

from stream_adapt.config import KafkaConfig
from stream_adapt.io.admin import TopicSpec, ensure_topics
from stream_adapt.replay import replay_file

T0 = 1_600_000_000.0
RATES = (1_000.0, 5_000.0, 20_000.0)
SPEEDS = (10.0, 100.0)


def write_log(path: Path, n: int, *, mean_gap_s: float, seed: int) -> float:
    """n valid rating events, 500 users, exponential event-time gaps; returns the event-time span."""
    rng = random.Random(seed)
    t = T0
    with path.open("w") as f:
        for i in range(n):
            event = {
                "event_id": f"e{i}",
                "user_id": f"u{rng.randrange(500)}",
                "item_id": f"i{rng.randrange(300)}",
                "event_type": "rating",
                "value": float(rng.randint(1, 5)),
                "timestamp": round(t, 3),
            }
            f.write(json.dumps(event) + "\n")
            t += rng.expovariate(1 / mean_gap_s)
    return t - T0


@contextlib.contextmanager
def broker() -> Iterator[str]:
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if external:
        yield external
        return
    from stream_adapt.io.broker import EmbeddedBroker

    with EmbeddedBroker() as embedded:
        yield embedded.bootstrap_servers


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--seconds", type=float, default=2.0, help="length of each paced run")
    p.add_argument("--unpaced-records", type=int, default=100_000, help="records of the as-fast-as-possible runs")
    p.add_argument("--partitions", type=int, default=4)
    args = p.parse_args()

    with broker() as bootstrap, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)

        def fresh_topic() -> KafkaConfig:
            name = f"bench-replay-{uuid.uuid4().hex[:8]}"
            ensure_topics(bootstrap, [TopicSpec(name, args.partitions, -1)], timeout_s=30)
            return KafkaConfig(bootstrap_servers=bootstrap, topic=name)

        unpaced_log = work / "unpaced.jsonl"
        write_log(unpaced_log, args.unpaced_records, mean_gap_s=0.01, seed=1)
        rate_logs = {}
        for rate in RATES:
            rate_logs[rate] = work / f"rate-{rate:.0f}.jsonl"
            write_log(rate_logs[rate], int(rate * args.seconds), mean_gap_s=0.01, seed=2)
        speed_logs: dict[float, tuple[Path, float]] = {}
        for speed in SPEEDS:
            # As many events as make `seconds` of replay at this speed: span = n * 10 ms.
            n = int(args.seconds * speed / 0.01)
            path = work / f"speed-{speed:.0f}.jsonl"
            speed_logs[speed] = (path, write_log(path, n, mean_gap_s=0.01, seed=3))

        unpaced: dict[str, list[float]] = {"no_checkpoint": [], "checkpoint": []}
        achieved: dict[float, list[float]] = {r: [] for r in RATES}
        durations: dict[float, list[float]] = {s: [] for s in SPEEDS}
        for round_ in range(args.repeats):
            report = replay_file(unpaced_log, fresh_topic())
            unpaced["no_checkpoint"].append(report.rate)
            checkpoint = work / f"ck-{round_}.json"
            report = replay_file(unpaced_log, fresh_topic(), checkpoint=checkpoint)
            unpaced["checkpoint"].append(report.rate)
            for rate in RATES:
                report = replay_file(rate_logs[rate], fresh_topic(), rate=rate)
                achieved[rate].append(report.sent / report.seconds)
            for speed in SPEEDS:
                report = replay_file(speed_logs[speed][0], fresh_topic(), speed=speed)
                durations[speed].append(report.seconds)

        result = {
            "benchmark": "replay",
            "records_per_paced_run_s": args.seconds,
            "repeats": args.repeats,
            "unpaced_records_per_s": {k: round(median(v)) for k, v in unpaced.items()},
            "unpaced_records": args.unpaced_records,
            "rate": [
                {
                    "requested_per_s": rate,
                    "achieved_per_s": round(median(achieved[rate]), 1),
                    "ratio": round(median(achieved[rate]) / rate, 4),
                }
                for rate in RATES
            ],
            "speed": [
                {
                    "speed": speed,
                    "events": sum(1 for _ in speed_logs[speed][0].open()),
                    "expected_s": round(speed_logs[speed][1] / speed, 3),
                    "achieved_s": round(median(durations[speed]), 3),
                    "ratio": round(speed_logs[speed][1] / speed / median(durations[speed]), 4),
                }
                for speed in SPEEDS
            ],
            "broker": "external" if os.environ.get("KAFKA_BOOTSTRAP_SERVERS") else "embedded Tansu (memory)",
        }
        emit(result, args.json)


if __name__ == "__main__":
    main()
