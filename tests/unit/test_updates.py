"""Adapter payloads: safetensors with metadata, verified before anything is loaded; never pickle."""

from __future__ import annotations

import itertools
import json
import struct
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import save as np_save
from safetensors.torch import load as st_load

from stream_adapt.events import ModelUpdate
from stream_adapt.learning.updates import (
    METADATA_KEY,
    REJECT_REASONS,
    RejectedUpdate,
    decode_update,
    encode_update,
    read_metadata,
)

FINGERPRINT = "sha256:" + "ab" * 32
SPEC = {"emb": (8,), "bias": (1,), "lora_b": (4, 2)}


def _update(**changes: Any) -> ModelUpdate:
    fields: dict[str, Any] = {
        "entity": "u-17",
        "entity_kind": "user",
        "version": 3,
        "parent_version": 2,
        "base_fingerprint": FINGERPRINT,
        "trigger": "window_full",
        "positions": [{"topic": "feedback", "partition": 2, "offset": 40 + k} for k in range(8)],
        "loss_before": 1.25,
        "loss_after": 0.5,
        "n_support": 6,
        "n_query": 2,
        "event_time_first": 1_700_000_000.0,
        "event_time_last": 1_700_000_900.0,
        "created_at": 1_700_001_000.0,
        "tensors": {name: list(shape) for name, shape in SPEC.items()},
    }
    return ModelUpdate(**{**fields, **changes})


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in SPEC.items()}


def _payload(**changes: Any) -> bytes:
    return encode_update(_update(**changes), _tensors())


def _np_payload(arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """A payload written by hand (as a foreign or buggy producer might)."""
    meta = {METADATA_KEY: _update().model_dump_json()} if metadata is None else metadata
    return np_save(arrays, metadata=meta)


def _valid_arrays() -> dict[str, np.ndarray]:
    return {name: t.numpy() for name, t in _tensors().items()}


def _rejected(payload: bytes, spec: dict[str, tuple[int, ...]] = SPEC, fingerprint: str | None = FINGERPRINT) -> str:
    with pytest.raises(RejectedUpdate) as info:
        decode_update(payload, spec, fingerprint)
    assert info.value.reason in REJECT_REASONS
    assert info.value.detail
    return info.value.reason


def test_encode_then_decode_round_trips_metadata_and_tensors_exactly() -> None:
    update, tensors = _update(), _tensors()
    got_update, got_tensors = decode_update(encode_update(update, tensors), SPEC, FINGERPRINT)
    assert got_update == update
    assert set(got_tensors) == set(tensors)
    for name, t in tensors.items():
        assert got_tensors[name].dtype == torch.float32
        assert torch.equal(got_tensors[name], t)


def test_encoding_converts_other_float_dtypes_and_non_contiguous_tensors_to_float32() -> None:
    tensors = _tensors()
    tensors["lora_b"] = torch.randn(2, 4, dtype=torch.float64).T  # non-contiguous float64 of shape (4, 2)
    _, got = decode_update(encode_update(_update(), tensors), SPEC, FINGERPRINT)
    assert got["lora_b"].dtype == torch.float32
    torch.testing.assert_close(got["lora_b"], tensors["lora_b"].float())


def test_decode_without_an_expected_fingerprint_accepts_any_base() -> None:
    update, _ = decode_update(_payload(base_fingerprint="sha256:other"), SPEC, None)
    assert update.base_fingerprint == "sha256:other"


def test_metadata_is_readable_without_loading_tensors() -> None:
    meta = read_metadata(_payload())
    assert ModelUpdate.model_validate_json(meta[METADATA_KEY]) == _update()


def test_payload_is_plain_safetensors_readable_by_safetensors_torch() -> None:
    tensors = st_load(_payload())
    assert {k: tuple(v.shape) for k, v in tensors.items()} == SPEC
    for name, t in _tensors().items():
        assert torch.equal(tensors[name], t)


def test_payload_contains_nothing_but_a_json_header_and_raw_float32_data() -> None:
    """No room for a pickle: 8-byte length, a JSON header that names every byte, then the tensor bytes."""
    payload = _payload()
    n = struct.unpack("<Q", payload[:8])[0]
    header = json.loads(payload[8 : 8 + n])
    assert set(header) == {"__metadata__", *SPEC}
    assert all(isinstance(v, str) for v in header["__metadata__"].values())
    spans = sorted(tuple(header[name]["data_offsets"]) for name in SPEC)
    assert all(header[name]["dtype"] == "F32" for name in SPEC)
    expected_bytes = sum(4 * int(np.prod(shape)) for shape in SPEC.values())
    assert spans[0][0] == 0 and spans[-1][1] == expected_bytes
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))  # contiguous, no gaps
    assert len(payload) == 8 + n + expected_bytes


