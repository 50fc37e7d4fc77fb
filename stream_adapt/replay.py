"""Replay an event log into a Kafka topic: keyed by entity, stamped with event time, paced, resumable.

What a replayed record looks like, and why:
- key = the entity id (user id by default), so one entity's events stay in one partition and in file
  order (the service's co-partitioning requirement). The partitioner is `murmur2_random`, Java's, so a
  replayed key lands where a Java or Kafka Streams producer would put it.
- timestamp = the event's time, so a consumer group can later be rewound to a point in *event* time
  (`stream-adapt rewind`). The input topic must use `message.timestamp.type=CreateTime` (the default);
  with time-based retention, records of an old log are due for deletion as soon as their segment rolls.
- value = the line as JSON bytes (`datasets.iter_records` converts the other formats).

What is sent: lines that cannot be parsed into fields (wrong column count, not a number, not UTF-8, too
long) are reported with their line number and never sent: a replay tool should not send what it knows
is broken. Lines that parse but fail validation (`events.decode`: a rating of 11, an unknown event
type) ARE sent by default: validation belongs to the service, which dead-letters them with a reason
(the demo relies on it); the report counts them, and `skip_invalid=True` keeps them back instead.

Pacing (`Pacer`): as fast as possible, `rate` records per second, or `speed` times the log's own
event-time gaps. The schedule is absolute (record n is due at start + n / rate): after a stall the
replay catches up instead of drifting. `since`/`until` (`TimeWindow`) select events by event time.

Resume (`checkpoint`): a JSON file records the next line to handle, written only after the producer
confirmed delivery of every record before it. A checkpoint alone would resend what was delivered
after it and before a crash, so every record also carries a header `stream-adapt.replay:
<replay id>:<line>`, and `resume=True` first reads the topic from the checkpoint's offsets to its end
and skips the lines it finds there: nothing is sent twice, even after SIGKILL. This rests on the
idempotent producer keeping each partition's records in produce order without gaps.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import json
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TextIO

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from stream_adapt.config import EventsConfig, KafkaConfig
from stream_adapt.datasets import AUTO, detect_format, iter_records
from stream_adapt.errors import ConfigError, StreamAdaptError
from stream_adapt.events import DecodeError, FeedbackEvent, decode
from stream_adapt.io.admin import client_config

log = logging.getLogger(__name__)

#: Header on every record of a checkpointed replay: b"<replay id>:<line number>".
REPLAY_HEADER: Final = "stream-adapt.replay"
CHECKPOINT_VERSION: Final = 1
#: Group id of the replay's read-only consumer (watermarks, the resume scan): never joined, never committed.
_READER_GROUP: Final = "stream-adapt.replay-reader"
_FIRST_BAD_KEPT: Final = 20
#: Epoch values above this are taken for milliseconds by mistake (year 5138 in seconds).
_MAX_EPOCH_S: Final = 1e11


class ReplayError(StreamAdaptError):
    """A replay cannot start or continue (checkpoint mismatch, another replay running, delivery failed)."""


# --------------------------------------------------------------------------------------------- time


def parse_timestamp(text: str) -> float:
    """Seconds since the epoch from ISO-8601 (`2024-03-01`, `2024-03-01T12:00:00+01:00`, `...Z`) or
    epoch seconds (`1709251200`, `1709251200.5`). ISO without an offset is UTC, never local time:
    the same command must mean the same instant on every machine. Raises `ConfigError` (a usage error)."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"timestamp {text!r}: expected epoch seconds >= 0")
        if value > _MAX_EPOCH_S:
            raise ConfigError(f"timestamp {text!r} looks like milliseconds; give epoch seconds or ISO-8601")
        return value
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"timestamp {text!r}: expected ISO-8601 (e.g. 2024-03-01T12:00:00Z) or epoch seconds"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def format_timestamp(seconds: float) -> str:
    """ISO-8601 in UTC, for messages."""
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """Events with `since <= event time < until` (either bound optional), in epoch seconds.

    With a bound set, a line without a usable timestamp is outside: the window selects by time, and a
    record without one cannot be placed in it. Without bounds everything is inside.
    """

    since: float | None = None
    until: float | None = None

    def __post_init__(self) -> None:
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ConfigError(
                f"--since {format_timestamp(self.since)} is not before --until {format_timestamp(self.until)}"
            )

    @property
    def unbounded(self) -> bool:
        return self.since is None and self.until is None

    def __contains__(self, event_time: float | None) -> bool:
        if self.unbounded:
            return True
        if event_time is None:
            return False
        return (self.since is None or event_time >= self.since) and (self.until is None or event_time < self.until)


