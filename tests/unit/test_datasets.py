"""Event-log readers: every format to the same JSON records, bad lines as values, positions exact."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from collections import deque
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_adapt.datasets import (
    FORMATS,
    DatasetFormatError,
    detect_format,
    iter_records,
    load_events,
)
from stream_adapt.events import DECODE_REASONS, DecodeError, FeedbackEvent, Position, decode
from stream_adapt.io.ports import Record

TS = 881250949  # 1997: historical, valid for decode


def write(path: Path, text: str) -> Path:
    """Write `text`, gzip-compressed when the name ends in .gz."""
    data = text.encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def records(path: Path, fmt: str = "auto") -> list[Record | DecodeError]:
    return list(iter_records(path, fmt))


def fields(item: Record | DecodeError) -> dict[str, object]:
    assert isinstance(item, Record), item
    return json.loads(item.value)


# One tiny log per format holding the same two ratings; name -> (file name, content).
SAMPLES = {
    "jsonl": (
        "events.jsonl",
        '{"event_id":"e1","user_id":"196","item_id":"242","event_type":"rating","value":3,"timestamp":881250949}\n'
        '{"event_id":"e2","user_id":"186","item_id":"302","event_type":"rating","value":4.5,"timestamp":891717742}\n',
    ),
    "csv": (
        "events.csv",
        "user_id,item_id,value,timestamp\n196,242,3,881250949\n186,302,4.5,891717742\n",
    ),
    "movielens": ("u.data", "196\t242\t3\t881250949\n186\t302\t4.5\t891717742\n"),
    "ml-latest": (
        "ratings.csv",
        "userId,movieId,rating,timestamp\n196,242,3,881250949\n186,302,4.5,891717742\n",
    ),
    "recbole": (
        "ml.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t242\t3\t881250949\n186\t302\t4.5\t891717742\n",
    ),
}


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_the_same_events(tmp_path: Path, fmt: str, gz: bool) -> None:
    name, text = SAMPLES[fmt]
    path = write(tmp_path / (name + (".gz" if gz else "")), text)
    assert detect_format(path) == fmt
    for given_fmt in (fmt, "auto"):
        events, errors = load_events(path, given_fmt)
        assert errors == []
        assert [(e.user_id, e.item_id, e.event_type.value, e.value, e.timestamp) for e in events] == [
            ("196", "242", "rating", 3.0, 881250949.0),
            ("186", "302", "rating", 4.5, 891717742.0),
        ]


def test_jsonl_lines_pass_through_byte_for_byte(tmp_path: Path) -> None:
    lines = [b'{"event_id": "a", "extra": [1, 2]}', b"not json at all", b'{"user_id":"\\u00e9"}']
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"\r\n".join(lines) + b"\n")
    items = records(path)
    assert [i.value for i in items if isinstance(i, Record)] == lines


def test_positions_are_line_numbers_minus_one_and_header_counts(tmp_path: Path) -> None:
    path = write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,881250949\n\n4,5,1,881250949\n")
    items = records(path)
    assert [i.position for i in items] == [Position(str(path), 0, 1), Position(str(path), 0, 3)]


def test_topic_overrides_position_topic(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", f"1\t2\t3\t{TS}\n")
    (item,) = iter_records(path, topic="ratings")
    assert item.position == Position("ratings", 0, 0)


def test_blank_lines_are_skipped_but_counted(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", f"\n1\t2\t3\t{TS}\n  \n\r\n1\t3\t4\t{TS}\n")
    assert [(i.position.offset, fields(i)["event_id"]) for i in records(path)] == [(1, "u.data:2"), (4, "u.data:5")]


def test_synthesized_ids_are_deterministic_and_ignore_compression(tmp_path: Path) -> None:
    text = f"1\t2\t3\t{TS}\n1\t3\t4\t{TS}\n"
    plain = write(tmp_path / "u.data", text)
    (tmp_path / "gz").mkdir()
    packed = write(tmp_path / "gz" / "u.data.gz", text)
    ids = [fields(i)["event_id"] for i in records(plain)]
    assert ids == ["u.data:1", "u.data:2"]
    assert [fields(i)["event_id"] for i in records(plain)] == ids
    assert [fields(i)["event_id"] for i in records(packed)] == ids


def test_id_prefix_replaces_the_file_name(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", f"1\t2\t3\t{TS}\n")
    (item,) = iter_records(path, id_prefix="ml-100k")
    assert fields(item)["event_id"] == "ml-100k:1"


@pytest.mark.parametrize(
    ("line", "detail"),
    [
        ("1\t2\t3", "expected 4 tab-separated fields, got 3"),
        (f"1\t2\t3\t{TS}\textra", "expected 4 tab-separated fields, got 5"),
        (f"1\t2\tfive\t{TS}", "rating 'five' is not a number"),
        ("1\t2\t3\tyesterday", "timestamp 'yesterday' is not a number"),
        (f"1\t2\t\t{TS}", "rating '' is not a number"),
    ],
)
def test_malformed_movielens_line_is_a_value_with_its_line_number(tmp_path: Path, line: str, detail: str) -> None:
    path = write(tmp_path / "u.data", f"1\t2\t3\t{TS}\n{line}\n1\t3\t4\t{TS}\n")
    first, bad, last = records(path)
    assert isinstance(first, Record) and isinstance(last, Record)
    assert isinstance(bad, DecodeError)
    assert bad.reason == "malformed_line" and bad.reason in DECODE_REASONS
    assert bad.detail == f"u.data:2: {detail}"
    assert bad.raw == line.encode()
    assert bad.position == Position(str(path), 0, 1)


def test_malformed_csv_lines_never_raise(tmp_path: Path) -> None:
    path = write(
        tmp_path / "events.csv",
        f'user_id,item_id,value,timestamp\n1,"unclosed,3,{TS}\n1,2,3\n1,"a"b,3,{TS}\n1,2,3,{TS}\n',
    )
    items = records(path)
    assert [type(i).__name__ for i in items] == ["DecodeError", "DecodeError", "DecodeError", "Record"]
    assert [i.position.offset for i in items] == [1, 2, 3, 4]
    assert all(i.reason == "malformed_line" for i in items if isinstance(i, DecodeError))
    assert items[0].detail.startswith("events.csv:2: bad CSV")  # type: ignore[union-attr]
    assert items[1].detail == "events.csv:3: expected 4 comma-separated fields, got 3"  # type: ignore[union-attr]


def test_invalid_utf8_in_an_id_is_malformed(tmp_path: Path) -> None:
    path = tmp_path / "u.data"
    path.write_bytes(b"\xff\xfe\t2\t3\t881250949\n")
    (bad,) = records(path)
    assert isinstance(bad, DecodeError) and bad.reason == "malformed_line"
    assert "UTF-8" in bad.detail


def test_csv_defaults_event_type_and_synthesizes_missing_ids(tmp_path: Path) -> None:
    path = write(
        tmp_path / "events.csv",
        "event_id,user_id,item_id,event_type,value,timestamp,context\n"
        f'x-1,u1,i1,click,1,{TS},"{{""page"": ""home""}}"\n'
        f",u1,i2,,4,{TS},\n",
    )
    first, second = (fields(i) for i in records(path))
    assert first == {
        "event_id": "x-1",
        "user_id": "u1",
        "item_id": "i1",
        "event_type": "click",
        "value": 1.0,
        "timestamp": float(TS),
    }
    assert second["event_id"] == "events.csv:3" and second["event_type"] == "rating"


def test_csv_columns_in_any_order_with_quotes_and_escaping(tmp_path: Path) -> None:
    path = write(tmp_path / "events.csv", f'timestamp,value,item_id,user_id\n{TS},2,"a ""quoted"", item",u\\1\n')
    (item,) = records(path)
    assert fields(item)["item_id"] == 'a "quoted", item'
    assert fields(item)["user_id"] == "u\\1"
    assert isinstance(decode(item.value, item.position), FeedbackEvent)  # type: ignore[union-attr]


def test_recbole_locates_columns_by_name(tmp_path: Path) -> None:
    path = write(
        tmp_path / "x.inter",
        f"timestamp:float\titem_id:token\tlabel:float\tuser_id:token\trating:float\n{TS}\tmovie 7\t1\tu9\t2.5\n",
    )
    (item,) = records(path)
    assert {k: fields(item)[k] for k in ("user_id", "item_id", "value", "event_type")} == {
        "user_id": "u9",
        "item_id": "movie 7",
        "value": 2.5,
        "event_type": "rating",
    }


def test_recbole_without_rating_is_implicit_click(tmp_path: Path) -> None:
    path = write(tmp_path / "x.inter", f"user_id:token\titem_id:token\ttimestamp:float\n1\t2\t{TS}\n")
    (event,), errors = load_events(path)
    assert errors == [] and event.event_type.value == "click" and event.value == 1.0


def test_movielens_ratings_dat_double_colon_separator(tmp_path: Path) -> None:
    path = write(tmp_path / "ratings.dat", f"1::1193::5::{TS}\n1::661::3::{TS}\n")
    assert [(e.user_id, e.item_id, e.value) for e in load_events(path)[0]] == [("1", "1193", 5.0), ("1", "661", 3.0)]


def test_values_are_not_range_checked_here_but_decode_rejects_them(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", f"1\t2\t99\t{TS}\n1\t2\tnan\t{TS}\n1\t2\t3\t100\n1\t2\t3\t99999999999\n")
    assert all(isinstance(i, Record) for i in records(path))
    events, errors = load_events(path)
    assert events == []
    assert [(e.reason, e.position.offset) for e in errors] == [
        ("value_out_of_range", 0),
        ("non_finite", 1),
        ("timestamp_out_of_range", 2),
        ("timestamp_out_of_range", 3),
    ]


def test_load_events_keeps_order_and_reports_malformed_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", f"1\t2\t3\t{TS}\nbroken\n1\t3\t4\t{TS + 1}\n")
    events, errors = load_events(path)
    assert [e.item_id for e in events] == ["2", "3"]
    assert [(e.reason, e.position.offset) for e in errors] == [("malformed_line", 1)]


def test_overlong_line_is_too_large_and_reading_continues(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", "9" * 5000 + f"\n1\t2\t3\t{TS}\n")
    bad, good = iter_records(path, max_line_bytes=1000)
    assert isinstance(bad, DecodeError) and bad.reason == "too_large" and len(bad.raw) == 1000
    assert isinstance(good, Record) and good.position.offset == 1


def test_start_offset_skips_handled_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n" + f"1,1,3,{TS}\n1,2,3,{TS}\n1,3,3,{TS}\n"
    )
    assert [i.position.offset for i in iter_records(path, start_offset=2)] == [2, 3]
    assert [i.position.offset for i in iter_records(path, start_offset=0)] == [1, 2, 3]


def test_utf8_bom_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "ratings.csv"
    path.write_bytes(b"\xef\xbb\xbfuserId,movieId,rating,timestamp\n1,2,3,881250949\n")
    assert detect_format(path) == "ml-latest"
    assert fields(records(path)[0])["user_id"] == "1"


@pytest.mark.parametrize(
    ("name", "first_line", "expected"),
    [
        ("u.data", "", "movielens"),
        ("ratings.dat.gz", "", "movielens"),
        ("log.ndjson", "", "jsonl"),
        ("x.inter", "", "recbole"),
        ("u1.base", f"1\t2\t3\t{TS}", "movielens"),
        ("ratings.txt", f"1::2::3::{TS}", "movielens"),
        ("events.log", '{"event_id": "a"}', "jsonl"),
        ("export.tsv", "user_id:token\titem_id:token\ttimestamp:float", "recbole"),
        ("ratings.csv", "userId,movieId,rating,timestamp", "ml-latest"),
        ("ratings.csv.gz", "userId,movieId,rating,timestamp", "ml-latest"),
        ("feedback.csv", "event_id,user_id,item_id,value,timestamp", "csv"),
    ],
)
def test_detect_format(tmp_path: Path, name: str, first_line: str, expected: str) -> None:
    path = write(tmp_path / name, f"\n{first_line}\n" if first_line else "")
    assert detect_format(path) == expected


@pytest.mark.parametrize("content", ["", "hello world\n", "a,b,c\n"])
def test_undetectable_file_raises(tmp_path: Path, content: str) -> None:
    path = write(tmp_path / "mystery.txt", content)
    with pytest.raises(DatasetFormatError, match="pass"):
        detect_format(path)


def test_header_without_needed_columns_raises_at_call(tmp_path: Path) -> None:
    path = write(tmp_path / "ratings.csv", "userId,movieId,tag,timestamp\n1,2,funny,3\n")
    with pytest.raises(DatasetFormatError, match="rating"):
        iter_records(path, "ml-latest")


def test_unknown_format_raises(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", f"1\t2\t3\t{TS}\n")
    with pytest.raises(DatasetFormatError, match="unknown format"):
        iter_records(path, "parquet")


def test_200k_lines_stream_in_constant_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.data.gz"
    n, window = 200_000, 10_000
    with gzip.open(path, "wt") as f:
        f.writelines(f"{i % 943}\t{i % 1682}\t{i % 5 + 1}\t{TS + i}\n" for i in range(n))

    def traced_peak(action: Callable[[], object]) -> int:
        tracemalloc.start()  # slows allocation ~7x: trace only two windows, not all 200k lines
        try:
            action()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    opened: list[Iterator[Record | DecodeError]] = []

    def open_and_read_first() -> None:
        opened.append(iter_records(path))
        deque(islice(opened[0], window), maxlen=0)

    # Opening plus the first lines: a reader that loaded the file up front (~5 MB unpacked) shows here.
    peak_first = traced_peak(open_and_read_first)
    items = opened[0]
    offsets = deque((item.position.offset for item in islice(items, n - 2 * window)), maxlen=1)
    # The last lines: a reader that kept what it yielded shows here as growth.
    peak_last = traced_peak(lambda: offsets.extend(item.position.offset for item in items))
    assert offsets[-1] == n - 1
    assert peak_first < 1_000_000 and peak_last < 1_000_000, (peak_first, peak_last)


ids = st.text(st.characters(blacklist_characters="\t\n\r\ufeff", blacklist_categories=("Cs",)), min_size=1)
rows = st.lists(
    st.tuples(ids, ids, st.floats(allow_nan=False, allow_infinity=False), st.integers(0, 2**40)), max_size=30
)


@settings(max_examples=60, deadline=None)
@given(rows)
def test_movielens_rows_come_back_exactly_in_order(tmp_path_factory: pytest.TempPathFactory, rows: list) -> None:
    path = tmp_path_factory.mktemp("prop") / "u.data"
    path.write_bytes("".join(f"{u}\t{i}\t{r!r}\t{t}\n" for u, i, r, t in rows).encode())
    got = [fields(item) for item in iter_records(path, "movielens")]
    assert [(g["user_id"], g["item_id"], g["value"], g["timestamp"]) for g in got] == [
        (u, i, r, float(t)) for u, i, r, t in rows
    ]
    assert [g["event_id"] for g in got] == [f"u.data:{n}" for n in range(1, len(rows) + 1)]


def test_truncated_gzip_is_a_file_error_naming_the_line(tmp_path: Path) -> None:
    packed = gzip.compress("".join(f"{i}\t2\t3\t{TS}\n" for i in range(50_000)).encode())
    path = tmp_path / "u.data.gz"
    path.write_bytes(packed[: len(packed) // 2])
    items = iter_records(path)
    with pytest.raises(DatasetFormatError, match=r"unreadable gzip data after line \d+"):
        for _ in items:
            pass


def test_not_gzip_despite_the_name_raises_at_call(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", f"1\t2\t3\t{TS}\n").rename(tmp_path / "u.data.gz")
    with pytest.raises(DatasetFormatError, match="gzip"):
        iter_records(path)
