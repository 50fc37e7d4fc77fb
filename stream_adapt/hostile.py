"""A corpus of hostile input records, for tests, fuzzing seeds and checking a deployment's input path.

`hostile_corpus(seed)` returns (kind, bytes) pairs covering what a feedback topic can carry when a
producer is buggy or an attacker writes to it: truncated JSON, deep nesting (100,000 levels), 1 MB
strings, binary garbage, every field with the wrong JSON type, NaN/Infinity tokens and numbers that
overflow to infinity, Unicode edge cases (invalid UTF-8, overlong encodings, lone surrogates in JSON
escapes, byte order marks, UTF-16, NUL and invisible characters in ids), duplicate keys, records beyond
`max_record_bytes`, and timestamps at the epoch, before 1990, in milliseconds and in the year 9999.
Well-formed events at the edges of what is valid are mixed in, so a test also sees that hostile
neighbours do not disturb them.

A kind is "class/name". `hostile_cases` returns the same records with the outcomes each may have when
it fits within `max_record_bytes` ("event", or a `DECODE_REASONS` reason); a longer record must be
"too_large". The expectations are what `events.decode` does today, pinned so that a change in how
hostile input is classified is a visible decision, not an accident. Some are worth knowing:

- duplicate keys: the last occurrence wins (as in Python's `json`); `{"value": NaN, ..., "value": 4}`
  is a valid event, `{..., "value": 4, "value": NaN}` is not;
- a UTF-8 byte order mark before the JSON, and UTF-16 text, are `not_json` (RFC 8259 lets a parser
  refuse a BOM; producers must send UTF-8 without one);
- ids may hold any non-blank Unicode, including NUL and invisible characters ("\\u200b" is a valid,
  distinct user id); ids made only of whitespace, Unicode spaces included, are `id_invalid`;
- an integer id longer than `MAX_ID_LENGTH` characters is `id_invalid` like a long string id (before,
  a 4,300-digit integer passed as a 4,300-character id).

Everything is a pure function of the arguments: the same seed gives the same bytes.
"""

from __future__ import annotations

import json
import random
from typing import Any, NamedTuple

from stream_adapt.events import DEFAULT_MAX_FUTURE_S, DEFAULT_MAX_RECORD_BYTES, MAX_ID_LENGTH, MIN_TIMESTAMP

#: `now` the corpus's timestamps are relative to; pass the same value to `decode` / `Pipeline.process`.
CORPUS_NOW = 1_700_000_000.0
DEPTH = 100_000  # nesting levels
HUGE = 1_000_000  # characters of a huge string
EVENT = "event"  # the outcome of a record that decodes to a valid event

FIELDS = ("event_id", "user_id", "item_id", "event_type", "value", "timestamp")


class HostileCase(NamedTuple):
    """One record of the corpus and the outcomes it may have when within the size limit."""

    kind: str
    raw: bytes
    expect: frozenset[str]


def hostile_corpus(
    seed: int = 0,
    *,
    now: float = CORPUS_NOW,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    max_future_s: float = DEFAULT_MAX_FUTURE_S,
) -> list[tuple[str, bytes]]:
    """(kind, record bytes) for every hostile case; see the module docstring."""
    return [
        (c.kind, c.raw)
        for c in hostile_cases(seed, now=now, max_record_bytes=max_record_bytes, max_future_s=max_future_s)
    ]


def hostile_cases(
    seed: int = 0,
    *,
    now: float = CORPUS_NOW,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    max_future_s: float = DEFAULT_MAX_FUTURE_S,
) -> list[HostileCase]:
    """Every hostile case with its expected outcomes. Valid events get ids unique to `seed`."""
    return _Builder(seed, now, max_record_bytes, max_future_s).build()