# ------------------------------------------------------------------------------------------- pacing


class Pacer:
    """When each record is due: as fast as possible, `rate` per second, or `speed` x event-time gaps.

    The schedule is absolute, anchored at the first record: with `rate`, record n (0-based) is due at
    `start + n / rate`; with `speed`, a record of event time e is due at `start + (e - e0) / speed`, e0
    being the first record's event time. A record earlier in event time than one already sent, or one
    without an event time, is due at once (time does not go back). `clock` and `sleep` are injectable
    so the schedule is tested with a fake clock; `wait` sleeps in slices of at most `max_sleep_s` and
    calls `tick` between them, so a long gap in the log does not freeze progress or checkpoints.
    """

    def __init__(
        self,
        *,
        rate: float | None = None,
        speed: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
        max_sleep_s: float = 0.5,
        tick: Callable[[], None] | None = None,
    ) -> None:
        if rate is not None and speed is not None:
            raise ConfigError("pace by --rate or by --speed, not both")
        if rate is not None and not (rate > 0 and math.isfinite(rate)):
            raise ConfigError(f"--rate must be a positive number of records per second, got {rate}")
        if speed is not None and not (speed > 0 and math.isfinite(speed)):
            raise ConfigError(f"--speed must be a positive factor of the original time, got {speed}")
        self.rate, self.speed = rate, speed
        self._clock, self._sleep, self._max_sleep, self._tick = clock, sleep, max_sleep_s, tick
        self._start: float | None = None
        self._first_event: float | None = None
        self._count = 0
        self.waited_s = 0.0

    @property
    def paced(self) -> bool:
        return self.rate is not None or self.speed is not None

    def due(self, event_time: float | None) -> float:
        """The clock time at which the next record (of `event_time`) is due; counts the record."""
        now = self._clock()
        if self._start is None:
            self._start = now
        start = self._start
        n, self._count = self._count, self._count + 1
        if self.rate is not None:
            return start + n / self.rate
        if self.speed is not None and event_time is not None:
            if self._first_event is None:
                self._first_event = event_time
            return start + (event_time - self._first_event) / self.speed
        return now

    def wait(self, event_time: float | None = None) -> float:
        """Block until the next record is due; returns the seconds waited."""
        if not self.paced:
            return 0.0
        target = self.due(event_time)
        waited = 0.0
        while (left := target - self._clock()) > 0:
            step = min(left, self._max_sleep)
            self._sleep(step)
            waited += step
            if self._tick is not None:
                self._tick()
        self.waited_s += waited
        return waited


# --------------------------------------------------------------------------------------- checkpoint


def default_checkpoint_path(log_path: Path, topic: str) -> Path:
    """Next to the log, one per target topic: `LOG.replay-<topic>.json`."""
    return log_path.with_name(f"{log_path.name}.replay-{topic}.json")


