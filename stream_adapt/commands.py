"""What each `stream-adapt` subcommand does, once `cli.py` has parsed it.

Heavy imports (torch) happen here, not in `cli.py`, so `stream-adapt --help` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from stream_adapt.config import Settings, load_settings
from stream_adapt.errors import ConfigError
from stream_adapt.events import export_schemas as _export_schemas

if TYPE_CHECKING:
    from stream_adapt.learning.models import AdaptableModel
    from stream_adapt.learning.pipeline import Pipeline
    from stream_adapt.learning.stats import RunStats

__all__ = [
    "audit",
    "config_reference",
    "config_show",
    "demo",
    "evaluate",
    "export_schemas",
    "pretrain",
    "replay",
    "rewind",
    "run",
    "synth",
    "topics",
]


def export_schemas(directory: Path) -> list[Path]:
    return _export_schemas(directory)


def config_show(args: argparse.Namespace) -> str:
    from stream_adapt.cli import overrides_from_args
    from stream_adapt.config import SECRET_WORDS

    settings = load_settings(args.config, overrides_from_args(args))
    data = settings.model_dump(mode="json", by_alias=True)
    extra = data["kafka"]["extra"]
    for key in extra:
        if any(word in key.lower() for word in SECRET_WORDS):
            extra[key] = "**********"
    return json.dumps(data, indent=2)


def config_reference() -> str:
    from stream_adapt.config import reference_table

    return reference_table()


def synth(args: argparse.Namespace) -> int:
    from stream_adapt.synth import DEFAULT_CONFIG, generate

    cfg = DEFAULT_CONFIG
    changes = {k: v for k, v in (("n_users", args.users), ("n_items", args.items)) if v is not None}
    if changes:
        cfg = dataclasses.replace(cfg, **changes)
    summary = generate(args.out, cfg, seed=args.seed)
    print(summary.to_json())
    print(f"wrote {args.out}/history.jsonl and {args.out}/live.jsonl", file=sys.stderr)
    return 0


def pretrain(args: argparse.Namespace) -> int:
    from stream_adapt.datasets import load_events
    from stream_adapt.learning.models import save_model
    from stream_adapt.learning.pretrain import PretrainConfig
    from stream_adapt.learning.pretrain import pretrain as fit

    events, bad = load_events(args.events, args.format)
    print(f"read {len(events)} events from {args.events} ({len(bad)} invalid lines skipped)", file=sys.stderr)
    if bad:
        reasons: dict[str, int] = {}
        for b in bad:
            reasons[b.reason] = reasons.get(b.reason, 0) + 1
        print(f"  invalid by reason: {reasons}; first: line {bad[0].position[2] + 1}: {bad[0].detail}", file=sys.stderr)
    from stream_adapt.learning.meta import MetaConfig

    cfg = PretrainConfig(
        dim=args.dim,
        hidden=args.hidden,
        lora_rank=args.lora_rank,
        entity=args.entity,
        epochs=args.epochs,
        seed=args.seed,
        meta=MetaConfig(seed=args.seed) if getattr(args, "meta_init", False) else None,
    )
    try:
        model, report = fit(events, cfg, progress=lambda line: print("  " + line, file=sys.stderr))
    except ValueError as exc:
        raise ConfigError(f"cannot pretrain on {args.events}: {exc}") from exc
    fingerprint = save_model(model, args.out)
    print(
        f"pretrained on {report.n_train} events ({report.n_users} users, {report.n_items} items) in "
        f"{report.seconds:.1f}s; best epoch {report.best_epoch}\n"
        f"  train RMSE {report.train_rmse:.4f}   validation RMSE {report.val_rmse:.4f}  MAE {report.val_mae:.4f} "
        f"(newest {report.n_val} events)\n"
        f"  wrote {args.out} ({fingerprint[:23]}...)"
    )
    if report.meta is not None:
        m = report.meta
        print(
            f"  meta-learned cold start on {m.tasks} users: prequential MSE {m.mse_before:.4f} -> {m.mse_after:.4f}; "
            f"step size {m.lr:.4f}, scales {m.lr_scale}"
        )
    return 0


def load_any_model(model_dir: Path, plugin: str | None, settings: Settings) -> AdaptableModel:
    from stream_adapt.learning.models import load_model, load_plugin

    if plugin:
        return load_plugin(plugin, model_dir)
    return load_model(model_dir, entity=settings.pipeline.window.entity)


def _install_stop_handlers(stop: object) -> None:
    """SIGTERM/SIGINT finish the current batch, flush, commit and exit (a second SIGINT aborts)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        print(f"\nstream-adapt: {signal.Signals(signum).name}: finishing the batch, flushing", file=sys.stderr)
        stop()  # type: ignore[operator]
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def run(args: argparse.Namespace) -> int:
    from stream_adapt.cli import overrides_from_args

    # Settings and arguments first: a mistake is reported before torch is even imported.
    settings = load_settings(args.config, overrides_from_args(args))
    if getattr(args, "start_from", None) is not None:
        if args.source != "kafka":
            raise ConfigError("--start-from rewinds the consumer group: it goes with --source kafka")
        from stream_adapt.replay import parse_timestamp

        parse_timestamp(args.start_from)  # a bad timestamp is a usage error, reported before the model loads
    if args.source == "kafka" or args.sink == "kafka":
        if args.source != "kafka" or args.sink != "kafka":
            raise ConfigError("--source kafka goes with --sink kafka (restoring state needs the model topic)")
        return _run_kafka(args, settings)
    kind, _, target = args.source.partition(":")
    if kind != "file" or not target:
        raise ConfigError(f"--source must be kafka or file:PATH, got {args.source!r}")
    skind, _, sink_target = args.sink.partition(":")
    if skind != "dir" or not sink_target:
        raise ConfigError(f"--sink must be kafka or dir:OUT, got {args.sink!r}")
    return _run_file(args, settings, Path(target), Path(sink_target))


