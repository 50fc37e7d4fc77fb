"""What the metrics cost on the hot path: the offline pipeline with and without the metrics observer.

- plain:    FileSource -> Pipeline -> DirSink through the Runner (as bench_pipeline's `pipeline`)
- metrics:  the same, plus `Metrics.observe_batch` as a runner observer and a gauge refresh per loop
            (what `ServiceMonitor` adds between batches), and a scrape of the registry every second of
            processing (15 times the usual scrape rate)
Contenders run interleaved, `--repeats` rounds, timed in CPU seconds of this process, medians reported;
also the cost of observe_batch on the run's own batches and of one scrape. Prints JSON.

    python benchmarks/bench_metrics.py --json bench-metrics.json [--users 1000]
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

from _common import emit, median, parser
from prometheus_client import CollectorRegistry, generate_latest

from stream_adapt import runtime
from stream_adapt.config import PipelineConfig
from stream_adapt.datasets import load_events
from stream_adapt.io.directory import DirSink
from stream_adapt.io.files import FileSource
from stream_adapt.learning.pipeline import BatchResult, Pipeline
from stream_adapt.learning.pretrain import PretrainConfig, pretrain
from stream_adapt.metrics import Metrics
from stream_adapt.runner import Runner, RunOptions
from stream_adapt.synth import DEFAULT_CONFIG, generate


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--users", type=int, default=1000, help="synthetic users (live events ~ 61 per user)")
    p.add_argument("--batch-size", type=int, default=2000)
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
    summary = generate(work / "data", dataclasses.replace(DEFAULT_CONFIG, n_users=args.users), seed=0)
    live = work / "data" / "live.jsonl"
    history, _ = load_events(work / "data" / "history.jsonl")
    model, _ = pretrain(history, PretrainConfig(epochs=4))
    runtime.tune(1)
    run_no = iter(range(1_000_000))
    batches: list[BatchResult] = []

    def run(with_metrics: bool) -> int:
        source = FileSource(live, "jsonl")
        sink = DirSink(work / f"out-{next(run_no)}")
        pipeline = Pipeline(model, PipelineConfig())
        runner = Runner(source, pipeline, sink, RunOptions(batch_size=args.batch_size))
        if with_metrics:
            metrics = Metrics(topic="live", registry=CollectorRegistry())
            last_scrape = [time.perf_counter()]

            def refresh() -> None:  # what ServiceMonitor.refresh sets from the pipeline, per loop
                metrics.windows_open.set(len(pipeline.windows))
                metrics.window_events.set(pipeline.windows.open_events)
                metrics.adapters.set(len(pipeline.table))
                metrics.global_version.set(pipeline.global_version)
                if time.perf_counter() - last_scrape[0] >= 1.0:
                    generate_latest(metrics.registry)
                    last_scrape[0] = time.perf_counter()

            runner.observers.append(metrics.observe_batch)
            runner.hooks.append(refresh)
        elif not batches:
            runner.observers.append(batches.append)
        stats = runner.run()
        source.close()
        sink.close()
        return stats.records

    # CPU time of this process, not wall time: other work on a shared machine slows both contenders
    # unevenly (wall-clock rates here varied 2x between identical runs), while the CPU each run needs does not.
    rates: dict[str, list[float]] = {"plain": [], "metrics": []}
    for _ in range(args.repeats):
        for name in rates:
            t0 = time.process_time()
            n = run(name == "metrics")
            rates[name].append(n / (time.process_time() - t0))
    plain, with_metrics = median(rates["plain"]), median(rates["metrics"])

    # One observe_batch on the run's own batches, and one scrape of the filled registry.
    metrics = Metrics(topic="live", registry=CollectorRegistry())
    t0 = time.perf_counter()
    for batch in batches:
        metrics.observe_batch(batch)
    per_batch = (time.perf_counter() - t0) / len(batches)
    t0 = time.perf_counter()
    for _ in range(100):
        generate_latest(metrics.registry)
    per_scrape = (time.perf_counter() - t0) / 100
    emit(
        {
            "benchmark": "bench_metrics",
            "events": summary.live_lines,
            "batch_size": args.batch_size,
            "plain_events_per_cpu_s": round(plain),
            "metrics_events_per_cpu_s": round(with_metrics),
            "overhead_percent": round(100 * (plain - with_metrics) / plain, 2),
            "observe_batch_us": round(per_batch * 1e6, 1),
            "observe_batch_us_per_event": round(per_batch * 1e6 * len(batches) / summary.live_lines, 3),
            "scrape_ms": round(per_scrape * 1e3, 2),
            "rates": {k: [round(x) for x in v] for k, v in rates.items()},
        },
        args.json,
    )


if __name__ == "__main__":
    main()