@dataclass
class Checkpoint:
    """Where a replay stands; written atomically (temp file, fsync, rename), so it is whole or absent.

    `next_line` (1-based): every line before it is handled: sent and confirmed by the broker, or not to
    be sent (bad, invalid with skip_invalid, outside the window). `scan_from`: per partition, an offset
    at or below which no record of this replay sent after `next_line` can lie: resume reads from there.
    """

    replay_id: str
    log: str
    log_bytes: int
    topic: str
    fmt: str
    entity: str
    since: float | None
    until: float | None
    skip_invalid: bool
    next_line: int = 1
    scan_from: dict[int, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    complete: bool = False
    updated_at: float = 0.0
    version: int = CHECKPOINT_VERSION

    def save(self, path: Path) -> None:
        self.updated_at = time.time()
        data = asdict(self)
        data["scan_from"] = {str(p): o for p, o in sorted(self.scan_from.items())}
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        try:
            data = json.loads(path.read_text())
            if data.get("version") != CHECKPOINT_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {CHECKPOINT_VERSION}")
            data["scan_from"] = {int(p): int(o) for p, o in data["scan_from"].items()}
            return cls(**data)
        except FileNotFoundError:
            raise
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ReplayError(f"checkpoint {path} is unreadable ({exc}); delete it to start over") from exc


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock beside the checkpoint: two replays resuming one checkpoint would both send
    the same lines. The OS releases it when the process dies, even by SIGKILL."""
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ReplayError(f"another replay holds {lock_path}: wait for it or stop it first") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------- report


@dataclass
class ReplayReport:
    """What one `replay_file` call did (this run), plus what earlier runs of a resumed replay did."""

    sent: int = 0  # records produced and confirmed by this run
    bad_lines: int = 0  # lines that could not be parsed: never sent
    first_bad: list[str] = field(default_factory=list)  # "<file>:<line>: detail" of the first few
    seconds: float = 0.0
    invalid: int = 0  # of `sent` (and `already_delivered`): fail validation, the service dead-letters them
    skipped_invalid: int = 0  # invalid and held back (skip_invalid)
    outside_window: int = 0  # not in since/until
    already_delivered: int = 0  # resume: found in the topic after the checkpoint, so not sent again
    line: int = 0  # the last line read
    lines_total: int | None = None  # for progress, when the caller counted them
    resumed_at: int | None = None  # the line this run started from, when resuming
    earlier: dict[str, int] = field(default_factory=dict)  # counts of the runs before the checkpoint
    checkpoint: Path | None = None
    complete: bool = False
    topic: str = ""
    waited_s: float = 0.0  # time spent waiting for the pace

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0

    @property
    def total_sent(self) -> int:
        """Records of the whole replay in the topic: earlier runs, found again, and sent now."""
        return self.earlier.get("sent", 0) + self.already_delivered + self.sent

    def counts(self) -> dict[str, int]:
        """Cumulative counts as a checkpoint keeps them (earlier runs plus this one)."""
        mine = {
            "sent": self.sent + self.already_delivered,
            "invalid": self.invalid,
            "bad_lines": self.bad_lines,
            "skipped_invalid": self.skipped_invalid,
            "outside_window": self.outside_window,
        }
        return {k: self.earlier.get(k, 0) + v for k, v in mine.items()}

    def summary(self) -> str:
        """The human summary the CLI prints on stdout."""
        total = self.counts()
        lines = [f"replay into {self.topic!r}: " + ("complete" if self.complete else "stopped")]
        if self.resumed_at is not None:
            lines.append(
                f"  resumed at line {self.resumed_at}: {self.earlier.get('sent', 0)} records sent before the "
                f"checkpoint, {self.already_delivered} found in the topic after it (not sent again)"
            )
        lines.append(
            f"  sent {self.sent} records in {self.seconds:.1f}s ({self.rate:.0f}/s); lines read up to {self.line}"
        )
        if self.invalid:
            lines.append(
                f"    of which {self.invalid} fail validation and will be dead-lettered by the service "
                "(--skip-invalid holds them back)"
            )
        if self.skipped_invalid:
            lines.append(f"  held back {self.skipped_invalid} records that fail validation (--skip-invalid)")
        if self.outside_window:
            lines.append(f"  skipped {self.outside_window} events outside --since/--until")
        if self.bad_lines:
            lines.append(f"  bad lines: {self.bad_lines}, not sent (cannot be parsed):")
            lines += [f"    {b}" for b in self.first_bad]
            if self.bad_lines > len(self.first_bad):
                lines.append(f"    ... and {self.bad_lines - len(self.first_bad)} more")
        if self.resumed_at is not None:
            lines.append(
                f"  whole replay: {total['sent']} records in the topic, {total['invalid']} of them invalid; "
                f"{total['bad_lines']} bad lines"
            )
        if self.checkpoint is not None:
            state = "complete" if self.complete else "resume with --resume"
            lines.append(f"  checkpoint {self.checkpoint} ({state})")
        return "\n".join(lines)


class ProgressLine:
    """Progress on a terminal: one updating line (`\\r`) on a TTY, else a plain line every `every_s`.

    Shows lines read (and the share of the file), records sent, the send rate and an ETA from the line
    rate so far (paced or not, lines left / lines per second).
    """

    def __init__(self, stream: TextIO | None = None, *, every_s: float | None = None, tty: bool | None = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.every_s = every_s if every_s is not None else (0.25 if self.tty else 5.0)
        self._last = -math.inf
        self._width = 0

    def __call__(self, report: ReplayReport, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last < self.every_s:
            return
        self._last = now
        text = self.render(report)
        if self.tty:
            pad = max(0, self._width - len(text))
            self._width = len(text)
            self.stream.write("\r" + text + " " * pad + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    @staticmethod
    def render(report: ReplayReport) -> str:
        rate = report.sent / report.seconds if report.seconds > 0 else 0.0
        start = report.resumed_at or 1
        done_lines = max(0, report.line - start + 1)
        total = report.lines_total
        if total:
            share = min(1.0, report.line / total)
            bar = "#" * int(share * 20)
            head = f"[{bar:<20}] {100 * share:3.0f}%  line {report.line}/{total}"
        else:
            head = f"line {report.line}"
        eta = ""
        if total and report.seconds > 0 and done_lines:
            left = max(0, total - report.line) * report.seconds / done_lines
            eta = f"  ETA {int(left) // 3600}:{int(left) % 3600 // 60:02d}:{int(left) % 60:02d}"
        bad = f"  bad {report.bad_lines}" if report.bad_lines else ""
        return f"  {head}  sent {report.sent}  {rate:,.0f}/s{eta}{bad}"


def count_lines(path: Path) -> int:
    """Lines in a (possibly gzipped) file, for the progress bar: a fast pass over 1 MiB chunks."""
    n, last = 0, b"\n"
    with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


# --------------------------------------------------------------------------------------- the replay


def _key_and_time(raw: bytes, entity_field: str) -> tuple[bytes | None, float | None]:
    """Key and event time of a line that failed validation: best effort, so the service still gets it
    in the entity's partition and at its time when those two fields are usable."""
    try:
        event = json.loads(raw)
    except ValueError:
        return None, None
    if not isinstance(event, dict):
        return None, None
    entity, ts = event.get(entity_field), event.get("timestamp")
    key = str(entity).encode() if entity is not None and not isinstance(entity, dict | list) else None
    stamp = float(ts) if isinstance(ts, int | float) and not isinstance(ts, bool) and 0 < ts < _MAX_EPOCH_S else None
    return key, stamp


def _reader(kafka: KafkaConfig, overrides: Mapping[str, Any] | None) -> Consumer:
    config = client_config(kafka, **{"group.id": _READER_GROUP, "fetch.wait.max.ms": 50, **(overrides or {})})
    config.update({"enable.partition.eof": True, "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    return Consumer(config)


def _partitions(consumer: Consumer, kafka: KafkaConfig, topic: str, timeout_s: float) -> list[int]:
    try:
        metadata = consumer.list_topics(topic, timeout=timeout_s)
    except KafkaException as exc:
        raise ReplayError(f"Kafka at {kafka.bootstrap_servers} not reachable within {timeout_s:g}s: {exc}") from None
    info = metadata.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        raise ReplayError(
            f"topic {topic!r} does not exist at {kafka.bootstrap_servers} "
            "(create it: stream-adapt topics create --topic ...)"
        )
    return sorted(info.partitions)


def _end_lower_bounds(consumer: Consumer, topic: str, partitions: list[int], timeout_s: float) -> dict[int, int]:
    """Per partition, an offset at or below where the next record will land.

    ListOffsets "latest" (get_watermark_offsets) is exact on Kafka; Tansu answers the newest batch's
    base offset + 1, which is lower than the end, never higher: still a valid starting point to scan
    from (it only reads a little more)."""
    return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)[1] for p in partitions}


def _scan_delivered(
    consumer: Consumer, topic: str, scan_from: dict[int, int], partitions: list[int], replay_id: str, timeout_s: float
) -> tuple[set[int], dict[int, int]]:
    """Lines of replay `replay_id` present in the topic from `scan_from` to the end, and each partition's
    end (the offset its end-of-partition event reported: a lower bound for records sent from now on)."""
    consumer.assign([TopicPartition(topic, p, max(0, scan_from.get(p, 0))) for p in partitions])
    prefix = replay_id.encode() + b":"
    found: set[int] = set()
    ends: dict[int, int] = {}
    deadline = time.monotonic() + timeout_s
    while len(ends) < len(partitions):
        left = deadline - time.monotonic()
        if left <= 0:
            missing = sorted(set(partitions) - set(ends))
            raise ReplayError(f"resume: could not read partitions {missing} of {topic!r} to the end in {timeout_s:g}s")
        for msg in consumer.consume(num_messages=1000, timeout=min(left, 0.5)):
            err = msg.error()
            partition = msg.partition()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF and partition is not None:
                    ends.setdefault(partition, msg.offset() or 0)
                elif err.fatal() or err.code() in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_PARTITION):
                    raise ReplayError(f"resume: cannot read {topic!r}: {err.str()}")
                continue
            if partition in ends:
                continue  # appended after we reached the end: not ours (the earlier run is gone)
            headers = msg.headers() or []
            for name, value in headers.items() if isinstance(headers, dict) else headers:
                if name == REPLAY_HEADER and isinstance(value, bytes) and value.startswith(prefix):
                    found.add(int(value[len(prefix) :]))
    return found, ends


