"""The wire formats: feedback events in, adaptation outcomes and model updates out.

`decode(raw, position)` turns one record's bytes into a `FeedbackEvent` or a `DecodeError` value
carrying the raw bytes, a short machine-readable reason (a bounded set: it labels metrics), a human
detail and the record's position. It never raises on bad input.

The JSON Schemas under `schemas/` are generated from these models (`stream-adapt schemas export`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)
from typing_extensions import TypedDict

MAX_ID_LENGTH = 128
MAX_CONTEXT_KEYS = 16
DEFAULT_MAX_RECORD_BYTES = 64 * 1024
DEFAULT_MAX_FUTURE_S = 24 * 3600.0
# Timestamps are seconds since the Unix epoch. Anything before 1990 is a unit or default-value bug
# (milliseconds are caught by the far-future check).
MIN_TIMESTAMP = 631152000.0  # 1990-01-01T00:00:00Z


# Ids are strings; integers are accepted too (MovieLens, database keys) and `decode` turns them into
# strings. Floats, NaN and booleans are invalid. (A Python validator would double the decode time.)
if TYPE_CHECKING:
    Id = str  # what decode() hands out
else:
    Id = Annotated[
        Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH, strip_whitespace=True)]
        | Annotated[int, Field(strict=True)],
        Field(union_mode="left_to_right"),
    ]
ContextKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
ContextValue = Annotated[str, StringConstraints(max_length=256)] | bool | Annotated[float, Field(allow_inf_nan=False)]


class EventType(StrEnum):
    """Kinds of feedback. Explicit ratings carry a score; implicit kinds carry a strength in [0, 1]."""

    RATING = "rating"
    CLICK = "click"
    VIEW = "view"
    LIKE = "like"
    DISLIKE = "dislike"
    ADD_TO_CART = "add_to_cart"
    PURCHASE = "purchase"
    SKIP = "skip"


#: Allowed `value` range per event type (inclusive).
VALUE_RANGES: dict[EventType, tuple[float, float]] = {
    EventType.RATING: (0.0, 10.0),
    **{t: (0.0, 1.0) for t in EventType if t is not EventType.RATING},
}


class FeedbackEvent(BaseModel):
    """One piece of user feedback about one item.

    Decoded events are `RatingEvent` or `ImplicitEvent` (both subclasses): the discriminated union
    lets pydantic-core check each type's value range without Python validators (2x faster decode).
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    event_id: Id = Field(description="Unique id of the event; duplicates are dead-lettered.")
    user_id: Id
    item_id: Id
    event_type: EventType
    value: float = Field(allow_inf_nan=False, strict=True)
    timestamp: float = Field(
        allow_inf_nan=False,
        strict=True,
        ge=MIN_TIMESTAMP,
        description="Event time, seconds since the Unix epoch (UTC); at most `max_future_s` ahead of now.",
    )
    context: dict[ContextKey, ContextValue] | None = Field(
        default=None, max_length=MAX_CONTEXT_KEYS, description="Optional small context (device, page...)."
    )


class RatingEvent(FeedbackEvent):
    """An explicit rating."""

    event_type: Literal[EventType.RATING]
    value: float = Field(allow_inf_nan=False, strict=True, ge=0.0, le=10.0, description="Rating in [0, 10].")


class ImplicitEvent(FeedbackEvent):
    """Implicit feedback: value is its strength in [0, 1] (1 for a plain click, view, purchase...)."""

    event_type: Literal[
        EventType.CLICK,
        EventType.VIEW,
        EventType.LIKE,
        EventType.DISLIKE,
        EventType.ADD_TO_CART,
        EventType.PURCHASE,
        EventType.SKIP,
    ]
    value: float = Field(allow_inf_nan=False, strict=True, ge=0.0, le=1.0, description="Strength in [0, 1].")


AnyEvent = Annotated[RatingEvent | ImplicitEvent, Field(discriminator="event_type")]


class Position(NamedTuple):
    """Where a record came from (hot path: a plain tuple). For files: partition 0, offset = line - 1."""

    topic: str
    partition: int
    offset: int