def _finish(stats: RunStats, pipeline: Pipeline, model: AdaptableModel, summary_json: Path | None) -> dict[str, Any]:
    from stream_adapt.learning.stats import format_summary

    summary = stats.summary(len(pipeline.windows), pipeline.windows.open_events)
    summary["base_fingerprint"] = model.fingerprint
    print(format_summary(summary))
    if summary_json:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _run_file(args: argparse.Namespace, settings: Settings, source_path: Path, out: Path) -> int:
    from stream_adapt import runtime
    from stream_adapt.io.directory import DirSink
    from stream_adapt.io.files import FileSource
    from stream_adapt.learning.pipeline import Pipeline
    from stream_adapt.progress import ProgressPrinter
    from stream_adapt.runner import Runner, RunOptions

    model = load_any_model(args.model, args.model_plugin, settings)
    runtime.tune(settings.pipeline.adapt.threads)
    source = FileSource(source_path, args.format)
    sink = DirSink(out)
    pipeline = Pipeline(model, settings.pipeline)
    options = RunOptions(
        batch_size=settings.batch_size, poll_timeout_s=settings.poll_timeout_s, drain_at_end=not args.no_drain
    )
    runner = Runner(source, pipeline, sink, options)
    if not args.quiet:
        runner.observers.append(ProgressPrinter(runner.stats))
    _install_stop_handlers(runner.stop)
    try:
        stats = runner.run()
    finally:
        source.close()
        sink.close()
    _finish(stats, pipeline, model, args.summary_json)
    print(f"outputs in {out}/ (updates.jsonl, adaptation_log.jsonl, dead_letters.jsonl)")
    return 0


def _run_kafka(args: argparse.Namespace, settings: Settings) -> int:
    from stream_adapt.metrics import Observability

    # Serving first, before torch and the model load: /healthz answers while the member starts and waits
    # for Kafka, /readyz once it has caught up.
    observability = Observability.from_settings(settings)
    try:
        from stream_adapt import runtime
        from stream_adapt.progress import ProgressPrinter
        from stream_adapt.service import KafkaService

        model = load_any_model(args.model, args.model_plugin, settings)
        runtime.tune(settings.pipeline.adapt.threads)
        waiting = threading.Event()
        _install_stop_handlers(waiting.set)
        _start_from(args, settings)
        service = KafkaService.connect(settings, model, stop=waiting)
        if service is None:  # stopped while waiting for Kafka
            return 0
        if observability is not None:
            observability.watch(service)
        if not args.quiet:
            service.runner.observers.append(ProgressPrinter(service.runner.stats, every_s=10.0))
        _install_stop_handlers(service.stop)
        stats = service.run()
    finally:
        if observability is not None:
            observability.close()
    _finish(stats, service.pipeline, model, args.summary_json)
    return 0


def audit(args: argparse.Namespace) -> int:
    from stream_adapt.audit import audit as run_audit
    from stream_adapt.cli import overrides_from_args

    settings = load_settings(args.config, overrides_from_args(args))
    report = run_audit(settings.kafka, settings.pipeline.events.learn_types).as_dict()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    print("audit: " + ("OK" if report["ok"] else "FAILED"), file=sys.stderr)
    return 0 if report["ok"] else 1


def topics(args: argparse.Namespace) -> int:
    from stream_adapt.cli import overrides_from_args
    from stream_adapt.io.admin import default_topic_specs, ensure_topics

    settings = load_settings(args.config, overrides_from_args(args))
    specs = default_topic_specs(settings.kafka, args.partitions, args.replication)
    for name, outcome in ensure_topics(settings.kafka, specs).items():
        spec = next(s for s in specs if s.name == name)
        print(f"{outcome:>8}  {name}  ({spec.partitions} partitions, {spec.config.get('cleanup.policy', 'delete')})")
    return 0