def replay_file(
    path: Path,
    kafka: KafkaConfig,
    *,
    topic: str | None = None,
    fmt: str = AUTO,
    entity: str | None = None,
    rate: float | None = None,
    speed: float | None = None,
    window: TimeWindow | None = None,
    skip_invalid: bool | None = None,
    events: EventsConfig | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    restart: bool = False,
    progress: Callable[[ReplayReport], None] | None = None,
    progress_interval_s: float = 1.0,
    checkpoint_interval_s: float = 2.0,
    lines_total: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    flush_timeout_s: float = 60.0,
    timeout_s: float = 30.0,
) -> ReplayReport:
    """Produce the lines of `path` to `topic` (default `kafka.topic`); see the module docstring.

    - `entity`: "user" (default) or "item": whose id is the key.
    - `rate` (records/s) or `speed` (x event time): pacing; neither: as fast as possible.
    - `window`: only events in `[since, until)` of event time.
    - `skip_invalid`: hold back lines that parse but fail `events.decode` (default: send them, counted).
    - `events`: the validation limits to count with (default: the service's defaults).
    - `checkpoint`: keep a resume checkpoint there (None: no checkpoint, no replay header).
      `resume=True` continues from it (an existing complete checkpoint: nothing to do); without
      `resume`, an unfinished checkpoint is an error unless `restart=True` (start over).
      On resume, the checkpoint's topic, format, entity, window and skip_invalid hold; passing a
      different value raises `ReplayError`.
    - `progress(report)`: called at most every `progress_interval_s`; an exception from it stops the
      replay after flushing what was produced and saving the checkpoint (so it can be resumed).
    Raises `ReplayError`/`StreamAdaptError` when Kafka cannot be reached, the topic is missing or a
    record is not delivered within `flush_timeout_s`; the checkpoint then stays at the last confirmed line.
    """
    path = Path(path)
    if not path.is_file():
        raise ReplayError(f"{path}: no such file")
    opts = _Options(
        rate=rate,
        speed=speed,
        events=events or EventsConfig(),
        progress=progress,
        progress_interval_s=progress_interval_s,
        checkpoint_interval_s=checkpoint_interval_s,
        lines_total=lines_total,
        overrides=overrides,
        flush_timeout_s=flush_timeout_s,
        timeout_s=timeout_s,
    )
    if checkpoint is None:
        if resume:
            raise ReplayError("resume needs a checkpoint")
        selection = _Selection(topic or kafka.topic, fmt, entity or "user", window or TimeWindow(), bool(skip_invalid))
        return _Replay(path, kafka, selection, opts, None, None).run()
    checkpoint = Path(checkpoint)
    with _exclusive(checkpoint.with_name(checkpoint.name + ".lock")):
        state: Checkpoint | None = None
        if checkpoint.exists():
            state = Checkpoint.load(checkpoint)
            if not resume and not state.complete and not restart:
                raise ReplayError(
                    f"checkpoint {checkpoint}: an earlier replay of {state.log} into {state.topic!r} stopped at line "
                    f"{state.next_line}: pass --resume to continue it, or --restart to send the whole log again"
                )
            if not resume:
                if state.complete:
                    log.warning(
                        "checkpoint %s: an earlier replay of this log into %r completed; sending the whole log again",
                        checkpoint,
                        state.topic,
                    )
                state = None
        elif resume:
            raise ReplayError(f"nothing to resume: no checkpoint at {checkpoint} (start without --resume)")
        if state is not None:
            selection = _resume_selection(state, path, topic, fmt, entity, window, skip_invalid)
        else:
            selection = _Selection(
                topic or kafka.topic, fmt, entity or "user", window or TimeWindow(), bool(skip_invalid)
            )
        return _Replay(path, kafka, selection, opts, checkpoint, state).run()


