"""The offline pipeline vs decode alone vs River's BiasedMF, on the same synthetic events, one run.

- pipeline: FileSource -> Pipeline (decode, score, window, drift, batched adapt, gate, payloads) -> DirSink
- decode:   FileSource -> events.decode (the I/O and validation floor)
- river:    reco.BiasedMF predict_one + learn_one per event, on events already parsed into tuples (its
            most favourable case: no JSON, no validation). It is what a user would otherwise pick for
            online recommendation.
- river_parse: the same, reading the same file and parsing each line with json.loads first (what a
            River service reading this log would do; still no validation).
Contenders run interleaved, `--repeats` rounds, medians reported. Prints JSON with
pipeline_events_per_s, decode_events_per_s, river_events_per_s and their ratios.

    python benchmarks/bench_pipeline.py --json bench-pipeline.json [--users 3000]
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

from _common import emit, interleaved, median, parser

from stream_adapt import runtime
from stream_adapt.config import PipelineConfig
from stream_adapt.datasets import load_events
from stream_adapt.evaluate.baselines import river_biased_mf
from stream_adapt.events import DecodeError, decode
from stream_adapt.io.directory import DirSink
from stream_adapt.io.files import FileSource
from stream_adapt.learning.pipeline import Pipeline
from stream_adapt.learning.pretrain import PretrainConfig, pretrain
from stream_adapt.runner import Runner, RunOptions
from stream_adapt.synth import DEFAULT_CONFIG, generate


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--users", type=int, default=3000, help="synthetic users (live events ~ 61 per user)")
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=2000)
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    synth_cfg = dataclasses.replace(DEFAULT_CONFIG, n_users=args.users, n_items=args.items)
    summary = generate(work / "data", synth_cfg, seed=0)
    live = work / "data" / "live.jsonl"
    history, _ = load_events(work / "data" / "history.jsonl")
    model, _ = pretrain(history, PretrainConfig(epochs=6))
    model.fingerprint = "sha256:bench"
    runtime.tune(1)

    river_events = []
    for line in live.open("rb"):
        try:
            e = json.loads(line)
            river_events.append((str(e["user_id"]), str(e["item_id"]), float(e["value"])))
        except (ValueError, KeyError, TypeError):
            continue

    run_no = iter(range(1_000_000))

    def pipeline() -> int:
        source = FileSource(live, "jsonl")
        sink = DirSink(work / f"out-{next(run_no)}")
        runner = Runner(source, Pipeline(model, PipelineConfig()), sink, RunOptions(batch_size=args.batch_size))
        stats = runner.run()
        source.close()
        sink.close()
        pipeline.last = stats.summary()  # type: ignore[attr-defined]
        return stats.records

    def decode_only() -> int:
        n = 0
        with FileSource(live, "jsonl") as source:
            while batch := source.poll_batch(args.batch_size):
                for item in batch:
                    if not isinstance(item, DecodeError):
                        decode(item.value, item.position)
                    n += 1
        return n

    def river() -> int:
        model = river_biased_mf()
        for u, i, y in river_events:
            model.predict_one(u, i)
            model.learn_one(u, i, y)
        return len(river_events)

    def river_parse() -> int:
        model, n = river_biased_mf(), 0
        with live.open("rb") as f:
            for line in f:
                n += 1
                try:
                    e = json.loads(line)
                    u, i, y = str(e["user_id"]), str(e["item_id"]), float(e["value"])
                except (ValueError, KeyError, TypeError):
                    continue
                model.predict_one(u, i)
                model.learn_one(u, i, y)
        return n

    contenders = {"pipeline": pipeline, "decode": decode_only, "river": river, "river_parse": river_parse}
    rates = interleaved(contenders, args.repeats)
    pipe, dec, riv = median(rates["pipeline"]), median(rates["decode"]), median(rates["river"])
    riv_parse = median(rates["river_parse"])
    last = pipeline.last  # type: ignore[attr-defined]
    emit(
        {
            "benchmark": "bench_pipeline",
            "events": summary.live_lines,
            "users": args.users,
            "items": args.items,
            "pipeline_events_per_s": round(pipe),
            "decode_events_per_s": round(dec),
            "river_events_per_s": round(riv),
            "river_parse_events_per_s": round(riv_parse),
            "pipeline_vs_river": round(pipe / riv, 2),
            "pipeline_vs_river_parse": round(pipe / riv_parse, 2),
            "pipeline_vs_decode": round(pipe / dec, 3),
            "pipeline_run": {
                "adaptations_accepted": last["adaptations"]["accepted"],
                "adaptations_rolled_back": last["adaptations"]["rolled_back"],
                "mean_adapt_batch": last["adaptations"]["mean_batch_size"],
                "prequential_mae": last["prequential"]["mae"],
                "prequential_mae_no_adaptation": last["prequential"]["mae_no_adaptation"],
                "stage_seconds": last["stage_seconds"],
            },
            "rates": {k: [round(x) for x in v] for k, v in rates.items()},
        },
        args.json,
    )


if __name__ == "__main__":
    main()