class SourcePosition(TypedDict):
    """A `Position` in the published JSON (adaptation log, model update metadata)."""

    topic: str
    partition: Annotated[int, Field(ge=0)]
    offset: Annotated[int, Field(ge=0)]


Outcome = Literal["accepted", "rolled_back", "expired"]
Trigger = Literal["window_full", "max_age", "drift", "evicted", "end_of_stream", "global_drift"]


class AdaptationRecord(BaseModel):
    """One line of the adaptation log: what happened to one window (or one global re-adaptation).

    Every valid event ends in exactly one record (or is still pending in an open window), so an audit
    over the log proves that nothing was lost or used twice.
    """

    model_config = ConfigDict(frozen=True)

    entity: str
    entity_kind: Literal["user", "item", "global"]
    outcome: Outcome
    reason: str = Field(description="Why: 'improved', or the rollback/expiry reason.")
    trigger: Trigger
    version: int | None = Field(description="Version published when accepted, else null.")
    parent_version: int | None
    base_fingerprint: str
    positions: list[SourcePosition]
    n_support: int
    n_query: int
    loss_before: float | None
    loss_after: float | None
    event_time_first: float | None
    event_time_last: float | None
    created_at: float = Field(description="Wall time the window closed (seconds since the epoch).")


class ModelUpdate(BaseModel):
    """Metadata of one published adapter version. The tensors travel beside it as safetensors bytes."""

    model_config = ConfigDict(frozen=True)

    schema_version: Literal[1] = 1
    entity: str = Field(description="Entity id, or the reserved key '__global__' for the shared part.")
    entity_kind: Literal["user", "item", "global"]
    version: int = Field(ge=1, description="Monotonic per entity.")
    parent_version: int | None
    base_fingerprint: str = Field(description="sha256 of the frozen base model this adapter applies to.")
    trigger: Trigger
    positions: list[SourcePosition] = Field(description="Exact source positions of the events consumed.")
    loss_before: float
    loss_after: float
    n_support: int
    n_query: int
    event_time_first: float | None
    event_time_last: float | None
    created_at: float
    tensors: dict[str, list[int]] = Field(description="Adapter tensor names and shapes (float32).")


GLOBAL_ENTITY = "__global__"


@dataclass(frozen=True, slots=True)
class Record:
    """One raw record as read from a source (a topic or a file)."""

    value: bytes
    position: Position
    key: bytes | None = None
    timestamp_ms: int | None = None


@dataclass(frozen=True, slots=True)
class DecodeError:
    """A record that could not become a `FeedbackEvent`: kept whole, with why and where."""

    raw: bytes
    reason: str
    detail: str
    position: Position
    key: bytes | None = None  # the record's key and timestamp, when it came from a topic
    timestamp_ms: int | None = None


#: The bounded set of reasons a record can be dead-lettered for (they label metrics).
DECODE_REASONS = (
    "too_large",
    "not_json",
    "missing_field",
    "wrong_type",
    "non_finite",
    "unknown_event_type",
    "id_invalid",
    "value_out_of_range",
    "timestamp_out_of_range",
    "context_invalid",
    "duplicate_event_id",
    "malformed_line",
    "invalid",
)

_EVENT_ADAPTER: TypeAdapter[RatingEvent | ImplicitEvent] = TypeAdapter(AnyEvent)


def validate_event(data: dict[str, Any]) -> FeedbackEvent:
    """Build an event from Python values with every check `decode` applies but the future bound."""
    return _EVENT_ADAPTER.validate_python(data)


_EVENT_TYPES = frozenset(t.value for t in EventType)
# Names pydantic puts in an error's location for union branches and tags: not fields, left out of details.
_NOT_FIELDS = _EVENT_TYPES | {"str", "int", "constrained-str", "float", "bool"}


def _field(loc: tuple[Any, ...]) -> str:
    """The event field an error is about (the union tag, e.g. 'rating', is dropped)."""
    parts = [str(p) for p in loc if str(p) not in _NOT_FIELDS]
    return parts[0] if parts else ""