@dataclass(frozen=True, slots=True)
class _Selection:
    """What is sent where and how it is keyed: fixed for the life of a replay, resumes included."""

    topic: str
    fmt: str
    entity: str
    window: TimeWindow
    skip_invalid: bool


@dataclass(frozen=True, slots=True)
class _Options:
    """How a run goes: free to change between a run and its resume."""

    rate: float | None
    speed: float | None
    events: EventsConfig
    progress: Callable[[ReplayReport], None] | None
    progress_interval_s: float
    checkpoint_interval_s: float
    lines_total: int | None
    overrides: Mapping[str, Any] | None
    flush_timeout_s: float
    timeout_s: float


def _resume_selection(
    state: Checkpoint,
    path: Path,
    topic: str | None,
    fmt: str,
    entity: str | None,
    window: TimeWindow | None,
    skip_invalid: bool | None,
) -> _Selection:
    """The checkpoint's selection, after checking that the caller does not ask for a different one: a
    resumed replay must select and key lines exactly as the interrupted one did, or lines would be
    sent twice or never."""
    size = path.stat().st_size
    if size < state.log_bytes:
        raise ReplayError(f"{path} is smaller than when the checkpoint was made ({size} < {state.log_bytes} bytes)")
    given = {
        "topic": (topic, state.topic),
        "format": (None if fmt == AUTO else fmt, state.fmt),
        "entity": (entity, state.entity),
        "since": (window.since if window else None, state.since),
        "until": (window.until if window else None, state.until),
        "skip_invalid": (skip_invalid, state.skip_invalid),
    }
    conflicts = [
        f"{name} {mine!r} (checkpoint: {theirs!r})"
        for name, (mine, theirs) in given.items()
        if mine is not None and mine != theirs
    ]
    if conflicts:
        raise ReplayError("--resume must replay as the interrupted run did; different: " + ", ".join(conflicts))
    return _Selection(state.topic, state.fmt, state.entity, TimeWindow(state.since, state.until), state.skip_invalid)


