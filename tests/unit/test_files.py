"""FileSource: an event log as a `Source` — batches in file order, bad lines as values, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stream_adapt.datasets import DatasetFormatError
from stream_adapt.events import DecodeError, Position
from stream_adapt.io.files import FileSource
from stream_adapt.io.ports import Record, Source

TS = 881250949


def write_udata(path: Path, n: int, bad_lines: tuple[int, ...] = ()) -> Path:
    """`n` lines of u.data; line numbers in `bad_lines` (1-based) are malformed."""
    path.write_text("".join("broken\n" if i in bad_lines else f"{i}\t{i}\t3\t{TS}\n" for i in range(1, n + 1)))
    return path


def offsets(batch: list[Record | DecodeError]) -> list[int]:
    return [item.position.offset for item in batch]


def drain(source: FileSource, max_records: int) -> list[list[Record | DecodeError]]:
    batches = []
    while not source.exhausted:
        batches.append(source.poll_batch(max_records, 0.1))
    return batches


def test_is_a_source(tmp_path: Path) -> None:
    with FileSource(write_udata(tmp_path / "u.data", 1)) as source:
        assert isinstance(source, Source)


def test_batches_in_file_order_and_exhausted_right_after_the_last(tmp_path: Path) -> None:
    with FileSource(write_udata(tmp_path / "u.data", 7)) as source:
        batches = drain(source, 3)
        assert [offsets(b) for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]
        assert source.poll_batch(3, 0.1) == []


def test_exhausted_without_an_empty_poll_when_batches_divide_the_file(tmp_path: Path) -> None:
    with FileSource(write_udata(tmp_path / "u.data", 4)) as source:
        assert not source.exhausted
        assert offsets(source.poll_batch(2, 0)) == [0, 1]
        assert not source.exhausted
        assert offsets(source.poll_batch(2, 0)) == [2, 3]
        assert source.exhausted


def test_empty_file_is_exhausted_at_once(tmp_path: Path) -> None:
    (tmp_path / "u.data").write_text("")
    with FileSource(tmp_path / "u.data") as source:
        assert source.exhausted and source.poll_batch(10, 0) == []


def test_one_record_batches(tmp_path: Path) -> None:
    with FileSource(write_udata(tmp_path / "u.data", 3)) as source:
        assert [offsets(b) for b in drain(source, 1)] == [[0], [1], [2]]


def test_zero_max_records_reads_nothing(tmp_path: Path) -> None:
    with FileSource(write_udata(tmp_path / "u.data", 2)) as source:
        assert source.poll_batch(0, 0) == []
        assert offsets(source.poll_batch(5, 0)) == [0, 1]


def test_malformed_lines_pass_through_as_decode_errors(tmp_path: Path) -> None:
    with FileSource(write_udata(tmp_path / "u.data", 5, bad_lines=(2, 5)), topic="ml") as source:
        batch = source.poll_batch(10, 0)
    assert [type(item).__name__ for item in batch] == ["Record", "DecodeError", "Record", "Record", "DecodeError"]
    bad = batch[1]
    assert isinstance(bad, DecodeError)
    assert bad.reason == "malformed_line" and bad.position == Position("ml", 0, 1) and "u.data:2" in bad.detail


def test_positions_use_topic_or_path(tmp_path: Path) -> None:
    path = write_udata(tmp_path / "u.data", 1)
    with FileSource(path) as source:
        assert source.poll_batch(1, 0)[0].position == Position(str(path), 0, 0)
    with FileSource(path, topic="feedback") as source:
        assert source.poll_batch(1, 0)[0].position == Position("feedback", 0, 0)


def test_commit_remembers_the_last_offset_per_partition(tmp_path: Path) -> None:
    with FileSource(write_udata(tmp_path / "u.data", 3), topic="t") as source:
        assert source.committed == {}
        source.commit({("t", 0): 2})
        source.commit({("t", 0): 3, ("other", 1): 7})
        view = source.committed
        view[("t", 0)] = 0  # a copy: callers cannot change what was committed
        assert source.committed == {("t", 0): 3, ("other", 1): 7}


def test_resume_from_committed_offset_has_no_gap_and_no_repeat(tmp_path: Path) -> None:
    path = write_udata(tmp_path / "u.data", 10, bad_lines=(6,))
    with FileSource(path, topic="t") as first:
        handled = first.poll_batch(4, 0)
        first.commit({("t", 0): handled[-1].position.offset + 1})
        committed = first.committed[("t", 0)]
    with FileSource(path, topic="t", start_offset=committed) as second:
        rest = [item for batch in drain(second, 4) for item in batch]
    assert offsets(handled) + offsets(rest) == list(range(10))
    ids = [json.loads(item.value)["event_id"] for item in rest if isinstance(item, Record)]
    assert ids[0] == "u.data:5"  # synthesized ids do not shift on resume


def test_header_format_resume_still_skips_the_header(tmp_path: Path) -> None:
    path = tmp_path / "ratings.csv"
    path.write_text("userId,movieId,rating,timestamp\n" + "".join(f"1,{i},3,{TS}\n" for i in range(3)))
    with FileSource(path, start_offset=2) as source:
        assert offsets(source.poll_batch(10, 0)) == [2, 3]


def test_close_is_idempotent_and_ends_the_stream(tmp_path: Path) -> None:
    source = FileSource(write_udata(tmp_path / "u.data", 5))
    assert len(source.poll_batch(2, 0)) == 2
    source.close()
    source.close()
    assert source.exhausted and source.poll_batch(2, 0) == []


def test_close_releases_the_file(tmp_path: Path) -> None:
    source = FileSource(write_udata(tmp_path / "u.data", 5))
    source.poll_batch(1, 0)
    generator = source._items
    source.close()
    assert generator.gi_frame is None  # the generator finished, running its `with open(...)` exit


def test_bad_file_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        FileSource(tmp_path / "missing.data")
    (tmp_path / "ratings.csv").write_text("userId,movieId\n1,2\n")
    with pytest.raises(DatasetFormatError):
        FileSource(tmp_path / "ratings.csv", "ml-latest")
