"""Replay without a broker: the pacing schedule on a fake clock, time windows and timestamps, progress
rendering, checkpoints, and the checks `replay_file` makes before it connects to Kafka."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pytest

from stream_adapt.config import KafkaConfig
from stream_adapt.errors import ConfigError
from stream_adapt.replay import (
    Checkpoint,
    Pacer,
    ProgressLine,
    ReplayError,
    ReplayReport,
    TimeWindow,
    _exclusive,
    count_lines,
    default_checkpoint_path,
    parse_timestamp,
    replay_file,
)

#: Nothing listens here: these tests must fail before any connection is attempted.
NOWHERE = KafkaConfig(bootstrap_servers="127.0.0.1:9")


class FakeClock:
    """A clock that only moves when the code under test sleeps (or the test says so)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def send_times(pacer: Pacer, clock: FakeClock, event_times: list[float | None]) -> list[float]:
    """When each record would leave, relative to the first."""
    out = []
    for event_time in event_times:
        pacer.wait(event_time)
        out.append(clock.now)
    return [round(t - out[0], 9) for t in out]


# ---------------------------------------------------------------------------------------------- Pacer


def test_rate_spaces_records_one_over_rate_apart_from_the_first() -> None:
    clock = FakeClock()
    pacer = Pacer(rate=4.0, clock=clock, sleep=clock.sleep)
    assert send_times(pacer, clock, [None] * 5) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_rate_schedule_is_absolute_so_a_stall_is_caught_up_not_added() -> None:
    clock = FakeClock()
    pacer = Pacer(rate=10.0, clock=clock, sleep=clock.sleep)
    pacer.wait()
    clock.now += 0.35  # the producer stalled: records 1-3 are overdue
    waited = [pacer.wait() for _ in range(4)]
    assert waited[:3] == [0.0, 0.0, 0.0]
    assert waited[3] == pytest.approx(0.05)  # record 4 is due at 0.4


def test_speed_follows_the_event_time_gaps_scaled() -> None:
    clock = FakeClock()
    pacer = Pacer(speed=2.0, clock=clock, sleep=clock.sleep)
    assert send_times(pacer, clock, [100.0, 101.0, 103.0, 103.0, 110.0]) == [0.0, 0.5, 1.5, 1.5, 5.0]


def test_speed_sends_late_or_timeless_events_at_once() -> None:
    clock = FakeClock()
    pacer = Pacer(speed=1.0, clock=clock, sleep=clock.sleep)
    # 95 is earlier than the first event and None has no time: neither moves the clock back or waits.
    assert send_times(pacer, clock, [100.0, 102.0, 95.0, None, 103.0]) == [0.0, 2.0, 2.0, 2.0, 3.0]


