"""The `stream-adapt` command: parses arguments, builds configuration, wires the parts, runs.

Subcommands: run, demo, topics, audit, replay, rewind, pretrain, evaluate, synth, config, schemas
(`stream-adapt COMMAND --help`). Configuration comes from `--config FILE` (TOML or JSON),
STREAM_ADAPT_* environment variables, `--set section.key=value` and shortcut flags, in rising
precedence. Errors print one clear message and exit non-zero: 2 for usage and
configuration, 1 for everything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stream_adapt import __version__
from stream_adapt.errors import ConfigError, StreamAdaptError

log = logging.getLogger("stream_adapt")

# Shortcut flags of `run`: flag -> dotted settings path.
SHORTCUTS: dict[str, str] = {
    "entity": "pipeline.window.entity",
    "shots": "pipeline.window.shots",
    "query_shots": "pipeline.window.query_shots",
    "max_entities": "pipeline.window.max_entities",
    "steps": "pipeline.adapt.steps",
    "lr": "pipeline.adapt.lr",
    "optimizer": "pipeline.adapt.optimizer",
    "entity_detector": "pipeline.drift.entity_detector.kind",
    "global_detector": "pipeline.drift.global_detector.kind",
    "batch_size": "batch_size",
    "bootstrap_servers": "kafka.bootstrap_servers",
    "topic": "kafka.topic",
    "model_topic": "kafka.model_topic",
    "group": "kafka.group",
    "exactly_once": "kafka.exactly_once",
    "instance_id": "instance_id",
    "metrics_port": "metrics_port",
}


def _set_path(target: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = value


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Settings overrides from `--set` and the shortcut flags."""
    out: dict[str, Any] = {}
    for item in getattr(args, "set", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        _set_path(out, key.strip(), _parse_value(value))
    for flag, dotted in SHORTCUTS.items():
        value = getattr(args, flag, None)
        if value is not None:
            _set_path(out, dotted, value)
    return out


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="configuration file (TOML or JSON)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any setting by dotted path, e.g. --set pipeline.adapt.l2=0.05 (repeatable)",
    )
    g = p.add_argument_group("shortcuts")
    g.add_argument("--entity", choices=["user", "item"], help="adapt per user (default) or per item")
    g.add_argument("--shots", type=int, help="K: events per window")
    g.add_argument("--query-shots", type=int, help="Q: last events of a window used by the gate")
    g.add_argument("--max-entities", type=int, help="open windows kept (LRU bound)")
    g.add_argument("--steps", type=int, help="gradient steps per adaptation")
    g.add_argument("--lr", type=float, help="adaptation learning rate")
    g.add_argument("--optimizer", choices=["sgd", "adam"])
    g.add_argument("--entity-detector", choices=["adwin", "page_hinkley", "kswin", "none"], help="per-entity drift")
    g.add_argument("--global-detector", choices=["adwin", "page_hinkley", "kswin", "none"], help="global drift")
    g.add_argument("--batch-size", type=int, help="records per poll")
    k = p.add_argument_group("kafka")
    k.add_argument("--bootstrap-servers", help="Kafka bootstrap servers (host:port,...)")
    k.add_argument("--topic", help="input topic of feedback events, keyed by entity id")
    k.add_argument("--model-topic", help="compacted topic the adapters are published to")
    k.add_argument("--group", help="consumer group: run more instances with the same group to scale out")
    k.add_argument(
        "--exactly-once", action="store_const", const=True, help="outputs and offsets in one Kafka transaction"
    )
    k.add_argument("--instance-id", help="this member's name (default: host name; distinct per member on one host)")
    k.add_argument("--metrics-port", type=int, help="serve /metrics, /healthz and /readyz on this port (0: any free)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream-adapt",
        description="A Kafka consumer for recommenders that learns while it serves.",
    )
    parser.add_argument("--version", action="version", version=f"stream-adapt {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic history and live stream with known drift")
    p.add_argument("--out", type=Path, required=True, help="directory for history.jsonl, live.jsonl, truth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--users", type=int, help="number of users (default 1000)")
    p.add_argument("--items", type=int, help="number of items (default 500)")

    p = sub.add_parser("pretrain", help="train the base recommender from an event log")
    p.add_argument("--events", type=Path, required=True, help="event log (JSONL, CSV, MovieLens formats, .gz)")
    p.add_argument("--format", default="auto", help="jsonl, csv, movielens, ml-latest, recbole or auto")
    p.add_argument("--out", type=Path, required=True, help="model directory to write")
    p.add_argument("--entity", choices=["user", "item"], default="user", help="which side gets adapters")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--lora-rank", type=int, default=0, help="per-entity low-rank delta on the head (0: off)")
    p.add_argument(
        "--meta-init",
        action="store_true",
        help="also meta-learn the cold-start adapter and step sizes on the history (MAML on the adapter)",
    )
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser(
        "evaluate", help="score adaptation against baselines on an event log (prequential, cold-start, MeLU)"
    )
    p.add_argument("--events", type=Path, required=True, help="event log (JSONL, CSV, MovieLens formats, .gz)")
    p.add_argument("--format", default="auto", help="jsonl, csv, movielens, ml-latest, recbole or auto")
    p.add_argument("--protocol", required=True, choices=["prequential", "cold-start", "melu"])
    p.add_argument("--report", type=Path, required=True, help="directory for report.json, report.md and PNG plots")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    # dest names of their own: `shots` and `batch_size` are shortcut flags of `run` (see SHORTCUTS)
    p.add_argument(
        "--shots", dest="eval_shots", metavar="K,...", default="1,3,5,10", help="cold-start: support sizes K"
    )
    p.add_argument("--pretrain-fraction", type=float, default=0.5, help="prequential: share of the log that pretrains")
    p.add_argument("--cold-fraction", type=float, default=0.2, help="cold-start: share of users, latest arrivals")
    p.add_argument(
        "--batch-size",
        dest="eval_batch_size",
        metavar="N",
        type=int,
        default=1000,
        help="records per pipeline batch (plot bin)",
    )
    p.add_argument(
        "--pretrain-set",
        action="append",
        metavar="KEY=VALUE",
        help="override a PretrainConfig field, VALUE as JSON, e.g. --pretrain-set epochs=8 (repeatable)",
    )
    p.add_argument(
        "--meta-init",
        action="store_true",
        help="pretrain with the meta-learned cold start (= --pretrain-set 'meta={}')",
    )
    p.add_argument("--no-plots", action="store_true", help="write report.json and report.md only")
    p.add_argument(
        "--validation",
        action="store_true",
        help="run the protocol on the test split's warm data only (tune settings here, then test once)",
    )
    p.add_argument("--config", type=Path, help="configuration file (TOML or JSON): its pipeline section is used")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a setting, e.g. pipeline.adapt.lr=0.05"
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")

    p = sub.add_parser("run", help="run the service: consume, adapt, publish")
    p.add_argument("--model", type=Path, required=True, help="model directory written by `pretrain`")
    p.add_argument("--model-plugin", help="use your own model: package.module:factory (gets --model)")
    p.add_argument("--source", required=True, help="kafka (the input topic), or file:PATH (an event log)")
    p.add_argument("--format", default="auto", help="format of a file source")
    p.add_argument("--sink", required=True, help="kafka (model, log, dead-letter topics), or dir:OUT")
    p.add_argument("--summary-json", type=Path, help="also write the run summary as JSON here")
    p.add_argument("--no-drain", action="store_true", help="leave open windows pending at the end of a file")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument(
        "--start-from",
        metavar="TIMESTAMP",
        help="first rewind the group to this record time (ISO-8601 or epoch seconds; as `rewind`); kafka source only",
    )
    _add_config_args(p)

    p = sub.add_parser("replay", help="produce an event log into a topic: keyed by entity, event-time stamped, paced")
    p.add_argument("log", type=Path, help="event log (JSONL, CSV, MovieLens formats, .gz)")
    p.add_argument("--format", default="auto", help="jsonl, csv, movielens, ml-latest, recbole or auto")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=float, help="records per second (default: as fast as possible)")
    pace.add_argument("--speed", type=float, help="X times the log's own pace (60: an hour of events per minute)")
    p.add_argument("--since", metavar="TIMESTAMP", help="only events at or after this time (ISO-8601 or epoch seconds)")
    p.add_argument("--until", metavar="TIMESTAMP", help="only events before this time")
    p.add_argument("--entity", choices=["user", "item"], help="key by this id (default: pipeline.window.entity)")
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        default=None,
        help="hold back lines that fail validation (default: send them; the service dead-letters them)",
    )
    p.add_argument("--checkpoint", type=Path, help="checkpoint file (default: LOG.replay-<topic>.json beside the log)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue an interrupted replay; nothing is sent twice")
    again.add_argument("--restart", action="store_true", help="drop an unfinished checkpoint; send the whole log again")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--config", type=Path, help="configuration file (TOML or JSON): its kafka section is used")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting, e.g. kafka.extra=...")
    p.add_argument("--bootstrap-servers", help="Kafka bootstrap servers (host:port,...)")
    p.add_argument("--topic", help="topic to produce to (default: kafka.topic)")

    p = sub.add_parser("rewind", help="move a stopped consumer group's offsets to a point in record time")
    p.add_argument("--to", required=True, metavar="TIMESTAMP", help="ISO-8601 or epoch seconds: first record at/after")
    p.add_argument("--dry-run", action="store_true", help="show the offsets it would set; move nothing")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds allowed for each Kafka request (default 30)")
    p.add_argument("--config", type=Path, help="configuration file (TOML or JSON): its kafka section is used")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting, e.g. kafka.extra=...")
    p.add_argument("--bootstrap-servers", help="Kafka bootstrap servers (host:port,...)")
    p.add_argument("--topic", help="the group's input topic (default: kafka.topic)")
    p.add_argument("--group", help="the consumer group (default: kafka.group)")

    p = sub.add_parser("demo", help="embedded broker, synthetic data, pretrain, stream it through the service, summary")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="working directory (default demo-out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seconds", type=float, default=20.0, help="spread the live stream over this long (0: flat out)")
    p.add_argument("--partitions", type=int, default=4, help="partitions of the demo topics")
    p.add_argument("--offline", action="store_true", help="no broker: file source and directory sink")
    p.add_argument("--metrics-port", type=int, default=0, help="serve /metrics during the run (default: any free port)")

    p = sub.add_parser("audit", help="prove from the topics that no feedback was lost or applied twice")
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    _add_config_args(p)

    p = sub.add_parser("topics", help="Kafka topics of the service")
    sp = p.add_subparsers(dest="topics_command", required=True, metavar="ACTION")
    t = sp.add_parser("create", help="create the input, model, adaptation-log and dead-letter topics")
    t.add_argument("--partitions", type=int, default=6, help="partitions of every topic (input = model topic)")
    t.add_argument("--replication", type=int, default=-1, help="replication factor (-1: the broker's default)")
    _add_config_args(t)

    p = sub.add_parser("config", help="show the effective configuration, or the reference of every setting")
    sp = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = sp.add_parser("show", help="print the effective settings as JSON (secrets masked)")
    _add_config_args(show)
    sp.add_parser("reference", help="print every setting with its default and meaning (Markdown)")

    p = sub.add_parser("schemas", help="JSON Schemas of the wire formats")
    sp = p.add_subparsers(dest="schemas_command", required=True, metavar="ACTION")
    e = sp.add_parser("export", help="write the JSON Schema files")
    e.add_argument("directory", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"stream-adapt: {exc}", file=sys.stderr)
        return 2
    except StreamAdaptError as exc:
        print(f"stream-adapt: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stream-adapt: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from stream_adapt import commands

    if args.command == "config":
        print(commands.config_show(args) if args.config_command == "show" else commands.config_reference())
        return 0
    if args.command == "schemas":
        for path in commands.export_schemas(args.directory):
            print(path)
        return 0
    handler = {
        "audit": commands.audit,
        "topics": commands.topics,
        "synth": commands.synth,
        "pretrain": commands.pretrain,
        "run": commands.run,
        "demo": commands.demo,
        "replay": commands.replay,
        "rewind": commands.rewind,
        "evaluate": commands.evaluate,
    }[args.command]
    return handler(args)
