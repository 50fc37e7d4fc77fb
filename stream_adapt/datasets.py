"""Event logs on disk -> raw records, one code path for every format.

Every reader turns a line into the JSON bytes of a `FeedbackEvent` dict and nothing more: validation
(ids, ranges, event types, timestamps) happens in one place, `events.decode`, so a replayed log and a
live topic are judged by the same rules. This module only checks what it must to build that JSON: the
line's shape (column count, CSV quoting, UTF-8) and that numeric columns are numbers. A line failing
that becomes a `DecodeError(reason="malformed_line")` value; nothing here raises for a bad *line*.
A bad *file* (unknown format, a header without the needed columns) raises `DatasetFormatError`.

Formats (`FORMATS`); any of them may be gzip-compressed (name ending in `.gz`):

- `jsonl`: one FeedbackEvent JSON object per line, passed through byte for byte.
- `csv`: a header naming FeedbackEvent fields (`user_id`, `item_id`, `value`, `timestamp` required;
  `event_id`, `event_type` optional; `context` and unknown columns ignored). An empty or missing
  `event_type` means `rating`; an empty or missing `event_id` is synthesized. Fields may be quoted,
  but a record must fit on one line.
- `movielens`: GroupLens `u.data` (ML-100K): `user \\t item \\t rating \\t unix-time`, no header. The
  `::`-separated `ratings.dat` of ML-1M/ML-10M is read too (separator taken from the first line).
- `ml-latest`: `ratings.csv` of ML-latest/ML-20M/ML-25M/ML-32M: header `userId,movieId,rating,timestamp`.
- `recbole`: RecBole atomic `.inter` files: tab-separated header `name:type` (`user_id:token` ...),
  columns located by name. Without a `rating` column each row is an implicit `click` of value 1.0.

`auto` (see `detect_format`) decides from the name, then from the first non-blank line.

Formats without event ids get a deterministic id `"<file name without .gz>:<line number>"` (e.g.
`u.data:17`), so replaying the same file is idempotent downstream and `x.csv` / `x.csv.gz` agree.
Positions are `Position(topic, 0, line_number - 1)`; the header and blank lines count as lines.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import zlib
from collections.abc import Callable, Generator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Final

from stream_adapt.errors import StreamAdaptError
from stream_adapt.events import DecodeError, FeedbackEvent, Position, Record, decode

#: The concrete formats `iter_records` reads; `fmt` also accepts `"auto"`.
FORMATS: Final = ("jsonl", "csv", "movielens", "ml-latest", "recbole")
AUTO: Final = "auto"

#: A longer line is reported as `too_large` without being held in memory (decode has its own limit).
DEFAULT_MAX_LINE_BYTES: Final = 1024 * 1024
#: Synthesized ids must stay within the 128-character id limit whatever the file is called.
_MAX_ID_PREFIX: Final = 100
_BOM: Final = b"\xef\xbb\xbf"
#: A truncated or corrupt .gz: a file-level failure, reported as such with where it happened.
_GZIP_ERRORS: Final = (EOFError, gzip.BadGzipFile, zlib.error)
_RECBOLE_FIELD = re.compile(rb"^\s*[A-Za-z_][\w.]*:(token|token_seq|float|float_seq)\s*$")

#: Where each format's columns come from: header name -> FeedbackEvent field.
_ML_LATEST_COLUMNS: Final = {"userId": "user_id", "movieId": "item_id", "rating": "value", "timestamp": "timestamp"}
_RECBOLE_COLUMNS: Final = {"user_id": "user_id", "item_id": "item_id", "rating": "value", "timestamp": "timestamp"}
_CSV_FIELDS: Final = ("event_id", "user_id", "item_id", "event_type", "value", "timestamp")


class DatasetFormatError(StreamAdaptError, ValueError):
    """The file as a whole cannot be read in the requested format (not one bad line: those are values)."""


@dataclass(frozen=True, slots=True)
class _Layout:
    """How to cut one data line into FeedbackEvent fields (indices into the split line)."""

    sep: bytes
    n_fields: int
    user: int
    item: int
    timestamp: int
    value: int | None  # None: every row has `default_value`
    event_id: int | None = None
    event_type: int | None = None
    default_type: bytes = b'"rating"'
    default_value: float = 1.0
    quoted: bool = False  # comma formats: a line containing '"' goes through the csv module
    has_header: bool = False
    names: tuple[str, ...] = ("user", "item", "rating", "timestamp")  # column names, for details


# --------------------------------------------------------------------------------------------- opening


def _open(path: Path) -> IO[bytes]:
    """Binary, buffered, transparently gunzipped: lines are split on b'\\n' only."""
    if path.name.endswith(".gz"):
        return io.BufferedReader(gzip.GzipFile(path, "rb"), buffer_size=1 << 16)
    return open(path, "rb", buffering=1 << 16)


def _base_name(path: Path) -> str:
    return path.name[:-3] if path.name.endswith(".gz") else path.name


def _first_line(path: Path, max_line_bytes: int) -> bytes | None:
    """The first non-blank line (the header, or a sample row), BOM and terminator stripped."""
    try:
        with _open(path) as f:
            for lineno, line in enumerate(iter(partial(f.readline, max_line_bytes + 2), b""), start=1):
                if lineno == 1 and line.startswith(_BOM):
                    line = line[len(_BOM) :]
                if line.strip():
                    return line.rstrip(b"\r\n")
    except _GZIP_ERRORS as exc:
        raise DatasetFormatError(f"{path}: unreadable gzip data: {exc}") from exc
    return None


def _csv_header(line: bytes) -> list[str]:
    try:
        return [name.strip() for name in next(csv.reader([line.decode()], strict=True))]
    except (UnicodeDecodeError, csv.Error, StopIteration) as exc:
        raise DatasetFormatError(f"unreadable CSV header {line[:200]!r}: {exc}") from exc


# ------------------------------------------------------------------------------------------- detection


def detect_format(path: str | Path) -> str:
    """Guess the format of an event log. Rules, first match wins (a trailing `.gz` is ignored):

    1. by extension: `.jsonl`/`.ndjson` -> jsonl; `.inter` -> recbole; `.data`/`.dat` -> movielens;
    2. by the first non-blank line: starts with `{` -> jsonl; tab-separated `name:type` header ->
       recbole; other tab-separated or `::`-separated -> movielens; a comma header with `userId` and
       `movieId` -> ml-latest; a comma header with `user_id` and `item_id` -> csv.

    Raises `DatasetFormatError` when nothing matches (an empty file without a telling extension too).
    """
    path = Path(path)
    suffix = Path(_base_name(path)).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".inter":
        return "recbole"
    if suffix in (".data", ".dat"):
        return "movielens"
    first = _first_line(path, DEFAULT_MAX_LINE_BYTES)
    if first is None:
        raise DatasetFormatError(f"cannot detect the format of {path}: no data; pass fmt explicitly")
    line = first.strip()
    if line.startswith(b"{"):
        return "jsonl"
    if b"\t" in line:
        fields = line.split(b"\t")
        return "recbole" if all(_RECBOLE_FIELD.match(f) for f in fields) else "movielens"
    if b"::" in line:
        return "movielens"
    if b"," in line:
        names = set(_csv_header(line))
        if {"userId", "movieId"} <= names:
            return "ml-latest"
        if {"user_id", "item_id"} <= names:
            return "csv"
    raise DatasetFormatError(
        f"cannot detect the format of {path} from its first line {line[:120]!r}; pass one of {FORMATS}"
    )


# ---------------------------------------------------------------------------------------------- layout


def _columns(header: list[str], mapping: dict[str, str]) -> dict[str, int]:
    """FeedbackEvent field -> column index, from header names."""
    found: dict[str, int] = {}
    for index, name in enumerate(header):
        field = mapping.get(name)
        if field is not None and field not in found:
            found[field] = index
    return found


def _layout(path: Path, fmt: str, max_line_bytes: int) -> _Layout:
    """Read the header (if the format has one) and decide where every field lives."""
    if fmt == "jsonl":
        return _Layout(b"", 0, 0, 0, 0, None)
    first = _first_line(path, max_line_bytes)
    if fmt == "movielens":
        sep = b"::" if first is not None and b"\t" not in first and b"::" in first else b"\t"
        return _Layout(sep, 4, 0, 1, 3, 2)
    if first is None:
        raise DatasetFormatError(f"{path}: no header line (format {fmt})")
    if len(first) > max_line_bytes:
        raise DatasetFormatError(f"{path}: header line longer than {max_line_bytes} bytes")
    if fmt == "recbole":
        header = [f.split(b":", 1)[0].strip().decode("utf-8", "replace") for f in first.split(b"\t")]
        cols = _columns(header, _RECBOLE_COLUMNS)
        sep, quoted, mapping = b"\t", False, _RECBOLE_COLUMNS
    elif fmt == "ml-latest":
        header = _csv_header(first)
        cols = _columns(header, _ML_LATEST_COLUMNS)
        sep, quoted, mapping = b",", True, _ML_LATEST_COLUMNS
    elif fmt == "csv":
        header = _csv_header(first)
        mapping = {name: name for name in _CSV_FIELDS}
        cols = _columns(header, mapping)
        sep, quoted = b",", True
    else:
        raise DatasetFormatError(f"unknown format {fmt!r}; expected one of {(*FORMATS, AUTO)}")
    required = ["user_id", "item_id", "timestamp"] if fmt == "recbole" else ["user_id", "item_id", "value", "timestamp"]
    column_of = {field: name for name, field in mapping.items()}
    missing = [column_of[field] for field in required if field not in cols]
    if missing:
        raise DatasetFormatError(f"{path}: header {header} lacks column(s) {missing} (format {fmt})")
    implicit = "value" not in cols
    return _Layout(
        sep,
        len(header),
        cols["user_id"],
        cols["item_id"],
        cols["timestamp"],
        cols.get("value"),
        event_id=cols.get("event_id"),
        event_type=cols.get("event_type"),
        default_type=b'"click"' if implicit else b'"rating"',
        quoted=quoted,
        has_header=True,
        names=tuple(header),
    )


# ---------------------------------------------------------------------------------------- line -> JSON


def _json_str(raw: bytes) -> bytes | None:
    """A JSON string literal for `raw`; None when it is not UTF-8."""
    if raw.isalnum():  # ASCII letters and digits only (the common, numeric-id case): nothing to escape
        return b'"' + raw + b'"'
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return None
    return json.dumps(text, ensure_ascii=False).encode()


def _json_num(x: float) -> bytes:
    """What `json.dumps` writes for a float; non-finite values go on to decode, which names them."""
    if x - x == 0:
        return repr(x).encode()
    return b"NaN" if x != x else (b"Infinity" if x > 0 else b"-Infinity")


def _line_parser(layout: _Layout, id_prefix: str) -> Callable[[bytes, int], bytes | str]:
    """A function turning one data line into JSON bytes, or a str saying why it cannot.

    The common line (alphanumeric ids, finite numbers, no id/type columns) takes one `%` format;
    everything else goes through `json.dumps`-equivalent escaping.
    """
    sep, n, quoted, names = layout.sep, layout.n_fields, layout.quoted, layout.names
    ui, ii, ti, vi, ei, ti_type = (
        layout.user,
        layout.item,
        layout.timestamp,
        layout.value,
        layout.event_id,
        layout.event_type,
    )
    default_type, default_value = layout.default_type, layout.default_value
    sep_name = {b"\t": "tab", b",": "comma", b"::": "'::'"}[sep]
    id_head = json.dumps(id_prefix[:_MAX_ID_PREFIX] + ":", ensure_ascii=False)[:-1].encode()
    template = b'{"event_id":%s,"user_id":%s,"item_id":%s,"event_type":%s,"value":%s,"timestamp":%s}'
    fast = ei is None and ti_type is None
    fast_template = (
        b'{"event_id":' + id_head.replace(b"%", b"%%") + b'%d","user_id":"%s","item_id":"%s",'
        b'"event_type":' + default_type + b',"value":%r,"timestamp":%r}'
    )

    def split_quoted(line: bytes) -> list[bytes] | str:
        try:
            row = next(csv.reader([line.decode()], strict=True))
        except UnicodeDecodeError:
            return "not valid UTF-8"
        except csv.Error as exc:
            return f"bad CSV: {exc}"
        return [field.encode() for field in row]

    def not_a_number(fields: list[bytes]) -> str:
        for index in (ti, vi):
            if index is not None:
                try:
                    float(fields[index])
                except ValueError:
                    return f"{names[index]} {fields[index].decode('utf-8', 'replace')!r} is not a number"
        return "not a number"  # unreachable: one of the two failed

    def general(fields: list[bytes], lineno: int, value: float, ts: float) -> bytes | str:
        user, item = _json_str(fields[ui]), _json_str(fields[ii])
        if user is None or item is None:
            return "not valid UTF-8"
        event_id: bytes | None = id_head + b'%d"' % lineno
        if ei is not None and fields[ei].strip():
            event_id = _json_str(fields[ei])
        event_type: bytes | None = default_type
        if ti_type is not None and fields[ti_type].strip():
            event_type = _json_str(fields[ti_type].strip())
        if event_id is None or event_type is None:
            return "not valid UTF-8"
        return template % (event_id, user, item, event_type, _json_num(value), _json_num(ts))

    def parse(line: bytes, lineno: int) -> bytes | str:
        if quoted and b'"' in line:
            split = split_quoted(line)
            if isinstance(split, str):
                return split
            fields = split
        else:
            fields = line.split(sep)
        if len(fields) != n:
            return f"expected {n} {sep_name}-separated fields, got {len(fields)}"
        try:
            ts = float(fields[ti])
            value = default_value if vi is None else float(fields[vi])
        except ValueError:
            return not_a_number(fields)
        user, item = fields[ui], fields[ii]
        if fast and user.isalnum() and item.isalnum() and ts - ts == 0 and value - value == 0:
            return fast_template % (lineno, user, item, value, ts)
        return general(fields, lineno, value, ts)

    return parse


# ------------------------------------------------------------------------------------------- iterating


def _iterate(
    path: Path,
    layout: _Layout,
    topic: str,
    parse: Callable[[bytes, int], bytes | str] | None,
    start_offset: int,
    max_line_bytes: int,
) -> Generator[Record | DecodeError, None, None]:
    where = _base_name(path)
    limit = max_line_bytes + 2  # room for "\r\n": a read this long without "\n" is an oversized line
    header_pending = layout.has_header
    lineno = 0
    try:
        with _open(path) as f:
            readline = f.readline
            new_position = tuple.__new__  # Position(...) without its Python-level __new__ frame
            for line in iter(partial(readline, limit), b""):
                lineno += 1
                if len(line) == limit and not line.endswith(b"\n"):
                    while (rest := readline(1 << 16)) and not rest.endswith(b"\n"):
                        pass  # drop the rest of an oversized line without holding it
                    if lineno > start_offset:
                        yield DecodeError(
                            line[:max_line_bytes],
                            "too_large",
                            f"{where}:{lineno}: line longer than {max_line_bytes} bytes",
                            Position(topic, 0, lineno - 1),
                        )
                    continue
                if lineno == 1 and line.startswith(_BOM):
                    line = line[len(_BOM) :]
                if header_pending:
                    if line.strip():
                        header_pending = False  # the header; validated by _layout before we started
                    continue
                if lineno <= start_offset:
                    continue
                content = line.rstrip(b"\r\n")
                if not content or content.isspace():
                    continue
                position = new_position(Position, (topic, 0, lineno - 1))
                if parse is None:
                    yield Record(content, position)
                    continue
                out = parse(content, lineno)
                if isinstance(out, bytes):
                    yield Record(out, position)
                else:
                    yield DecodeError(content, "malformed_line", f"{where}:{lineno}: {out}", position)
    except _GZIP_ERRORS as exc:
        raise DatasetFormatError(f"{path}: unreadable gzip data after line {lineno}: {exc}") from exc


def iter_records(
    path: str | Path,
    fmt: str = AUTO,
    topic: str | None = None,
    *,
    start_offset: int = 0,
    id_prefix: str | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> Generator[Record | DecodeError, None, None]:
    """Stream an event log as `Record`s (JSON bytes of an event dict) and `DecodeError`s, in file order.

    Memory is constant: one line at a time. The format and header are checked now, so a missing file
    or a bad header raises here, not at the first `next()`. The file stays open while the generator
    runs; `close()` it when stopping early.

    - `topic`: the `Position.topic` of every item (default: `str(path)`).
    - `start_offset`: skip lines whose offset (line number - 1) is below it: pass a committed
      next-offset to resume right after the last handled line.
    - `id_prefix`: prefix of synthesized event ids (default: the file name without `.gz`).
    - `max_line_bytes`: longer lines become `DecodeError(reason="too_large")`.
    """
    path = Path(path)
    resolved = detect_format(path) if fmt == AUTO else fmt
    if resolved not in FORMATS:
        raise DatasetFormatError(f"unknown format {fmt!r}; expected one of {(*FORMATS, AUTO)}")
    layout = _layout(path, resolved, max_line_bytes)
    parse = None if resolved == "jsonl" else _line_parser(layout, id_prefix or _base_name(path))
    return _iterate(path, layout, topic or str(path), parse, start_offset, max_line_bytes)


def load_events(
    path: str | Path, fmt: str = AUTO, *, now: float | None = None
) -> tuple[list[FeedbackEvent], list[DecodeError]]:
    """Read and decode a whole log (pretraining, evaluation): the valid events and every rejected line.

    Decoding is `events.decode`, exactly as for live records; `now` is its reference for the
    not-in-the-future check (default: the current time, which suits historical logs).
    """
    events: list[FeedbackEvent] = []
    errors: list[DecodeError] = []
    for item in iter_records(path, fmt):
        if isinstance(item, DecodeError):
            errors.append(item)
            continue
        decoded = decode(item.value, item.position, now=now)
        if isinstance(decoded, DecodeError):
            errors.append(decoded)
        else:
            events.append(decoded)
    return events, errors