def replay(args: argparse.Namespace) -> int:
    """`stream-adapt replay`: progress on stderr, the summary on stdout."""
    from stream_adapt.cli import overrides_from_args

    settings = load_settings(args.config, overrides_from_args(args))
    from stream_adapt.replay import (
        ProgressLine,
        ReplayError,
        TimeWindow,
        count_lines,
        default_checkpoint_path,
        parse_timestamp,
        replay_file,
    )

    window = TimeWindow(
        parse_timestamp(args.since) if args.since else None, parse_timestamp(args.until) if args.until else None
    )
    if not args.log.is_file():
        raise ReplayError(f"{args.log}: no such file")
    topic = settings.kafka.topic
    checkpoint = args.checkpoint or default_checkpoint_path(args.log, topic)
    progress = None if args.quiet else ProgressLine(sys.stderr)

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # SIGTERM as Ctrl-C: replay_file confirms and checkpoints what it sent

    signal.signal(signal.SIGTERM, terminate)
    try:
        report = replay_file(
            args.log,
            settings.kafka,
            topic=topic,
            fmt=args.format,
            # On --resume the checkpoint decides; a value given here must agree with it.
            entity=args.entity or (None if args.resume else settings.pipeline.window.entity),
            rate=args.rate,
            speed=args.speed,
            window=None if window.unbounded else window,
            skip_invalid=args.skip_invalid,
            events=settings.pipeline.events,
            checkpoint=checkpoint,
            resume=args.resume,
            restart=args.restart,
            progress=progress,
            progress_interval_s=progress.every_s if progress else 1.0,
            lines_total=None if progress is None else count_lines(args.log),
        )
    except KeyboardInterrupt:
        print(f"\nreplay interrupted; continue it with --resume (checkpoint {checkpoint})", file=sys.stderr)
        raise
    if progress is not None and report.line:
        progress(report, final=True)
    print(report.summary())
    return 0


def rewind(args: argparse.Namespace) -> int:
    """`stream-adapt rewind`: refuses a group with active members (exit 1), else moves and reports."""
    from stream_adapt.cli import overrides_from_args

    settings = load_settings(args.config, overrides_from_args(args))
    from stream_adapt.rewind import rewind_group

    kafka = settings.kafka
    report = rewind_group(kafka, kafka.group, kafka.topic, args.to, dry_run=args.dry_run, timeout_s=args.timeout)
    print(report.describe())
    return 0


def _start_from(args: argparse.Namespace, settings: Settings) -> None:
    """`run --start-from`: rewind the group before this member joins it (refused if others are in it)."""
    if getattr(args, "start_from", None) is None:
        return
    from stream_adapt.rewind import rewind_group

    kafka = settings.kafka
    print(rewind_group(kafka, kafka.group, kafka.topic, args.start_from).describe(), file=sys.stderr)


def demo(args: argparse.Namespace) -> int:
    from stream_adapt.demo import run_demo

    return run_demo(
        args.out,
        seed=args.seed,
        seconds=args.seconds,
        partitions=args.partitions,
        offline=args.offline,
        metrics_port=getattr(args, "metrics_port", 0),
    )


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{flag} expects comma-separated integers, got {text!r}") from None
    if not values:
        raise ConfigError(f"{flag} is empty")
    return values


def evaluate(args: argparse.Namespace) -> int:
    """`stream-adapt evaluate`: one protocol, every seed, baselines on the same splits; writes the report."""
    from stream_adapt.cli import overrides_from_args

    settings = load_settings(args.config, overrides_from_args(args))
    seeds, shots = _int_list(args.seeds, "--seeds"), _int_list(args.eval_shots, "--shots")
    if args.eval_batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.eval_batch_size}")

    from stream_adapt.datasets import load_events
    from stream_adapt.evaluate import EvalSettings, write_report
    from stream_adapt.evaluate import evaluate as run_evaluation
    from stream_adapt.evaluate.harness import override_dataclass
    from stream_adapt.learning.pretrain import PretrainConfig

    pretrain_items = list(args.pretrain_set or []) + (["meta={}"] if args.meta_init else [])
    try:
        pretrain_cfg = override_dataclass(PretrainConfig(), pretrain_items)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"--pretrain-set: {exc}") from exc
    eval_settings = EvalSettings(
        seeds=seeds,
        shots=shots,
        pretrain=pretrain_cfg,
        pipeline=settings.pipeline,
        prequential_fraction=args.pretrain_fraction,
        cold_fraction=args.cold_fraction,
        batch_size=args.eval_batch_size,
        validation=args.validation,
    )
    events, bad = load_events(args.events, args.format)
    print(f"read {len(events)} events from {args.events} ({len(bad)} invalid lines skipped)", file=sys.stderr)

    def progress(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr)

    try:
        evaluation = run_evaluation(args.protocol, events, eval_settings, progress)
    except ValueError as exc:
        raise ConfigError(f"cannot evaluate {args.events} with protocol {args.protocol}: {exc}") from exc
    paths = write_report(evaluation, args.report, plots_wanted=not args.no_plots)
    print(paths[1].read_text())
    print(f"wrote {', '.join(str(p) for p in paths)} in {evaluation.runtime_s:.0f}s", file=sys.stderr)
    return 0
