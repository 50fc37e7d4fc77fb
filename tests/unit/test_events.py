"""Decoding feedback records: valid events decode, every bad input maps to its reason, nothing raises."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_adapt.events import (
    DECODE_REASONS,
    DEFAULT_MAX_FUTURE_S,
    DEFAULT_MAX_RECORD_BYTES,
    MAX_CONTEXT_KEYS,
    MAX_ID_LENGTH,
    MIN_TIMESTAMP,
    VALUE_RANGES,
    DecodeError,
    EventType,
    FeedbackEvent,
    ImplicitEvent,
    Position,
    RatingEvent,
    decode,
    event_to_json,
    json_schemas,
)

NOW = 1_700_000_000.0  # decode's "now": fixed, so no test depends on the wall clock
POS = Position("feedback", 3, 41)
SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"

VALID: dict[str, Any] = {
    "event_id": "e-1",
    "user_id": "u-1",
    "item_id": "i-1",
    "event_type": "rating",
    "value": 4.5,
    "timestamp": NOW - 60,
}
IMPLICIT_TYPES = [t for t in EventType if t is not EventType.RATING]


def _raw(**changes: Any) -> bytes:
    """The JSON bytes of VALID with some fields replaced (a value of `...` removes the field)."""
    body = {k: v for k, v in {**VALID, **changes}.items() if v is not ...}
    return json.dumps(body).encode()


def _decode(raw: bytes, **kwargs: Any) -> FeedbackEvent | DecodeError:
    return decode(raw, POS, now=NOW, **kwargs)


def _reason(raw: bytes, **kwargs: Any) -> str:
    result = _decode(raw, **kwargs)
    assert isinstance(result, DecodeError), f"expected a DecodeError, got {result!r}"
    assert result.position == POS
    assert result.reason in DECODE_REASONS
    return result.reason


# ---- valid events -----------------------------------------------------------------------------------


def test_valid_rating_decodes_to_a_rating_event_with_every_field() -> None:
    event = _decode(_raw(context={"device": "tv", "page": 2.0, "autoplay": True}))
    assert isinstance(event, RatingEvent)
    assert (event.event_id, event.user_id, event.item_id) == ("e-1", "u-1", "i-1")
    assert event.event_type is EventType.RATING
    assert event.value == 4.5
    assert event.timestamp == NOW - 60
    assert event.context == {"device": "tv", "page": 2.0, "autoplay": True}


@pytest.mark.parametrize("event_type", IMPLICIT_TYPES, ids=str)
def test_valid_implicit_event_of_each_type_decodes_to_an_implicit_event(event_type: EventType) -> None:
    event = _decode(_raw(event_type=event_type.value, value=1.0))
    assert isinstance(event, ImplicitEvent)
    assert event.event_type is event_type
    assert event.value == 1.0


@pytest.mark.parametrize("event_type", list(EventType), ids=str)
def test_values_at_both_ends_of_each_types_range_are_accepted(event_type: EventType) -> None:
    lo, hi = VALUE_RANGES[event_type]
    for value in (lo, hi):
        event = _decode(_raw(event_type=event_type.value, value=value))
        assert isinstance(event, FeedbackEvent), (event_type, value, event)
        assert event.value == value


def test_canonical_bytes_of_a_decoded_event_decode_to_the_same_event() -> None:
    event = _decode(_raw(context={"device": "tv", "n": 3.0}))
    assert isinstance(event, FeedbackEvent)
    assert _decode(event_to_json(event)) == event


@settings(deadline=None)
@given(
    event_id=st.integers(min_value=-(10**30), max_value=10**30),
    user_id=st.integers(min_value=0, max_value=10**12),
    item_id=st.integers(min_value=-(10**6), max_value=10**6),
)
def test_ids_given_as_json_integers_become_their_decimal_strings(event_id: int, user_id: int, item_id: int) -> None:
    event = _decode(_raw(event_id=event_id, user_id=user_id, item_id=item_id))
    assert isinstance(event, FeedbackEvent)
    assert (event.event_id, event.user_id, event.item_id) == (str(event_id), str(user_id), str(item_id))


def test_an_id_given_as_a_json_decimal_number_is_invalid() -> None:
    # Integers are ids (MovieLens, database keys); a decimal is almost surely a value in the wrong field.
    assert _reason(_raw(item_id=6.5)) == "id_invalid"


def test_ids_are_stripped_of_surrounding_whitespace() -> None:
    event = _decode(_raw(user_id="  u-7 "))
    assert isinstance(event, FeedbackEvent)
    assert event.user_id == "u-7"


def test_unknown_extra_fields_are_ignored() -> None:
    event = _decode(_raw(producer="web", schema=2))
    assert isinstance(event, FeedbackEvent)
    assert event == _decode(_raw())


# ---- each bad input maps to its reason ----------------------------------------------------------------

_NEST = 5000

BAD_INPUTS: list[tuple[str, bytes, str]] = [
    ("truncated JSON", _raw()[:40], "not_json"),
    ("not JSON at all", b"user u-1 rated i-1 4.5", "not_json"),
    ("empty record", b"", "not_json"),
    ("invalid UTF-8", b'{"event_id": "\xff\xfe"}', "not_json"),
    ("JSON array", b"[1, 2, 3]", "not_json"),
    ("JSON string", b'"an event"', "not_json"),
    ("JSON number", b"42", "not_json"),
    ("JSON null", b"null", "not_json"),
    ("missing event_id", _raw(event_id=...), "missing_field"),
    ("missing user_id", _raw(user_id=...), "missing_field"),
    ("missing item_id", _raw(item_id=...), "missing_field"),
    ("missing event_type", _raw(event_type=...), "missing_field"),
    ("missing value", _raw(value=...), "missing_field"),
    ("missing timestamp", _raw(timestamp=...), "missing_field"),
    ("value NaN", _raw().replace(b'"value": 4.5', b'"value": NaN'), "non_finite"),
    ("value Infinity", _raw().replace(b'"value": 4.5', b'"value": Infinity'), "non_finite"),
    ("value -Infinity", _raw().replace(b'"value": 4.5', b'"value": -Infinity'), "non_finite"),
    ("value overflowing to inf", _raw().replace(b'"value": 4.5', b'"value": 1e400'), "non_finite"),
    ("timestamp NaN", _raw(timestamp=0).replace(b'"timestamp": 0', b'"timestamp": NaN'), "non_finite"),
    ("unknown event type", _raw(event_type="review"), "unknown_event_type"),
    ("event type of the wrong case", _raw(event_type="Rating"), "unknown_event_type"),
    ("event type as a number", _raw(event_type=3), "unknown_event_type"),
    ("event_id too long", _raw(event_id="e" * (MAX_ID_LENGTH + 1)), "id_invalid"),
    ("user_id too long", _raw(user_id="u" * (MAX_ID_LENGTH + 1)), "id_invalid"),
    ("item_id too long", _raw(item_id="https://shop.example.com/" + "p" * MAX_ID_LENGTH), "id_invalid"),
    ("empty user_id", _raw(user_id=""), "id_invalid"),
    ("blank item_id", _raw(item_id="   "), "id_invalid"),
    ("user_id null", _raw(user_id=None), "id_invalid"),
    ("user_id a list", _raw(user_id=["u-1"]), "id_invalid"),
    ("item_id an object", _raw(item_id={"id": 1}), "id_invalid"),
    ("rating above 10", _raw(value=10.5), "value_out_of_range"),
    ("rating below 0", _raw(value=-0.5), "value_out_of_range"),
    ("huge rating", _raw(value=10**30), "value_out_of_range"),
    ("click above 1", _raw(event_type="click", value=1.5), "value_out_of_range"),
    ("purchase below 0", _raw(event_type="purchase", value=-0.1), "value_out_of_range"),
    ("skip of a rating's size", _raw(event_type="skip", value=4.0), "value_out_of_range"),
    ("timestamp before 1990", _raw(timestamp=MIN_TIMESTAMP - 1), "timestamp_out_of_range"),
    ("timestamp zero", _raw(timestamp=0), "timestamp_out_of_range"),
    ("negative timestamp", _raw(timestamp=-5.0), "timestamp_out_of_range"),
    ("timestamp in milliseconds", _raw(timestamp=NOW * 1000), "timestamp_out_of_range"),
    ("timestamp a week ahead", _raw(timestamp=NOW + 7 * 86400), "timestamp_out_of_range"),
    ("value a word", _raw(value="great"), "wrong_type"),
    ("value null", _raw(value=None), "wrong_type"),
    ("value a list", _raw(value=[4.5]), "wrong_type"),
    ("timestamp a date string", _raw(timestamp="2023-11-14T22:13:20Z"), "wrong_type"),
    (
        "context with too many keys",
        _raw(context={f"k{i}": "v" for i in range(MAX_CONTEXT_KEYS + 1)}),
        "context_invalid",
    ),
    ("context value a list", _raw(context={"tags": ["a", "b"]}), "context_invalid"),
    ("context value an object", _raw(context={"device": {"os": "tv"}}), "context_invalid"),
    ("context value null", _raw(context={"device": None}), "context_invalid"),
    ("context value too long", _raw(context={"page": "p" * 257}), "context_invalid"),
    ("context key empty", _raw(context={"": "x"}), "context_invalid"),
    ("context key too long", _raw(context={"k" * 65: "x"}), "context_invalid"),
    ("deeply nested array", b"[" * _NEST + b"]" * _NEST, "not_json"),
    ("deeply nested field", _raw()[:-1] + b', "extra": ' + b"[" * _NEST + b"]" * _NEST + b"}", "not_json"),
]


@pytest.mark.parametrize(
    ("raw", "reason"), [(raw, reason) for _, raw, reason in BAD_INPUTS], ids=[n for n, *_ in BAD_INPUTS]
)
def test_bad_input_becomes_a_decode_error_with_its_reason_and_position(raw: bytes, reason: str) -> None:
    result = decode(raw, POS, now=NOW, max_bytes=10 * len(raw) + 1024)
    assert isinstance(result, DecodeError), result
    assert result.reason == reason, result.detail
    assert result.position == POS
    assert result.raw == raw
    assert result.detail


def test_every_reason_a_record_can_be_rejected_for_by_decode_is_covered_above() -> None:
    produced = {reason for _, _, reason in BAD_INPUTS} | {"too_large"}
    # The pipeline and file readers, not decode, produce these two.
    assert produced == set(DECODE_REASONS) - {"duplicate_event_id", "malformed_line", "invalid"}


def test_record_larger_than_the_limit_is_too_large_and_keeps_only_a_bounded_prefix() -> None:
    raw = _raw(context={"note": "x" * 200}, padding="p" * DEFAULT_MAX_RECORD_BYTES)
    result = _decode(raw)
    assert isinstance(result, DecodeError)
    assert result.reason == "too_large"
    assert result.position == POS
    assert raw.startswith(result.raw)
    assert len(result.raw) <= DEFAULT_MAX_RECORD_BYTES


def test_record_size_limit_is_configurable_and_inclusive() -> None:
    raw = _raw()
    assert isinstance(_decode(raw, max_bytes=len(raw)), FeedbackEvent)
    assert _reason(raw, max_bytes=len(raw) - 1) == "too_large"


def test_id_of_exactly_the_maximum_length_is_accepted() -> None:
    event = _decode(_raw(event_id="e" * MAX_ID_LENGTH))
    assert isinstance(event, FeedbackEvent)
    assert len(event.event_id) == MAX_ID_LENGTH


def test_timestamp_bounds_are_1990_and_now_plus_the_allowed_future() -> None:
    assert isinstance(_decode(_raw(timestamp=MIN_TIMESTAMP)), FeedbackEvent)
    assert isinstance(_decode(_raw(timestamp=NOW + DEFAULT_MAX_FUTURE_S)), FeedbackEvent)
    assert _reason(_raw(timestamp=NOW + DEFAULT_MAX_FUTURE_S + 1)) == "timestamp_out_of_range"
    assert _reason(_raw(timestamp=NOW + 11), max_future_s=10) == "timestamp_out_of_range"
    assert isinstance(_decode(_raw(timestamp=NOW + 9), max_future_s=10), FeedbackEvent)


def test_unknown_event_type_detail_names_the_type_given_and_the_allowed_ones() -> None:
    result = _decode(_raw(event_type="review"))
    assert isinstance(result, DecodeError)
    assert "'review'" in result.detail
    assert all(t.value in result.detail for t in EventType)


def test_context_of_exactly_the_maximum_size_is_accepted() -> None:
    event = _decode(_raw(context={f"k{i}": i for i in range(MAX_CONTEXT_KEYS)}))
    assert isinstance(event, FeedbackEvent)
    assert event.context is not None and len(event.context) == MAX_CONTEXT_KEYS


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_context_value_is_rejected(token: bytes) -> None:
    raw = _raw(context={"score": 0.5}).replace(b"0.5", token)
    assert _reason(raw) in ("non_finite", "context_invalid")


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"1e400"])
def test_non_finite_number_as_an_id_is_rejected(token: bytes) -> None:
    raw = _raw(event_id=0).replace(b'"event_id": 0', b'"event_id": ' + token)
    assert _reason(raw) in ("non_finite", "id_invalid")


# ---- decode never raises ------------------------------------------------------------------------------

positions = st.builds(Position, st.text(min_size=1, max_size=20), st.integers(0, 1000), st.integers(0, 2**62))
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
FIELDS = ("event_id", "user_id", "item_id", "event_type", "value", "timestamp", "context")


@st.composite
def event_like(draw: st.DrawFn) -> dict[str, Any]:
    """A plausible event, then up to two fields removed or replaced by any JSON value."""
    body: dict[str, Any] = {
        "event_id": draw(st.text(max_size=140) | st.integers()),
        "user_id": draw(st.text(max_size=140) | st.integers()),
        "item_id": draw(st.text(max_size=140) | st.integers()),
        "event_type": draw(st.sampled_from([t.value for t in EventType])),
        "value": draw(st.floats(-2, 12) | st.sampled_from([0.0, 1.0, 10.0])),
        "timestamp": draw(st.floats(MIN_TIMESTAMP - 10, NOW + 2 * DEFAULT_MAX_FUTURE_S)),
    }
    if draw(st.booleans()):
        body["context"] = draw(st.dictionaries(st.text(max_size=70), json_scalars, max_size=20))
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=2, unique=True)):
        if draw(st.booleans()):
            body.pop(field, None)
        else:
            body[field] = draw(json_values)
    return body


def _check_result(result: FeedbackEvent | DecodeError, raw: bytes, position: Position) -> None:
    """What every decode result promises, whatever the input was."""
    if isinstance(result, DecodeError):
        assert result.reason in DECODE_REASONS
        assert result.position == position
        assert raw.startswith(result.raw)
        return
    assert isinstance(result, RatingEvent | ImplicitEvent)
    lo, hi = VALUE_RANGES[result.event_type]
    assert lo <= result.value <= hi
    assert MIN_TIMESTAMP <= result.timestamp <= NOW + DEFAULT_MAX_FUTURE_S
    for ident in (result.event_id, result.user_id, result.item_id):
        assert 1 <= len(ident) <= MAX_ID_LENGTH
    assert result.context is None or len(result.context) <= MAX_CONTEXT_KEYS


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=300), position=positions)
def test_decode_of_arbitrary_bytes_never_raises(raw: bytes, position: Position) -> None:
    _check_result(decode(raw, position, now=NOW), raw, position)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values, position=positions)
def test_decode_of_arbitrary_json_values_never_raises(value: Any, position: Position) -> None:
    raw = json.dumps(value).encode()
    _check_result(decode(raw, position, now=NOW), raw, position)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=event_like(), position=positions)
def test_decode_of_event_shaped_records_never_raises_and_accepts_only_valid_events(
    body: dict[str, Any], position: Position
) -> None:
    raw = json.dumps(body).encode()
    _check_result(decode(raw, position, now=NOW), raw, position)


finite_context = st.dictionaries(
    st.text(min_size=1, max_size=64),
    st.text(max_size=256) | st.booleans() | st.floats(allow_nan=False, allow_infinity=False),
    max_size=MAX_CONTEXT_KEYS,
)


@settings(max_examples=100, deadline=None)
@given(
    event_type=st.sampled_from(list(EventType)),
    fraction=st.floats(0, 1),
    timestamp=st.floats(MIN_TIMESTAMP, NOW + DEFAULT_MAX_FUTURE_S),
    ids=st.tuples(*[st.text(min_size=1, max_size=MAX_ID_LENGTH).filter(str.strip)] * 3),
    context=st.none() | finite_context,
)
def test_every_valid_event_round_trips_through_its_canonical_bytes(
    event_type: EventType,
    fraction: float,
    timestamp: float,
    ids: tuple[str, str, str],
    context: dict[str, Any] | None,
) -> None:
    lo, hi = VALUE_RANGES[event_type]
    body = {
        "event_id": ids[0],
        "user_id": ids[1],
        "item_id": ids[2],
        "event_type": event_type.value,
        "value": lo + fraction * (hi - lo),
        "timestamp": timestamp,
        "context": context,
    }
    event = _decode(json.dumps(body).encode())
    assert isinstance(event, FeedbackEvent), event
    again = _decode(event_to_json(event))
    assert again == event
    assert math.isfinite(again.value)


# ---- the committed JSON Schemas -----------------------------------------------------------------------


def test_committed_json_schemas_equal_the_models_schemas() -> None:
    """Fails when a wire model changed and `stream-adapt schemas export schemas` was not rerun."""
    expected = json_schemas()
    on_disk = {p.name: json.loads(p.read_text()) for p in sorted(SCHEMA_DIR.glob("*.json"))}
    assert sorted(on_disk) == sorted(expected), "schemas/ holds other files than json_schemas() names"
    for name, schema in expected.items():
        assert on_disk[name] == json.loads(json.dumps(schema)), f"schemas/{name} is stale: rerun the export"
