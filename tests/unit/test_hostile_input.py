"""Hostile input through the whole learning step: every record ends as an event or a dead letter.

The corpus (`stream_adapt.hostile`) covers truncated JSON, 100,000-level nesting, 1 MB strings, binary
garbage, wrong types, NaN/Infinity, Unicode edge cases, duplicate keys, oversized records and
timestamps at the epoch and in the year 9999. It goes through `Pipeline.process` (not just `decode`):
nothing raises, each record is counted once, with its exact position and a reason from the bounded set,
and the valid events among them are learned from as usual. Hypothesis then fuzzes the same path with
arbitrary bytes and with event-shaped JSON holding wrong values; and tracemalloc checks that processing
the corpus over and over does not grow the pipeline's memory (small bounds, so growth would show).
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from collections import Counter
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_helpers import tiny_model

from stream_adapt.config import pipeline_config
from stream_adapt.events import DECODE_REASONS, MAX_ID_LENGTH, DecodeError, Position, Record, decode
from stream_adapt.hostile import CLASSES, CORPUS_NOW, HostileCase, expectation, hostile_cases, hostile_corpus
from stream_adapt.learning.pipeline import BatchResult, Pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOPIC = "hostile"
USERS = [f"u{i}" for i in range(4)]
ITEMS = [f"i{i}" for i in range(20)]
SMALL_WINDOWS = {"shots": 4, "query_shots": 1, "min_shots": 2}


MODEL = tiny_model(USERS, ITEMS, "sha256:hostile")


def pipeline(**overrides: Any) -> Pipeline:
    return Pipeline(MODEL, pipeline_config(overrides))


def records(raws: list[bytes], first_offset: int = 0, partition: int = 0) -> list[Record]:
    return [Record(r, Position(TOPIC, partition, first_offset + k)) for k, r in enumerate(raws)]


def run(p: Pipeline, items: list[Record], batch: int = 40) -> list[BatchResult]:
    results = [p.process(items[s : s + batch], now=CORPUS_NOW) for s in range(0, len(items), batch)]
    return [*results, p.drain()]


@pytest.fixture(scope="module")
def corpus() -> list[HostileCase]:
    return hostile_cases(0)


# ---- the corpus itself ----------------------------------------------------------------------------------


def test_corpus_covers_every_class_and_is_deterministic_per_seed(corpus: list[HostileCase]) -> None:
    assert {c.kind.split("/")[0] for c in corpus} == set(CLASSES)
    assert len({c.kind for c in corpus}) == len(corpus), "kinds are unique"
    assert hostile_corpus(0) == [(c.kind, c.raw) for c in corpus]
    other = hostile_corpus(1)
    assert [k for k, _ in other] == [c.kind for c in corpus]
    assert [r for _, r in other] != [c.raw for c in corpus]
    for c in corpus:
        assert c.expect and c.expect <= {"event", *DECODE_REASONS}, c.kind


def test_corpus_holds_the_extremes_the_issue_names(corpus: list[HostileCase]) -> None:
    by_kind = {c.kind: c.raw for c in corpus}
    assert by_kind["nesting/array-100k"].count(b"[") == 100_000
    assert len(by_kind["huge/user-id-1MB"]) > 1_000_000
    assert any(len(c.raw) > 64 * 1024 for c in corpus if c.kind.startswith("oversized/"))
    assert by_kind["unicode/utf8-bom"].startswith(b"\xef\xbb\xbf")
    assert b"\\ud800" in by_kind["unicode/lone-high-surrogate-escape"]
    assert b'"timestamp": 0' in by_kind["timestamp/epoch-0"]
    assert b"253402300799" in by_kind["timestamp/year-9999"]
    assert b"NaN" in by_kind["non_finite/value-NaN"]


# ---- through the pipeline ---------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [64 * 1024, 4 * 1024 * 1024], ids=["default-limit", "4MiB-limit"])
def test_every_hostile_record_ends_as_an_event_or_a_dead_letter_with_its_reason_and_position(limit: int) -> None:
    """At the default limit the 1 MB records are too_large; at 4 MiB the parser and validators see them."""
    cases = hostile_cases(0, max_record_bytes=limit)
    items = records([c.raw for c in cases])
    p = pipeline(events={"max_record_bytes": limit}, window=SMALL_WINDOWS)

    results = run(p, items)

    batches = results[:-1]
    assert sum(r.records for r in batches) == len(items)
    for res in batches:
        assert res.events + len(res.dead_letters) == res.records
        assert res.learned + res.ignored + res.already_applied == res.events
    dead = [d for res in batches for d in res.dead_letters]
    by_offset = {d.position.offset: d for d in dead}
    assert len(by_offset) == len(dead), "a record is dead-lettered at most once"
    assert all(d.position.topic == TOPIC and d.position.partition == 0 for d in dead)
    wrong = []
    for k, case in enumerate(cases):
        letter = by_offset.get(k)
        outcome = "event" if letter is None else letter.reason
        if outcome not in expectation(case, limit):
            wrong.append((case.kind, outcome, sorted(expectation(case, limit))))
        if letter is not None:
            assert letter.reason in DECODE_REASONS
            assert items[k].value.startswith(letter.raw) and len(letter.raw) <= limit
            assert letter.detail
    assert not wrong, wrong
    # The valid events among them are learned (ratings) or counted as ignored (the click), none lost.
    learned = {k for k, c in enumerate(cases) if k not in by_offset and b'"click"' not in c.raw}
    logged = Counter(pos["offset"] for res in results for rec in res.log for pos in rec.positions)
    assert set(logged) == learned and set(logged.values()) == {1}
    assert sum(r.ignored for r in batches) == 1


def test_a_too_large_record_keeps_only_a_bounded_prefix_as_its_dead_letter() -> None:
    huge = b'{"event_id": "' + b"x" * 3_000_000 + b'"}'
    p = pipeline(events={"max_record_bytes": 1024})
    [letter] = p.process(records([huge]), now=CORPUS_NOW).dead_letters
    assert (letter.reason, letter.position, len(letter.raw)) == ("too_large", Position(TOPIC, 0, 0), 1024)


@pytest.mark.parametrize(
    ("token", "outcome"),
    [
        (b"1" * MAX_ID_LENGTH, "event"),
        (b"-" + b"1" * (MAX_ID_LENGTH - 1), "event"),
        (b"1" * (MAX_ID_LENGTH + 1), "id_invalid"),
        (b"9" * 4300, "id_invalid"),  # the longest integer the JSON parser takes
    ],
)
def test_an_integer_id_is_held_to_the_same_length_limit_as_a_string_id(token: bytes, outcome: str) -> None:
    """Bug fixed here: integer ids skipped the 128-character limit (a 4,300-digit user id was kept as is)."""
    for field in ("event_id", "user_id", "item_id"):
        body = {"event_id": "e", "user_id": "u", "item_id": "i", "event_type": "rating", "value": 4, "timestamp": 0}
        body[field] = "MARK"
        body["timestamp"] = CORPUS_NOW - 10
        raw = json.dumps(body).encode().replace(b'"MARK"', token)
        result = decode(raw, Position(TOPIC, 0, 0), now=CORPUS_NOW)
        assert (result.reason if isinstance(result, DecodeError) else "event") == outcome, field


# ---- fuzzing the pipeline ---------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


@st.composite
def event_shaped(draw: st.DrawFn) -> bytes:
    """A rating of one of three users with extreme but valid values, then up to two fields broken:
    removed, replaced by any JSON value, or given a raw NaN/Infinity/huge-number token."""
    body: dict[str, Any] = {
        "event_id": draw(st.text(min_size=1, max_size=8) | st.integers(0, 10**6)),
        "user_id": draw(st.sampled_from(["u0", "u1", "stranger"])),
        "item_id": draw(st.sampled_from([*ITEMS[:5], "unknown-item"])),
        "event_type": draw(st.sampled_from(["rating", "rating", "click", "review"])),
        "value": draw(st.sampled_from([0.0, 10.0, 5.0, 10.5, -1.0]) | st.floats(0, 10)),
        "timestamp": draw(st.sampled_from([CORPUS_NOW - 1, 0, 631152000.0, 253402300799, CORPUS_NOW + 86400])),
    }
    tokens: dict[str, bytes] = {}
    for name in draw(st.lists(st.sampled_from(sorted(body)), max_size=2, unique=True)):
        how = draw(st.sampled_from(["drop", "value", "token"]))
        if how == "drop":
            del body[name]
        elif how == "value":
            body[name] = draw(json_values)
        else:
            body[name] = f"@{name}@"
            tokens[f'"@{name}@"'] = draw(st.sampled_from([b"NaN", b"-Infinity", b"1e999", b"9" * 4400, b"[" * 300]))
    raw = json.dumps(body).encode()
    for marker, token in tokens.items():
        raw = raw.replace(marker.encode(), token)
    return raw


def _check_accounting(items: list[Record], results: list[BatchResult]) -> None:
    """What holds for any input: each record once, as an event or a dead letter at its own position;
    no valid event lost or used twice once the pipeline drained."""
    batches = results[:-1]
    assert sum(r.records for r in batches) == len(items)
    dead = [d for r in batches for d in r.dead_letters]
    assert sum(r.events for r in batches) + len(dead) == len(items)
    positions = {it.position: it.value for it in items}
    assert len({d.position for d in dead}) == len(dead)
    for d in dead:
        assert d.reason in DECODE_REASONS
        assert positions[d.position].startswith(d.raw)
    learned = sum(r.learned for r in batches)
    logged = Counter((p["partition"], p["offset"]) for r in results for rec in r.log for p in rec.positions)
    assert sum(logged.values()) == learned and set(logged.values()) <= {1}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raws=st.lists(st.binary(max_size=200), max_size=25))
def test_pipeline_takes_arbitrary_bytes_without_raising(raws: list[bytes]) -> None:
    items = records(raws)
    _check_accounting(items, run(pipeline(window=SMALL_WINDOWS), items, batch=10))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raws=st.lists(event_shaped(), min_size=1, max_size=30))
def test_pipeline_takes_event_shaped_records_with_wrong_values_without_raising(raws: list[bytes]) -> None:
    """Mostly valid ratings of three users (so windows fill and adapt, with ratings of 0 and 10), some
    broken: the learning path runs on whatever survives decoding, and every record is accounted for."""
    items = records(raws)
    _check_accounting(items, run(pipeline(window=SMALL_WINDOWS), items, batch=7))


#: The corpus records a parser reads in full at a 4 KiB limit (the huge ones are too_large unread).
SMALL_CORPUS = [raw for _, raw in hostile_corpus(7, max_record_bytes=4096) if len(raw) <= 4096]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(0, 10**6), noise=st.binary(min_size=1, max_size=8))
def test_pipeline_takes_corrupted_corpus_records_without_raising(cut: int, noise: bytes) -> None:
    """Corpus records further damaged: cut at a random point, or with random bytes spliced in."""
    raws = []
    for raw in SMALL_CORPUS:
        at = cut % (len(raw) + 1)
        raws += [raw[:at], raw[:at] + noise + raw[at:]]
    items = records(raws)
    _check_accounting(items, run(pipeline(window=SMALL_WINDOWS, events={"max_record_bytes": 4096}), items, 64))


# ---- memory ---------------------------------------------------------------------------------------------


def _fresh_users(rep: int, n: int) -> list[bytes]:
    """`n` one-event users never seen before (each one opens a window and a drift detector)."""
    return [
        json.dumps(
            {
                "event_id": f"m{rep}-{k}",
                "user_id": f"m{rep}-{k}",
                "item_id": ITEMS[k % len(ITEMS)],
                "event_type": "rating",
                "value": 4.0,
                "timestamp": CORPUS_NOW - 100 + k / n,
            }
        ).encode()
        for k in range(n)
    ]


def _retained(p: Pipeline, passes: int, users_per_pass: int) -> list[int]:
    """Traced memory retained after each pass. A pass streams the whole corpus (positions keep rising,
    as on a topic) plus fresh one-event users; results are dropped at once, as a sink would after
    publishing them."""
    raws = [r for _, r in hostile_corpus(0)]
    offset = 0
    retained = []
    # Two process-wide, bounded things that are not the pipeline's state, filled before measuring:
    # the first torch.optim.Adam step (the global re-adaptation) imports torch._dynamo and sympy (~68 MB,
    # once), and pydantic-core keeps a fixed-size cache of recently parsed JSON strings (~0.9 MB when full).
    # The cache is filled while tracing (a traced string replacing an untraced one would look like growth),
    # with valid events: a record refused before its fields are read leaves nothing in it.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)]).step()
    tracemalloc.start()
    for raw in _fresh_users(-1, 20_000):
        decode(raw, Position("warm-up", 0, 0), now=CORPUS_NOW)
    try:
        for rep in range(passes):
            batch = records(raws + _fresh_users(rep, users_per_pass), first_offset=offset)
            offset += len(batch)
            for s in range(0, len(batch), 200):
                p.process(batch[s : s + 200], now=CORPUS_NOW)
            del batch
            gc.collect()
            retained.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    return retained


BOUNDED = {"events": {"dedup_capacity": 256}, "window": {"max_entities": 64}, "drift": {"reservoir_size": 64}}
UNBOUNDED = {"events": {"dedup_capacity": 10**7}, "window": {"max_entities": 10**7}}


@pytest.mark.parametrize(("name", "overrides"), [("bounded", BOUNDED), ("unbounded", UNBOUNDED)])
def test_processing_the_corpus_again_and_again_does_not_grow_memory(name: str, overrides: dict[str, Any]) -> None:
    """14 passes of ~200 hostile records + 200 new users each. What the pipeline retains saw-tooths (the
    window store compacts its heaps every few passes), so the peaks of passes 3-8 and 9-14 are compared.
    With the bounds (256 remembered ids, 64 open windows and detectors, 64 reservoir events) they are
    level (measured: within +-25 KB); without them the same measurement sees ~0.5 MB per pass, so the
    check can tell the two apart."""
    retained = _retained(pipeline(**overrides), passes=14, users_per_pass=200)
    growth = max(retained[8:]) - max(retained[2:8])
    if name == "bounded":
        assert growth < 64_000, f"retained memory grew by {growth} bytes: {retained}"
    else:
        assert growth > 1_000_000, f"the unbounded control grew only {growth} bytes: {retained}"
