"""Bounded memory under a flood of distinct entities: 1,000,000 users, mostly one event each.

The stream is generated on the fly (JSON bytes, batch by batch): in each batch of `--batch-size`
records, 95% are the only event of a brand-new user and 5% belong to "regular" users who send 8
ratings within the batch (their windows fill and are adapted, so adaptation and the adapter table run
too). Every run goes through the offline `Pipeline` with the default settings but
`window.max_entities`; each run is a fresh child process, so peak RSS (`ru_maxrss`) is its own.

- bounded: `max_entities = --bound` (default 100,000): open windows and per-entity drift detectors
  are capped, the least recently active evicted (a one-event window is expired and logged).
- unbounded: `max_entities = 2,000,000` (more than the users streamed): nothing is evicted.

Reported per run: VmRSS sampled after every batch, peak RSS, the RSS expected at the bound (RSS
before the stream + the per-entity cost measured on the first 50,000 users (or half the bound) x the
bound, + the rest of the dedup cache), windows evicted / expired / adapted, open windows and drift
detectors at the end, adapter table size, events/s. Then the ratios unbounded/bounded of peak RSS and
of its growth.

    python benchmarks/bench_entities.py --json bench-entities.json [--entities 1000000] [--bound 100000]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import subprocess
import sys
import time
import tracemalloc
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import torch
from _common import emit, parser

from stream_adapt import runtime
from stream_adapt.config import pipeline_config
from stream_adapt.events import Position, Record
from stream_adapt.learning.models import NeuralRecommender, RecommenderConfig, freeze
from stream_adapt.learning.pipeline import Pipeline

UNBOUNDED = 2_000_000
REGULAR_SHARE = 0.05  # of the records: regular users with a full window (8 events) inside one batch
SHOTS = 8
T0 = int(time.time()) - 30 * 86_400  # a month ago: every timestamp is valid and no window ages out
EVENTS_PER_S = 20.0  # event-time spacing: 1M events span ~14 h, well inside max_age (7 days)
PROBE_ENTITIES = 50_000  # the per-entity cost is measured over the first this many users (or half the bound)


def rss_bytes() -> int:
    """Resident set size now (VmRSS), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def dedup_bytes_per_id(n: int = 20_000) -> float:
    """Memory of one remembered event id, measured on a cache shaped like the pipeline's dedup cache."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    cache: OrderedDict[str, Position] = OrderedDict()
    for k in range(n):
        cache[f"e{10**9 + k}"] = Position("feedback", 0, 10**9 + k)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used / n


def make_model(n_users: int = 1000, n_items: int = 1000) -> NeuralRecommender:
    """A default-sized random base model (dim 32, hidden 64): streamed users are all unknown to it."""
    torch.manual_seed(0)
    cfg = RecommenderConfig(n_users=n_users, n_items=n_items)
    model = NeuralRecommender(cfg, [f"known{i}" for i in range(n_users)], [f"i{i}" for i in range(n_items)])
    with torch.no_grad():
        model.global_bias.fill_(3.0)
    freeze(model)
    model.fingerprint = "sha256:bench-entities"
    return model


class Stream:
    """Batches of JSON records: mostly new one-event users, a few regular users with a full window."""

    def __init__(self, batch_size: int, seed: int = 0):
        self.batch_size = batch_size
        self.rng = random.Random(seed)
        self.offset = 0
        self.users = 0  # distinct users so far

    def batch(self) -> list[Record]:
        rng, n = self.rng, self.batch_size
        n_regular = int(n * REGULAR_SHARE) // SHOTS
        owners = [f"s{self.users + k}" for k in range(n - n_regular * SHOTS)]
        regulars = [f"r{self.users + len(owners) + k}" for k in range(n_regular)]
        self.users += len(owners) + len(regulars)
        who = owners + regulars * SHOTS
        rng.shuffle(who)
        out = []
        for user in who:
            off = self.offset
            body = (
                f'{{"event_id":"e{off}","user_id":"{user}","item_id":"i{rng.randrange(1000)}",'
                f'"event_type":"rating","value":{rng.randint(1, 5)},"timestamp":{T0 + off / EVENTS_PER_S:.3f}}}'
            )
            out.append(Record(body.encode(), Position("feedback", 0, off)))
            self.offset += 1
        return out


def child(entities: int, max_entities: int, batch_size: int) -> dict[str, Any]:
    """One run in this process: stream `entities` distinct users, sample RSS after every batch."""
    model = make_model()
    cfg = pipeline_config({"window": {"max_entities": max_entities}})
    pipeline = Pipeline(model, cfg)
    stream = Stream(batch_size)
    runtime.tune(1)
    rss_start = rss_bytes()
    samples: list[tuple[int, int]] = []
    outcomes: Counter[str] = Counter()
    records = events = 0
    rss_probe: int | None = None
    probe = min(PROBE_ENTITIES, max_entities // 2)  # before any eviction: every user still costs its share
    busy = 0.0
    t_start = time.perf_counter()
    while stream.users < entities:
        batch = stream.batch()
        t0 = time.perf_counter()
        res = pipeline.process(batch, now=T0 + 10**7)
        busy += time.perf_counter() - t0
        records += res.records
        events += res.learned
        for rec in res.log:
            outcomes[f"{rec.trigger}/{rec.outcome}"] += 1
        del res, batch
        samples.append((stream.users, rss_bytes()))
        if rss_probe is None and stream.users >= probe:
            rss_probe = samples[-1][1]
    wall = time.perf_counter() - t_start
    gc.collect()
    rss_end = rss_bytes()
    probe_users = next(u for u, r in samples if r == rss_probe) if rss_probe is not None else 1
    per_entity = ((rss_probe or rss_start) - rss_start) / probe_users  # window + detector + dedup id
    dedup = cfg.events.dedup_capacity
    held = min(max_entities, stream.users)
    # The first `held` users cost `per_entity` each; the dedup cache keeps growing after them, to its capacity.
    expected = rss_start + per_entity * held + dedup_bytes_per_id() * max(0, min(dedup, records) - held)
    at_bound = next((r for u, r in samples if u >= held), samples[-1][1])
    step = max(1, len(samples) // 25)
    return {
        "max_entities": max_entities,
        "entities": stream.users,
        "records": records,
        "events_learned": events,
        "events_per_s": round(records / busy),
        "wall_s": round(wall, 1),
        "rss_start_mb": round(rss_start / 2**20, 1),
        "rss_end_mb": round(rss_end / 2**20, 1),
        "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1),
        "bytes_per_open_entity": round(per_entity),
        "dedup_capacity": dedup,
        "expected_rss_at_bound_mb": round(expected / 2**20, 1),
        "rss_when_bound_reached_mb": round(at_bound / 2**20, 1),
        "growth_after_bound_mb": round((peak_rss_bytes() - at_bound) / 2**20, 1),
        "peak_vs_expected": round(peak_rss_bytes() / expected, 3),
        "rss_samples_mb": [[u, round(r / 2**20, 1)] for u, r in [*samples[::step], samples[-1]]],
        "outcomes": dict(sorted(outcomes.items())),
        "windows_evicted": sum(n for k, n in outcomes.items() if k.startswith("evicted/")),
        "windows_expired": sum(n for k, n in outcomes.items() if k.endswith("/expired")),
        "windows_adapted": sum(n for k, n in outcomes.items() if not k.endswith("/expired")),
        "open_windows_end": len(pipeline.windows),
        "drift_detectors_end": len(pipeline.drift),
        "drift_detectors_evicted": pipeline.drift.evicted,
        "adapter_table_entities": len(pipeline.table),
    }


def run_child(entities: int, max_entities: int, batch_size: int) -> dict[str, Any]:
    """The same script in a fresh interpreter (its own peak RSS), one JSON object on stdout."""
    cmd = [sys.executable, __file__, "--child", str(max_entities), "--entities", str(entities)]
    cmd += ["--batch-size", str(batch_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--entities", type=int, default=1_000_000, help="distinct users to stream")
    p.add_argument("--bound", type=int, default=100_000, help="window.max_entities of the bounded run")
    p.add_argument("--batch-size", type=int, default=5000)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)  # internal: one run
    p.add_argument("--no-unbounded", action="store_true", help="skip the unbounded comparison run")
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.entities, args.child, args.batch_size)))
        return
    bounded = run_child(args.entities, args.bound, args.batch_size)
    result: dict[str, Any] = {"benchmark": "bench_entities", "bounded": bounded}
    if not args.no_unbounded:
        unbounded = run_child(args.entities, UNBOUNDED, args.batch_size)
        result["unbounded"] = unbounded
        grow_b = bounded["peak_rss_mb"] - bounded["rss_start_mb"]
        grow_u = unbounded["peak_rss_mb"] - unbounded["rss_start_mb"]
        result["peak_rss_ratio_unbounded_vs_bounded"] = round(unbounded["peak_rss_mb"] / bounded["peak_rss_mb"], 2)
        result["rss_growth_ratio_unbounded_vs_bounded"] = round(grow_u / max(grow_b, 1e-9), 2)
    emit(result, args.json)


if __name__ == "__main__":
    main()