# ---- what is refused, and why -------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 5, 8, 20, 100, -1, -4, -33])
def test_truncated_payload_is_rejected_as_corrupt(keep: int) -> None:
    payload = _payload()
    assert _rejected(payload[:keep]) == "corrupt"


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff" * 64,
        struct.pack("<Q", 0) + b"{}",
        struct.pack("<q", -8) + b"{}" * 10,
        struct.pack("<Q", 2**63) + b"{}",
        struct.pack("<Q", 12) + b"not json at all",
        struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc",
    ],
    ids=["all-ones", "zero-length-header", "negative-length", "huge-length", "header-not-json", "header-not-utf8"],
)
def test_garbage_header_is_rejected_as_corrupt(payload: bytes) -> None:
    assert _rejected(payload) == "corrupt"


def test_header_that_points_past_the_data_is_rejected_as_corrupt() -> None:
    header = {
        "__metadata__": {METADATA_KEY: _update().model_dump_json()},
        "emb": {"dtype": "F32", "shape": [8], "data_offsets": [0, 4096]},
    }
    raw = json.dumps(header).encode()
    assert _rejected(struct.pack("<Q", len(raw)) + raw + b"\0" * 32) == "corrupt"


def test_update_for_another_base_model_is_rejected_as_foreign_fingerprint() -> None:
    assert _rejected(_payload(base_fingerprint="sha256:" + "cd" * 32)) == "foreign_fingerprint"


WRONG_TENSORS: list[tuple[str, dict[str, np.ndarray]]] = [
    ("missing", {k: v for k, v in _valid_arrays().items() if k != "lora_b"}),
    ("extra", {**_valid_arrays(), "extra": np.zeros(3, dtype=np.float32)}),
    ("wrong-length", {**_valid_arrays(), "emb": np.zeros(9, dtype=np.float32)}),
    ("transposed", {**_valid_arrays(), "lora_b": np.zeros((2, 4), dtype=np.float32)}),
    ("scalar-for-1", {**_valid_arrays(), "bias": np.zeros((), dtype=np.float32)}),
    ("float64", {**_valid_arrays(), "emb": np.zeros(8, dtype=np.float64)}),
    ("float16", {**_valid_arrays(), "emb": np.zeros(8, dtype=np.float16)}),
    ("int32", {**_valid_arrays(), "emb": np.zeros(8, dtype=np.int32)}),
]


@pytest.mark.parametrize("arrays", [a for _, a in WRONG_TENSORS], ids=[w for w, _ in WRONG_TENSORS])
def test_wrong_tensor_names_shapes_or_dtypes_are_rejected(arrays: dict[str, np.ndarray]) -> None:
    assert _rejected(_np_payload(arrays)) == "wrong_tensors"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_tensor_values_are_rejected(bad: float) -> None:
    arrays = _valid_arrays()
    arrays["lora_b"][3, 1] = bad
    assert _rejected(_np_payload(arrays)) == "non_finite"


def test_non_finite_loss_in_metadata_is_rejected() -> None:
    meta = json.loads(_update().model_dump_json())
    meta["loss_after"] = float("nan")
    assert _rejected(_np_payload(_valid_arrays(), {METADATA_KEY: json.dumps(meta)})) == "non_finite"


@pytest.mark.parametrize(
    "metadata",
    [
        {},
        {"other.key": "{}"},
        {METADATA_KEY: "not json"},
        {METADATA_KEY: json.dumps({"entity": "u-1"})},
        {METADATA_KEY: _update().model_dump_json().replace('"version":3', '"version":0')},
        {METADATA_KEY: _update().model_dump_json().replace('"schema_version":1', '"schema_version":2')},
        {METADATA_KEY: _update().model_dump_json().replace('"trigger":"window_full"', '"trigger":"cron"')},
    ],
    ids=["none", "other-key", "not-json", "incomplete", "version-0", "future-schema", "unknown-trigger"],
)
def test_missing_or_invalid_metadata_is_rejected_as_bad_metadata(metadata: dict[str, str]) -> None:
    assert _rejected(_np_payload(_valid_arrays(), metadata)) == "bad_metadata"


def test_metadata_value_that_is_not_a_string_is_rejected_as_bad_metadata() -> None:
    header = {"__metadata__": {METADATA_KEY: {"entity": "u-1"}}}
    raw = json.dumps(header).encode()
    assert _rejected(struct.pack("<Q", len(raw)) + raw) == "bad_metadata"


def test_rejection_is_reported_before_any_tensor_is_returned() -> None:
    """The foreign-fingerprint check needs only the header: a payload with broken tensor data still
    reports the fingerprint, and nothing is returned for it."""
    payload = _payload(base_fingerprint="sha256:elsewhere")
    n = struct.unpack("<Q", payload[:8])[0]
    assert _rejected(payload[: 8 + n + 3]) == "foreign_fingerprint"
