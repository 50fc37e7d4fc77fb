"""Kill -9 loop: a member process killed at N seeded random points in a row, each time restarted, while
input keeps arriving; then a last member runs to the end, and the audit judges the whole history.

Kill points (as in tests/integration/test_service_hardening.py, which runs 4): the failpoints that
bracket processing, publishing and committing (`mid_batch`, `after_publish`, `after_commit`, reached
1-4 times first; stream_adapt.faults), or SIGKILL from outside 0.5-3 s after the member was assigned
its partitions. A kill point is survived when the member died there with SIGKILL and the final audit
finds nothing lost, nothing applied twice, and every entity's versions exactly 1, 2, 3, ...

Each restart waits for the dead member's session (6 s) to expire, so a kill costs ~10-15 s.

    python benchmarks/kill_loop.py [--kills 20] [--seed 1] [--json kill-loop.json]
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

from _common import emit
from soak import Bench, Scraper, bench_setup, kill_quietly, member_command, start_process, total, wait_until

from stream_adapt.audit import audit
from stream_adapt.config import KafkaConfig
from stream_adapt.faults import kill_plan
from stream_adapt.io.broker import free_port
from stream_adapt.io.changelog import read_to_end
from stream_adapt.replay import ReplayReport, replay_file
from stream_adapt.synth import synthetic_stream


class _Stop(Exception):
    pass


class Feeder(threading.Thread):
    """The production replayer at a steady rate until `stop()` (so every member has work to die in)."""

    def __init__(self, path: Path, kafka: KafkaConfig, rate: float) -> None:
        super().__init__(name="feeder", daemon=True)
        self.path, self.kafka, self.rate = path, kafka, rate
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        def progress(_: ReplayReport) -> None:
            if self.halt.is_set():
                raise _Stop

        try:
            replay_file(self.path, self.kafka, rate=self.rate, progress=progress, progress_interval_s=0.2)
        except _Stop:
            pass
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.halt.set()
        self.join(60)
        if self.error is not None:
            raise self.error


def one_kill(bench: Bench, kafka: KafkaConfig, i: int, point: str, arg: float) -> dict[str, Any]:
    """Start a member armed to die at `point`, wait for its death; what happened, for the report."""
    log_path = bench.work / f"member-{i}.log"
    env = {"STREAM_ADAPT_FAILPOINTS": f"{point}={arg:g}"} if point != "random_time" else {}
    t0 = time.monotonic()
    proc = start_process(member_command(bench, kafka, args=["--batch-size", "500"]), log_path, env)
    try:
        if point == "random_time":
            wait_until(lambda: b"assigned" in log_path.read_bytes() or proc.poll() is not None, 60, "assignment")
            at = time.monotonic() + arg
            wait_until(lambda: time.monotonic() >= at or proc.poll() is not None, 10, "the kill time", every_s=0.01)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        code = proc.wait(120)
    finally:
        kill_quietly(proc)
    return {"point": f"{point}={arg:g}", "exit": code, "lived_s": round(time.monotonic() - t0, 1)}


def at_end(scraper: Scraper, partitions: int) -> bool:
    """The member's read lag is known for every partition and 0 on all (absent means unknown, not 0)."""
    samples = scraper.samples()
    lags = (samples or {}).get("stream_adapt_consumer_lag_records", [])
    return len(lags) == partitions and total(samples, "stream_adapt_consumer_lag_records") == 0


def versions_by_entity(kafka: KafkaConfig) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for msg in read_to_end(kafka, kafka.model_topic, None, timeout_s=60):
        key = (msg.key() or b"").decode()
        version = dict(msg.headers() or []).get("stream-adapt-version")
        if key != "__global__" and isinstance(version, bytes):
            out.setdefault(key, []).append(int(version))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rate", type=float, default=200.0, help="input events per second during the loop")
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--json", type=Path, help="also write the result JSON to this file")
    args = p.parse_args()

    plan = kill_plan(args.seed, args.kills)
    with bench_setup(args.users) as bench:
        kafka = bench.topics(f"killloop-{int(time.time())}", 2)
        lines = synthetic_stream(int(args.rate * 20 * (args.kills + 2)), n_users=args.users, n_items=bench.items)
        stream = bench.work / "input.jsonl"
        stream.write_bytes(b"\n".join(lines) + b"\n")
        feeder = Feeder(stream, kafka, args.rate)
        feeder.start()
        t0 = time.monotonic()
        kills: list[dict[str, Any]] = []
        try:
            for i, (point, arg) in enumerate(plan):
                kills.append(one_kill(bench, kafka, i, point, arg))
                print(json.dumps(kills[-1]), flush=True)
        finally:
            feeder.stop()
        loop_s = time.monotonic() - t0

        # The last member: no failpoint, runs until it has read everything, then stops gracefully.
        port = free_port()
        scraper = Scraper(port)
        log_path = bench.work / "member-last.log"
        proc = start_process(member_command(bench, kafka, metrics_port=port), log_path)
        try:
            wait_until(lambda: scraper.ready() or proc.poll() is not None, 120, "the last member to be ready")
            wait_until(lambda: at_end(scraper, 2) or proc.poll() is not None, 120, "the end", every_s=1.0)
            proc.send_signal(signal.SIGTERM)
            last_exit = proc.wait(60)
        finally:
            kill_quietly(proc)
        report = audit(kafka, timeout_s=120).as_dict()
        versions = versions_by_entity(kafka)
        broken = {e: v for e, v in versions.items() if v != list(range(1, len(v) + 1))}
        died_there = sum(1 for k in kills if k["exit"] == -signal.SIGKILL)
        ok = report["ok"] and not broken and last_exit == 0
        emit(
            {
                "benchmark": "kill_loop",
                "seed": args.seed,
                "kills_planned": len(plan),
                "killed_with_sigkill": died_there,
                "kill_points_survived": died_there if ok else 0,
                "kills": kills,
                "loop_s": round(loop_s, 1),
                "last_member_exit": last_exit,
                "entities_with_versions": len(versions),
                "versions_consecutive": not broken,
                "version_breaks": dict(list(broken.items())[:5]),
                "audit": {k: v for k, v in report.items() if k != "examples"},
            },
            args.json,
        )


if __name__ == "__main__":
    main()