def test_unpaced_never_sleeps_and_long_waits_are_sliced_with_ticks() -> None:
    clock = FakeClock()
    fast = Pacer(clock=clock, sleep=clock.sleep)
    for _ in range(100):
        fast.wait(1.0)
    assert clock.sleeps == []

    ticks: list[float] = []
    slow = Pacer(speed=1.0, clock=clock, sleep=clock.sleep, max_sleep_s=0.5, tick=lambda: ticks.append(clock.now))
    slow.wait(0.0)
    assert slow.wait(2.2) == pytest.approx(2.2)
    assert max(clock.sleeps) <= 0.5 and len(ticks) == 5  # progress and checkpoints keep going in a long gap
    assert slow.waited_s == pytest.approx(2.2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": 10.0, "speed": 2.0}, "not both"),
        ({"rate": 0.0}, "--rate must be a positive"),
        ({"rate": float("inf")}, "--rate must be a positive"),
        ({"speed": -1.0}, "--speed must be a positive"),
    ],
)
def test_pacer_rejects_impossible_paces(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Pacer(**kwargs)


# ----------------------------------------------------------------------------------- time and windows


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1709251200", 1709251200.0),
        ("1709251200.5", 1709251200.5),
        ("2024-03-01", 1709251200.0),  # no offset: UTC, never the machine's local time
        ("2024-03-01T00:00:00Z", 1709251200.0),
        ("2024-03-01T01:00:00+01:00", 1709251200.0),
        (" 2024-03-01T00:00:10 ", 1709251210.0),
    ],
)
def test_parse_timestamp_accepts_iso_8601_and_epoch_seconds(text: str, expected: float) -> None:
    assert parse_timestamp(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [("1709251200000", "milliseconds"), ("yesterday", "ISO-8601"), ("-5", ">= 0"), ("nan", ">= 0")],
)
def test_parse_timestamp_refuses_what_it_cannot_place(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_timestamp(text)


def test_time_window_is_since_inclusive_until_exclusive_and_excludes_timeless_lines_when_bounded() -> None:
    window = TimeWindow(since=100.0, until=200.0)
    assert [t in window for t in (99.9, 100.0, 150.0, 199.9, 200.0, None)] == [False, True, True, True, False, False]
    assert None in TimeWindow() and 5.0 in TimeWindow()
    assert 1e9 in TimeWindow(since=100.0) and 1.0 in TimeWindow(until=100.0)
    with pytest.raises(ConfigError, match="is not before"):
        TimeWindow(since=200.0, until=200.0)


# --------------------------------------------------------------------------------- progress and counts


def test_progress_line_updates_in_place_on_a_tty_and_prints_lines_otherwise() -> None:
    report = ReplayReport(sent=500, line=500, lines_total=1000, seconds=2.0)
    tty = io.StringIO()
    line = ProgressLine(tty, tty=True, every_s=0.0)
    line(report)
    report.line, report.sent, report.seconds = 750, 750, 3.0
    line(report, final=True)
    text = tty.getvalue()
    assert text.startswith("\r") and text.count("\r") == 2 and text.endswith("\n")
    assert "75%" in text and "line 750/1000" in text and "250/s" in text and "ETA 0:00:01" in text

    plain = io.StringIO()
    ProgressLine(plain, tty=False, every_s=0.0)(report)
    assert "\r" not in plain.getvalue() and plain.getvalue().endswith("\n")
    assert ProgressLine(io.StringIO(), tty=False).every_s >= 1.0  # a log file gets a line every few seconds


def test_count_lines_handles_gzip_and_a_missing_final_newline(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(b"1\n2\n3\n")
    (tmp_path / "b.jsonl").write_bytes(b"1\n2\n3")
    with gzip.open(tmp_path / "c.jsonl.gz", "wb") as f:
        f.write(b"x\n" * 70_000)
    assert [count_lines(tmp_path / n) for n in ("a.jsonl", "b.jsonl", "c.jsonl.gz")] == [3, 3, 70_000]


def test_summary_says_how_many_sent_records_the_service_will_dead_letter() -> None:
    report = ReplayReport(sent=10, invalid=3, bad_lines=1, first_bad=["x.csv:4: expected 4 fields"], topic="t")
    text = report.summary()
    assert "sent 10 records" in text and "of which 3 fail validation and will be dead-lettered" in text
    assert "bad lines: 1, not sent" in text and "x.csv:4: expected 4 fields" in text


# -------------------------------------------------------------------------------------- checkpoints


def make_checkpoint(log: Path, **changes: object) -> Checkpoint:
    fields: dict[str, object] = {
        "replay_id": "r1",
        "log": str(log),
        "log_bytes": log.stat().st_size,
        "topic": "feedback",
        "fmt": "jsonl",
        "entity": "user",
        "since": None,
        "until": None,
        "skip_invalid": False,
        "next_line": 7,
        "scan_from": {0: 3, 2: 11},
        **changes,
    }
    return Checkpoint(**fields)  # type: ignore[arg-type]


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    path = tmp_path / "events.jsonl"
    event = {"event_id": "e", "user_id": "u", "item_id": "i", "event_type": "rating", "value": 3.0, "timestamp": 1.7e9}
    path.write_text("\n".join(json.dumps(event) for _ in range(10)) + "\n")
    return path


def test_checkpoint_round_trips_and_a_corrupt_one_is_a_clear_error(log_file: Path, tmp_path: Path) -> None:
    path = default_checkpoint_path(log_file, "feedback")
    assert path == tmp_path / "events.jsonl.replay-feedback.json"
    make_checkpoint(log_file).save(path)
    loaded = Checkpoint.load(path)
    assert loaded.next_line == 7 and loaded.scan_from == {0: 3, 2: 11} and not loaded.complete
    assert not path.with_name(path.name + ".tmp").exists()  # written aside, then renamed into place
    path.write_text('{"version": 1, "replay_id": ')
    with pytest.raises(ReplayError, match=r"unreadable.*delete it to start over"):
        Checkpoint.load(path)


def test_resume_without_a_checkpoint_is_refused(log_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match="nothing to resume"):
        replay_file(log_file, NOWHERE, checkpoint=tmp_path / "none.json", resume=True)
    with pytest.raises(ReplayError, match="resume needs a checkpoint"):
        replay_file(log_file, NOWHERE, resume=True)


def test_an_unfinished_checkpoint_needs_resume_or_restart(log_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "ck.json"
    make_checkpoint(log_file).save(path)
    with pytest.raises(ReplayError, match="stopped at line 7: pass --resume to continue it, or --restart"):
        replay_file(log_file, NOWHERE, checkpoint=path)


@pytest.mark.parametrize(
    ("kwargs", "different"),
    [
        ({"topic": "other"}, "topic 'other'"),
        ({"entity": "item"}, "entity 'item'"),
        ({"fmt": "csv"}, "format 'csv'"),
        ({"window": TimeWindow(since=5.0)}, "since 5.0"),
        ({"skip_invalid": True}, "skip_invalid True"),
    ],
)
def test_resume_refuses_to_select_lines_differently_from_the_interrupted_run(
    log_file: Path, tmp_path: Path, kwargs: dict[str, object], different: str
) -> None:
    path = tmp_path / "ck.json"
    make_checkpoint(log_file).save(path)
    with pytest.raises(ReplayError, match=f"different: {different}"):
        replay_file(log_file, NOWHERE, checkpoint=path, resume=True, **kwargs)  # type: ignore[arg-type]


def test_resume_refuses_a_log_that_shrank(log_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "ck.json"
    make_checkpoint(log_file, log_bytes=log_file.stat().st_size + 1).save(path)
    with pytest.raises(ReplayError, match="smaller than when the checkpoint was made"):
        replay_file(log_file, NOWHERE, checkpoint=path, resume=True)


def test_a_complete_checkpoint_resumes_to_nothing_without_connecting(log_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "ck.json"
    make_checkpoint(log_file, next_line=11, complete=True, counts={"sent": 10}).save(path)
    report = replay_file(log_file, NOWHERE, checkpoint=path, resume=True)
    assert report.complete and report.sent == 0 and report.total_sent == 10


def test_two_replays_cannot_hold_one_checkpoint(log_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "ck.json"
    make_checkpoint(log_file).save(path)
    with _exclusive(path.with_name(path.name + ".lock")), pytest.raises(ReplayError, match="another replay holds"):
        replay_file(log_file, NOWHERE, checkpoint=path, resume=True)