class _Builder:
    """Collects the cases; `seed` varies the ids, garbage bytes and cut points, never the classes."""

    def __init__(self, seed: int, now: float, max_record_bytes: int, max_future_s: float):
        self.rng = random.Random(seed)
        self.seed = seed
        self.now = now
        self.limit = max_record_bytes
        self.future = max_future_s
        self.cases: list[HostileCase] = []
        self.n = 0

    # ---- helpers ----------------------------------------------------------------------------------
    def body(self, **changes: Any) -> dict[str, Any]:
        """A valid rating with fresh ids, some fields replaced (a value of `...` removes the field)."""
        self.n += 1
        base: dict[str, Any] = {
            "event_id": f"h{self.seed}-{self.n}",
            "user_id": f"hu{self.seed}-{self.rng.randrange(50)}",
            "item_id": f"i{self.rng.randrange(20)}",
            "event_type": "rating",
            "value": float(self.rng.randint(0, 20)) / 2,
            "timestamp": self.now - self.rng.randrange(1, 3600),
        }
        return {k: v for k, v in {**base, **changes}.items() if v is not ...}

    def raw(self, **changes: Any) -> bytes:
        return json.dumps(self.body(**changes), ensure_ascii=False).encode()

    def with_token(self, field: str, token: bytes) -> bytes:
        """A valid record whose `field` holds `token` verbatim (NaN, a bare number, raw bytes...)."""
        marker = "\x00MARK\x00"
        return self.raw(**{field: marker}).replace(json.dumps(marker).encode(), token)

    def add(self, kind: str, raw: bytes, *expect: str) -> None:
        self.cases.append(HostileCase(kind, raw, frozenset(expect)))

    # ---- classes ----------------------------------------------------------------------------------
    def build(self) -> list[HostileCase]:
        for part in (
            self.valid,
            self.truncated,
            self.nesting,
            self.huge,
            self.binary,
            self.wrong_types,
            self.non_finite,
            self.unicode,
            self.duplicate_keys,
            self.oversized,
            self.timestamps,
            self.json_shapes,
        ):
            part()
        return self.cases

    def valid(self) -> None:
        add, raw = self.add, self.raw
        add("valid/rating", raw(), EVENT)
        add("valid/click", raw(event_type="click", value=1.0), EVENT)
        unique = 10**12 + self.seed * 10**6 + self.n  # event ids must not repeat across seeds (dedup)
        add("valid/integer-ids", raw(event_id=unique, user_id=self.rng.randrange(10**6), item_id=7), EVENT)
        add("valid/integer-id-of-max-length", raw(item_id=-(10 ** (MAX_ID_LENGTH - 1) - 1)), EVENT)
        add("valid/value-0", raw(value=0.0), EVENT)
        add("valid/value-10", raw(value=10), EVENT)
        add("valid/negative-zero", self.with_token("value", b"-0.0"), EVENT)
        add("valid/underflow-to-zero", self.with_token("value", b"1e-400"), EVENT)
        add("valid/timestamp-1990", raw(timestamp=MIN_TIMESTAMP), EVENT)
        add("valid/timestamp-at-max-future", raw(timestamp=self.now + self.future), EVENT)
        add("valid/id-of-max-length", raw(item_id="x" * MAX_ID_LENGTH), EVENT)
        add(
            "valid/emoji-id-escaped-pair",
            self.with_token("user_id", b'"\\ud83d\\ude00' + str(self.n).encode() + b'"'),
            EVENT,
        )
        add("valid/cjk-rtl-combining-ids", raw(user_id=f"用户\u202e{self.n}", item_id="e\u0301\u0301\u0301"), EVENT)
        add("valid/zero-width-id", raw(user_id="\u200b\u200d" + str(self.n)), EVENT)
        add("valid/nul-in-id", raw(user_id=f"a\x00b{self.n}"), EVENT)
        add("valid/extra-fields", raw(producer="web", schema=[1, {"a": None}]), EVENT)
        add("valid/surrounding-whitespace", b" \t\r\n" + raw() + b"\n\n", EVENT)
        add("valid/context-at-limits", raw(context={f"k{i}": "v" * 256 for i in range(16)}), EVENT)

    def truncated(self) -> None:
        full = self.raw(context={"device": "tv", "page": 2.5})
        n = len(full)
        for name, cut in (
            ("first-byte", 1),
            ("half", n // 2),
            ("closing-brace-missing", n - 1),
            ("two-missing", n - 2),
        ):
            self.add(f"truncated/{name}", full[:cut], "not_json")
        for k in range(8):
            self.add(f"truncated/random-cut-{k}", full[: self.rng.randrange(1, n - 1)], "not_json")
        self.add("truncated/mid-escape", self.with_token("user_id", b'"abc\\u00'), "not_json")

    def nesting(self) -> None:
        add, deep = self.add, DEPTH
        add("nesting/array-100k", b"[" * deep + b"]" * deep, "not_json")
        add("nesting/object-100k", b'{"a":' * deep + b"1" + b"}" * deep, "not_json")
        add("nesting/unclosed-100k", b"[" * deep, "not_json")
        add(
            "nesting/in-context-100k",
            self.with_token("context", b'{"a":' + b"[" * deep + b"]" * deep + b"}"),
            "not_json",
        )
        add("nesting/in-extra-field-100k", self.raw()[:-1] + b', "x": ' + b"[" * deep + b"]" * deep + b"}", "not_json")
        add("nesting/as-user-id-100k", self.with_token("user_id", b"[" * deep + b"]" * deep), "not_json")
        add(
            "nesting/context-64-levels",
            self.with_token("context", b'{"a":' + b"[" * 64 + b"]" * 64 + b"}"),
            "context_invalid",
        )

    def huge(self) -> None:
        add, raw, big = self.add, self.raw, "u" * HUGE
        add("huge/user-id-1MB", raw(user_id=big), "id_invalid")
        add("huge/event-id-1MB", raw(event_id=big), "id_invalid")
        add("huge/event-type-1MB", raw(event_type=big), "unknown_event_type")
        add("huge/context-value-1MB", raw(context={"note": big}), "context_invalid")
        add("huge/context-key-1MB", raw(context={big: 1}), "context_invalid")
        add("huge/context-100k-keys", raw(context={f"k{i}": i for i in range(100_000)}), "context_invalid")
        add("huge/extra-field-1MB", raw(padding=big), EVENT)  # unknown fields are ignored, whatever their size
        add("huge/extra-100k-keys", raw(**{f"x{i}": i for i in range(100_000)}), EVENT)
        add("huge/whitespace-1MB", b" " * HUGE + raw() + b" " * HUGE, EVENT)
        add("huge/integer-id-4300-digits", self.with_token("user_id", b"9" * 4300), "id_invalid")
        add("huge/integer-id-129-digits", self.with_token("item_id", b"1" * (MAX_ID_LENGTH + 1)), "id_invalid")
        add("huge/integer-beyond-parser-5000-digits", self.with_token("event_id", b"9" * 5000), "not_json")
        add("huge/value-5000-digits", self.with_token("value", b"9" * 5000), "not_json")
        add("huge/value-1e999999", self.with_token("value", b"1e999999"), "non_finite")

    def binary(self) -> None:
        rng, add = self.rng, self.add
        for k in range(6):
            noise = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
            add(f"binary/random-{k}", noise if noise[:1] not in (b"{", b"[", b'"') else b"\x00" + noise, "not_json")
        add("binary/nul-bytes", b"\x00" * 64, "not_json")
        add("binary/all-0xff", b"\xff" * 64, "not_json")
        add("binary/gzip-header", b"\x1f\x8b\x08\x00" + bytes(rng.randrange(256) for _ in range(60)), "not_json")
        add("binary/avro-magic", b"Obj\x01" + bytes(rng.randrange(256) for _ in range(60)), "not_json")
        add("binary/confluent-wire-format", b"\x00\x00\x00\x00\x07" + self.raw(), "not_json")
        add("binary/nul-inside-json", self.raw()[:20] + b"\x00" + self.raw()[20:], "not_json")
        add("binary/nul-after-json", self.raw() + b"\x00", "not_json")
        add("binary/control-characters-in-string", self.with_token("user_id", b'"a\x01\x1fb"'), "not_json")

    def wrong_types(self) -> None:
        add, tok = self.add, self.with_token
        wrong: dict[str, bytes] = {
            "null": b"null",
            "true": b"true",
            "list": b'["x"]',
            "object": b'{"id": "x"}',
        }
        for field in ("event_id", "user_id", "item_id"):
            for name, token in wrong.items():
                add(f"wrong_type/{field}-{name}", tok(field, token), "id_invalid")
            add(f"wrong_type/{field}-decimal", tok(field, b"6.5"), "id_invalid")
            add(f"wrong_type/{field}-empty", tok(field, b'""'), "id_invalid")
        for name, token in wrong.items():
            add(f"wrong_type/event_type-{name}", tok("event_type", token), "unknown_event_type")
        add("wrong_type/event_type-number", tok("event_type", b"1"), "unknown_event_type")
        for field in ("value", "timestamp"):
            for name, token in {**wrong, "string-number": b'"4"', "string": b'"great"'}.items():
                add(f"wrong_type/{field}-{name}", tok(field, token), "wrong_type")
        add("wrong_type/context-list", tok("context", b'["a"]'), "context_invalid")
        add("wrong_type/context-string", tok("context", b'"tv"'), "context_invalid")
        add("wrong_type/context-value-null", self.raw(context={"a": None}), "context_invalid")
        for field in FIELDS:
            add(f"wrong_type/missing-{field}", self.raw(**{field: ...}), "missing_field")

    def non_finite(self) -> None:
        tokens = {"NaN": b"NaN", "Infinity": b"Infinity", "-Infinity": b"-Infinity", "1e400": b"1e400"}
        tok, add = self.with_token, self.add
        for name, token in tokens.items():
            add(f"non_finite/value-{name}", tok("value", token), "non_finite")
            add(f"non_finite/timestamp-{name}", tok("timestamp", token), "non_finite")
            add(f"non_finite/context-{name}", tok("context", b'{"score": ' + token + b"}"), "context_invalid")
            add(f"non_finite/user_id-{name}", tok("user_id", token), "id_invalid", "non_finite")
        add("non_finite/nan-lowercase", tok("value", b"nan"), "not_json")
        add("non_finite/inf-short", tok("value", b"inf"), "not_json")

    def unicode(self) -> None:
        add, tok = self.add, self.with_token
        add("unicode/invalid-utf8-in-id", tok("user_id", b'"\xff\xfe"'), "not_json")
        add("unicode/overlong-slash", tok("user_id", b'"\xc0\xaf"'), "not_json")
        add("unicode/utf8-encoded-surrogate", tok("user_id", b'"\xed\xa0\x80"'), "not_json")
        add("unicode/truncated-multibyte", tok("user_id", b'"\xe2\x82"'), "not_json")
        add("unicode/lone-high-surrogate-escape", tok("user_id", b'"\\ud800"'), "not_json")
        add("unicode/lone-low-surrogate-escape", tok("user_id", b'"\\udc00x"'), "not_json")
        add("unicode/reversed-surrogate-pair", tok("user_id", b'"\\ude00\\ud83d"'), "not_json")
        add("unicode/utf8-bom", b"\xef\xbb\xbf" + self.raw(), "not_json")
        add("unicode/utf16-le-bom", self.raw().decode().encode("utf-16"), "not_json")
        add("unicode/utf32", self.raw().decode().encode("utf-32"), "not_json")
        add("unicode/latin1-id", tok("user_id", '"café"'.encode("latin-1")), "not_json")
        add("unicode/nbsp-and-ideographic-space-id", self.raw(user_id="\u00a0\u3000"), "id_invalid")
        add("unicode/escaped-nul-event-type", self.raw(event_type="rating\x00"), "unknown_event_type")
        add("unicode/fullwidth-event-type", self.raw(event_type="ｒａｔｉｎｇ"), "unknown_event_type")
        add("unicode/cyrillic-a-in-event-type", self.raw(event_type="r\u0430ting"), "unknown_event_type")
        add("unicode/id-of-129-emoji", self.raw(user_id="😀" * (MAX_ID_LENGTH + 1)), "id_invalid")

    def duplicate_keys(self) -> None:
        add, raw = self.add, self.raw
        add("duplicate_keys/invalid-then-valid-value", b'{"value": NaN, ' + raw()[1:], EVENT)
        add("duplicate_keys/valid-then-invalid-value", raw()[:-1] + b', "value": NaN}', "non_finite")
        add("duplicate_keys/valid-then-out-of-range", raw()[:-1] + b', "value": 11}', "value_out_of_range")
        add("duplicate_keys/user-id-twice", raw()[:-1] + f', "user_id": "dup{self.n}"}}'.encode(), EVENT)
        add("duplicate_keys/event-type-twice", raw()[:-1] + b', "event_type": "review"}', "unknown_event_type")
        add("duplicate_keys/every-field-twice", raw()[:-1] + b", " + raw()[1:], EVENT)

    def oversized(self) -> None:
        add, limit = self.add, self.limit
        for name, size in (("limit-plus-1", limit + 1), ("twice-the-limit", 2 * limit)):
            body = self.body(padding="")
            body["padding"] = "p" * max(0, size - len(json.dumps(body).encode()))
            add(f"oversized/valid-event-{name}", json.dumps(body).encode(), EVENT)  # too_large over the limit
        add("oversized/garbage-limit-plus-1", b"\x00" * (limit + 1), "not_json")

    def timestamps(self) -> None:
        add, raw, out = self.add, self.raw, "timestamp_out_of_range"
        add("timestamp/epoch-0", raw(timestamp=0), out)
        add("timestamp/negative", raw(timestamp=-1.5), out)
        add("timestamp/1989-12-31", raw(timestamp=MIN_TIMESTAMP - 1), out)
        add("timestamp/year-9999", raw(timestamp=253_402_300_799), out)
        add("timestamp/milliseconds", raw(timestamp=self.now * 1000), out)
        add("timestamp/microseconds", raw(timestamp=int(self.now * 1_000_000)), out)
        add("timestamp/just-beyond-max-future", raw(timestamp=self.now + self.future + 1), out)
        add("timestamp/1e308", raw(timestamp=1e308), out)
        add("timestamp/iso-string", raw(timestamp="2023-11-14T22:13:20Z"), "wrong_type")
        add("timestamp/2**63", self.with_token("timestamp", str(2**63).encode()), out)

    def json_shapes(self) -> None:
        add = self.add
        for name, raw in {
            "empty": b"",
            "whitespace": b" \n\t ",
            "empty-object": b"{}",
            "null": b"null",
            "array-of-event": b"[" + self.raw() + b"]",
            "string": b'"rating"',
            "number": b"4.5",
            "two-objects": self.raw() + self.raw(),
            "trailing-garbage": self.raw() + b" xyz",
            "trailing-comma": self.raw()[:-1] + b",}",
            "single-quotes": self.raw().replace(b'"', b"'"),
            "comment": b"/* hi */" + self.raw(),
            "unquoted-keys": b"{event_id: 1}",
            "jsonl-two-lines": self.raw() + b"\n" + self.raw(),
        }.items():
            add(f"json_shape/{name}", raw, "not_json" if name != "empty-object" else "missing_field")


def expectation(case: HostileCase, max_record_bytes: int) -> frozenset[str]:
    """The outcomes `case` may have under a record size limit: only "too_large" when it is longer."""
    return frozenset({"too_large"}) if len(case.raw) > max_record_bytes else case.expect


#: Stable names of the classes the corpus covers (the part of each kind before "/").
CLASSES = (
    "valid",
    "truncated",
    "nesting",
    "huge",
    "binary",
    "wrong_type",
    "non_finite",
    "unicode",
    "duplicate_keys",
    "oversized",
    "timestamp",
    "json_shape",
)

__all__ = ["CLASSES", "CORPUS_NOW", "HostileCase", "expectation", "hostile_cases", "hostile_corpus"]