def _reason(err: Any) -> str:
    kind = str(err.get("type", ""))
    field = _field(tuple(err.get("loc") or ()))
    if field == "context":
        return "context_invalid"
    if kind in ("json_invalid", "json_type", "model_type", "model_attributes_type", "dict_type"):
        return "not_json" if not field else "wrong_type"
    if kind == "union_tag_not_found":
        return "missing_field"
    if kind == "union_tag_invalid":
        return "unknown_event_type"
    if kind == "missing":
        return "missing_field"
    if kind == "finite_number":
        return "non_finite"
    if field == "context":
        return "context_invalid"
    if kind == "enum":
        return "unknown_event_type"
    if field in ("event_id", "user_id", "item_id"):
        return "id_invalid"
    if field == "timestamp" and kind in ("greater_than_equal", "value_error"):
        return "timestamp_out_of_range"
    if field == "value" and kind in ("greater_than_equal", "less_than_equal"):
        return "value_out_of_range"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return "wrong_type"
    return "invalid"


def decode(
    raw: bytes,
    position: Position,
    *,
    max_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    max_future_s: float = DEFAULT_MAX_FUTURE_S,
    now: float | None = None,
) -> FeedbackEvent | DecodeError:
    """Decode one record. Never raises for bad input: returns a `DecodeError` value instead."""
    if len(raw) > max_bytes:
        return DecodeError(raw[:max_bytes], "too_large", f"{len(raw)} bytes > limit {max_bytes}", position)
    try:
        event = _EVENT_ADAPTER.validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        first: Any = errors[0] if errors else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if str(p) not in _NOT_FIELDS)
        reason = _reason(first)
        if reason == "unknown_event_type":
            tag = (first.get("ctx") or {}).get("tag", "?")
            detail = f"event_type: {tag!r} is not one of {', '.join(sorted(_EVENT_TYPES))}"
        else:
            detail = f"{loc}: {first.get('msg', '')}" if loc else str(first.get("msg", "invalid"))
        return DecodeError(raw, reason, detail[:500], position)
    except (RecursionError, ValueError, UnicodeError) as exc:  # pathological input the parser refuses
        return DecodeError(raw, "not_json", f"{type(exc).__name__}: {exc}"[:500], position)
    if type(event.user_id) is not str or type(event.item_id) is not str or type(event.event_id) is not str:
        event = event.model_copy(
            update={"event_id": str(event.event_id), "user_id": str(event.user_id), "item_id": str(event.item_id)}
        )
        # The string branch bounds the length; an integer id of up to 4300 digits would pass unchecked and
        # be kept as a 4300-character key (dedup cache, windows, detectors): the memory bounds count ids.
        for name in ("event_id", "user_id", "item_id"):
            n = len(getattr(event, name))
            if n > MAX_ID_LENGTH:
                detail = f"{name}: an integer id of {n} characters is longer than {MAX_ID_LENGTH}"
                return DecodeError(raw, "id_invalid", detail, position)
    limit = (now or time.time()) + max_future_s
    if event.timestamp > limit:
        detail = f"timestamp: {event.timestamp:.0f} is more than {max_future_s:.0f}s in the future"
        return DecodeError(raw, "timestamp_out_of_range", detail, position)
    return event


def event_to_json(event: FeedbackEvent) -> bytes:
    """The canonical wire bytes of an event (what `decode` reads back)."""
    return event.model_dump_json(exclude_none=True).encode()


def finite_or_none(x: float | None) -> float | None:
    """JSON has no NaN: non-finite losses are written as null."""
    return None if x is None or not math.isfinite(x) else float(x)


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema documents published under `schemas/`, by file name."""
    return {
        "feedback_event.schema.json": _EVENT_ADAPTER.json_schema(),
        "model_update.schema.json": ModelUpdate.model_json_schema(),
        "adaptation_record.schema.json": AdaptationRecord.model_json_schema(),
    }


def export_schemas(directory: Path) -> list[Path]:
    """Write every schema to `directory`; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in json_schemas().items():
        path = directory / name
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