class _Replay:
    """One run of `replay_file` (state shared by the loop, the delivery callback and housekeeping)."""

    def __init__(
        self,
        path: Path,
        kafka: KafkaConfig,
        selection: _Selection,
        opts: _Options,
        checkpoint_path: Path | None,
        state: Checkpoint | None,
    ) -> None:
        if selection.entity not in ("user", "item"):
            raise ConfigError(f"entity must be user or item, got {selection.entity!r}")
        self.path, self.kafka, self.opts = path, kafka, opts
        self.topic = selection.topic
        self.fmt = detect_format(path) if selection.fmt == AUTO else selection.fmt
        self.entity, self.window, self.skip_invalid = selection.entity, selection.window, selection.skip_invalid
        self.checkpoint_path, self.state = checkpoint_path, state
        self.report = ReplayReport(lines_total=opts.lines_total, checkpoint=checkpoint_path, topic=self.topic)
        self.pacer = Pacer(rate=opts.rate, speed=opts.speed, sleep=self._sleep, tick=self._housekeeping)
        self.failures: list[str] = []
        self.delivered_max: dict[int, int] = {}
        self.handled_through = 0  # last line fully handled (sent or decided not to be sent)
        self.producer: Producer | None = None
        self._start_clock()

    def _start_clock(self) -> None:
        self.t0 = time.monotonic()
        self._next_progress = self.t0 + self.opts.progress_interval_s
        self._next_checkpoint = self.t0 + self.opts.checkpoint_interval_s

    # ---- setup ------------------------------------------------------------------------------------
    def _producer(self) -> Producer:
        settings = {
            "enable.idempotence": True,  # retries keep per-partition order and never duplicate
            "linger.ms": 20,
            "compression.type": "lz4",
            "partitioner": "murmur2_random",  # Java's: the same key lands where a Java producer puts it
            **(self.opts.overrides or {}),
        }
        return Producer(client_config(self.kafka, **settings))

    def _prepare(self) -> tuple[str, set[int]]:
        """Check the topic, and for a checkpointed run, decide the replay id, where to start, what the
        topic already holds after the checkpoint; save the starting checkpoint before anything is sent."""
        reader = _reader(self.kafka, None)
        try:
            timeout_s = self.opts.timeout_s
            partitions = _partitions(reader, self.kafka, self.topic, timeout_s)
            if self.checkpoint_path is None:
                return "", set()
            if self.state is None:
                self.state = Checkpoint(
                    replay_id=uuid.uuid4().hex,
                    log=str(self.path),
                    log_bytes=self.path.stat().st_size,
                    topic=self.topic,
                    fmt=self.fmt,
                    entity=self.entity,
                    since=self.window.since,
                    until=self.window.until,
                    skip_invalid=self.skip_invalid,
                    scan_from=_end_lower_bounds(reader, self.topic, partitions, timeout_s),
                )
                self.state.save(self.checkpoint_path)
                return self.state.replay_id, set()
            state = self.state
            self.report.resumed_at = state.next_line
            self.report.earlier = dict(state.counts)
            found, ends = _scan_delivered(reader, self.topic, state.scan_from, partitions, state.replay_id, timeout_s)
            found = {line for line in found if line >= state.next_line}
            state.scan_from = {p: max(state.scan_from.get(p, 0), ends[p]) for p in partitions}
            log.info(
                "resuming %s at line %d: %d later lines already in %r",
                self.path,
                state.next_line,
                len(found),
                self.topic,
            )
            return state.replay_id, found
        finally:
            reader.close()

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self) -> ReplayReport:
        report = self.report
        if self.state is not None and self.state.complete:
            report.resumed_at, report.earlier, report.complete = self.state.next_line, dict(self.state.counts), True
            report.line = self.state.next_line - 1
            return report
        replay_id, already = self._prepare()
        self._start_clock()  # the rate is the replay's own, not the setup's (resume scan included)
        start_line = self.state.next_line if self.state is not None else 1
        self.handled_through = start_line - 1
        self.producer = self._producer()
        records = iter_records(self.path, self.fmt, start_offset=start_line - 1)
        try:
            self._loop(records, replay_id, already)
            self._confirm()
            report.complete = True
            self._save_checkpoint(complete=True)
        except BaseException:
            records.close()
            self._salvage()
            raise
        finally:
            report.seconds = time.monotonic() - self.t0
            report.waited_s = self.pacer.waited_s
            # Everything it produced is delivered or reported by now: release the client at once (its
            # connections too) rather than whenever a garbage collection finds it, which, with the broker
            # gone by then, logs a disconnection failure after the replay looked finished.
            self.producer = None
        return report

    def _loop(self, records: Iterator[Any], replay_id: str, already: set[int]) -> None:
        report, producer, topic = self.report, self.producer, self.topic
        assert producer is not None
        entity_field = f"{self.entity}_id"
        window, unbounded, skip_invalid = self.window, self.window.unbounded, self.skip_invalid
        max_bytes, max_future_s = self.opts.events.max_record_bytes, self.opts.events.max_future_s
        pacer, on_delivery = self.pacer, self._delivered
        header_prefix = replay_id.encode() + b":" if replay_id else b""
        for item in records:
            lineno = item.position[2] + 1
            report.line = lineno
            if isinstance(item, DecodeError):
                report.bad_lines += 1
                if len(report.first_bad) < _FIRST_BAD_KEPT:
                    report.first_bad.append(item.detail)
                    log.debug(
                        "bad line, not sent: %s", item.detail
                    )  # the summary lists them; a log line would break the progress bar
                self.handled_through = lineno
                self._maybe_housekeeping()
                continue
            event = decode(item.value, item.position, max_bytes=max_bytes, max_future_s=max_future_s)
            if isinstance(event, FeedbackEvent):
                key: bytes | None = getattr(event, entity_field).encode()
                event_time: float | None = event.timestamp
                valid = True
            else:
                key, event_time = _key_and_time(item.value, entity_field)
                valid = False
            if not unbounded and event_time not in window:
                report.outside_window += 1
            elif not valid and skip_invalid:
                report.skipped_invalid += 1
            elif lineno in already:
                report.already_delivered += 1
                report.invalid += not valid
            else:
                pacer.wait(event_time)
                kwargs: dict[str, Any] = {"key": key, "value": item.value, "on_delivery": on_delivery}
                if event_time is not None:
                    kwargs["timestamp"] = int(event_time * 1000)
                if header_prefix:
                    kwargs["headers"] = [(REPLAY_HEADER, header_prefix + str(lineno).encode())]
                self._produce(topic, kwargs)
                report.sent += 1
                report.invalid += not valid
            self.handled_through = lineno
            self._maybe_housekeeping()

    def _produce(self, topic: str, kwargs: dict[str, Any]) -> None:
        assert self.producer is not None
        while True:
            try:
                self.producer.produce(topic, **kwargs)
                break
            except BufferError:
                self.producer.poll(0.1)  # the local queue is full: let deliveries drain it
            except KafkaException as exc:
                raise ReplayError(f"cannot produce to {topic!r} at {self.kafka.bootstrap_servers}: {exc}") from exc
        self.producer.poll(0)

    def _delivered(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self.failures.append(err.str())
            return
        partition, offset = msg.partition(), msg.offset()
        if offset > self.delivered_max.get(partition, -1):
            self.delivered_max[partition] = offset

    def _sleep(self, seconds: float) -> None:
        assert self.producer is not None
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.producer.poll(left)  # serves delivery reports while the pace holds us back

    # ---- progress, delivery confirmation, checkpoints ---------------------------------------------
    def _maybe_housekeeping(self) -> None:
        now = time.monotonic()
        if now >= self._next_progress or now >= self._next_checkpoint:
            self._housekeeping()

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if self.checkpoint_path is not None and now >= self._next_checkpoint:
            self._confirm()
            self._save_checkpoint(complete=False)
            self._next_checkpoint = time.monotonic() + self.opts.checkpoint_interval_s
        if self.opts.progress is not None and now >= self._next_progress:
            self.report.seconds = now - self.t0
            self._next_progress = now + self.opts.progress_interval_s
            self.opts.progress(self.report)

    def _confirm(self, timeout_s: float | None = None) -> None:
        """Wait until the broker confirmed every record produced so far; raise if any was not."""
        assert self.producer is not None
        timeout = self.opts.flush_timeout_s if timeout_s is None else timeout_s
        remaining = self.producer.flush(timeout)
        if remaining or self.failures:
            raise ReplayError(
                f"replay to {self.topic!r} at {self.kafka.bootstrap_servers}: {remaining} records not confirmed "
                f"within {timeout:g}s, {len(self.failures)} failed"
                + (f" (first: {self.failures[0]})" if self.failures else "")
                + ("; resume later with --resume" if self.checkpoint_path else "")
            )

    def _save_checkpoint(self, *, complete: bool) -> None:
        """Only after `_confirm`: every line up to `handled_through` is in the topic or not to be sent."""
        if self.checkpoint_path is None or self.state is None:
            return
        state = self.state
        state.next_line = self.handled_through + 1
        for partition, offset in self.delivered_max.items():
            state.scan_from[partition] = max(state.scan_from.get(partition, 0), offset + 1)
        state.counts = self.report.counts()
        state.complete = complete
        state.log_bytes = max(state.log_bytes, self.path.stat().st_size)
        state.save(self.checkpoint_path)

    def _salvage(self) -> None:
        """After an interruption (an exception, Ctrl-C): confirm what was produced and checkpoint it, so a
        resume needs no scan for those lines. If that fails too, the last checkpoint stays and resume
        finds the delivered lines by their header."""
        if self.producer is None:
            return
        try:
            self._confirm(timeout_s=min(self.opts.flush_timeout_s, 10.0))
            self._save_checkpoint(complete=False)
        except BaseException as exc:  # keep the original exception; this one is secondary
            log.warning("replay interrupted; records produced since the last checkpoint are unconfirmed: %s", exc)
