"""ModelSubscriber without a broker: what `apply` loads or refuses, and how `predict` scores."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from model_helpers import update_metadata
from safetensors.numpy import save as np_save

from stream_adapt.config import pipeline_config
from stream_adapt.errors import StreamAdaptError
from stream_adapt.events import GLOBAL_ENTITY, Position, Record
from stream_adapt.io.directory import DirSink
from stream_adapt.learning.models import Adapter, EntityKind, NeuralRecommender, RecommenderConfig, freeze, served
from stream_adapt.learning.pipeline import Pipeline
from stream_adapt.learning.updates import METADATA_KEY, encode_update
from stream_adapt.serving import ModelSubscriber

USERS = [f"u{i}" for i in range(4)]
ITEMS = [f"i{i}" for i in range(10)]
FINGERPRINT = "sha256:" + "5e" * 32
T0 = 1_700_000_000.0


def tiny_model(entity: EntityKind = "user") -> NeuralRecommender:
    torch.manual_seed(0)
    cfg = RecommenderConfig(n_users=len(USERS), n_items=len(ITEMS), dim=8, hidden=16, entity=entity)
    model = NeuralRecommender(cfg, USERS, ITEMS)
    with torch.no_grad():  # weights that make every user and item score differently
        for p in model.parameters():
            p.normal_(0, 0.3)
        model.global_bias.fill_(3.0)  # base scores inside the rating range
    freeze(model)
    model.fingerprint = FINGERPRINT
    return model


def tensors_for(model: NeuralRecommender, entity: str, seed: int) -> Adapter:
    spec = model.global_spec() if entity == GLOBAL_ENTITY else model.adapter_spec()
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in spec.items()}


def payload(
    model: NeuralRecommender, entity: str, version: int, seed: int | None = None, **changes: Any
) -> tuple[bytes, Adapter]:
    tensors = tensors_for(model, entity, version if seed is None else seed)
    return encode_update(update_metadata(model, entity, version, **changes), tensors), tensors


def expected_scores(
    model: NeuralRecommender, adapter: Adapter | None, user: str, items: list[str], shared: Adapter | None = None
) -> list[float]:
    """What base + adapter (or the initial one) + shared scores, computed directly."""
    batched = (
        model.initial_adapter(model.entity_index([user]))
        if adapter is None
        else {k: v.unsqueeze(0) for k, v in adapter.items()}
    )
    with torch.no_grad():
        out = served(
            model, model.predict(batched, model.counterpart_index(items).unsqueeze(0), shared or model.global_adapter())
        )
    return [float(x) for x in out[0]]


@pytest.fixture
def model() -> NeuralRecommender:
    return tiny_model()


@pytest.fixture
def sub(model: NeuralRecommender) -> ModelSubscriber:
    return ModelSubscriber(model, None, "models")


# ---- accepted updates ---------------------------------------------------------------------------------


def test_good_update_is_loaded_and_changes_the_entitys_predictions(
    model: NeuralRecommender, sub: ModelSubscriber
) -> None:
    before = sub.predict("u1", ITEMS)
    assert before == pytest.approx(expected_scores(model, None, "u1", ITEMS))
    data, tensors = payload(model, "u1", 1)

    assert sub.apply(b"u1", data) is True

    assert sub.version("u1") == 1
    after = sub.predict("u1", ITEMS)
    assert after == pytest.approx(expected_scores(model, tensors, "u1", ITEMS))
    assert after != pytest.approx(before)
    assert sub.predict("u2", ITEMS) == pytest.approx(expected_scores(model, None, "u2", ITEMS))  # others unchanged
    stats = sub.stats
    assert (stats.records, stats.accepted, stats.entities, stats.rejected) == (1, 1, 1, {})


def test_a_newer_version_replaces_the_held_one(model: NeuralRecommender, sub: ModelSubscriber) -> None:
    sub.apply(b"u1", payload(model, "u1", 1)[0])
    data, newer = payload(model, "u1", 5)
    assert sub.apply(b"u1", data) is True
    assert sub.version("u1") == 5
    assert sub.predict("u1", ITEMS) == pytest.approx(expected_scores(model, newer, "u1", ITEMS))


def test_an_entity_the_base_model_never_saw_gets_its_adapter(model: NeuralRecommender, sub: ModelSubscriber) -> None:
    cold = sub.predict("newcomer", ITEMS)
    data, tensors = payload(model, "newcomer", 1)
    assert sub.apply(b"newcomer", data)
    assert sub.predict("newcomer", ITEMS) == pytest.approx(expected_scores(model, tensors, "newcomer", ITEMS))
    assert sub.predict("another-newcomer", ITEMS) == pytest.approx(cold)


def test_unknown_items_and_no_items_are_scored_without_error(model: NeuralRecommender, sub: ModelSubscriber) -> None:
    assert sub.predict("u1", []) == []
    assert len(sub.predict("u1", ["never-seen-item", "i0"])) == 2


# ---- rejected updates ---------------------------------------------------------------------------------


def _truncated(model: NeuralRecommender) -> bytes:
    data = payload(model, "u1", 2)[0]
    return data[: len(data) - 7]


def _raw_arrays(model: NeuralRecommender, arrays: dict[str, np.ndarray]) -> bytes:
    return np_save(arrays, metadata={METADATA_KEY: update_metadata(model, "u1", 2).model_dump_json()})


def _with_nan(model: NeuralRecommender) -> bytes:
    tensors = tensors_for(model, "u1", 2)
    tensors["emb"][3] = float("nan")
    return encode_update(update_metadata(model, "u1", 2), tensors)


BAD_PAYLOADS: dict[str, tuple[str, Any]] = {
    "foreign fingerprint": (
        "foreign_fingerprint",
        lambda m: payload(m, "u1", 2, base_fingerprint="sha256:" + "00" * 32)[0],
    ),
    "other entity kind": ("foreign_fingerprint", lambda m: payload(m, "u1", 2, entity_kind="item")[0]),
    "truncated": ("corrupt", _truncated),
    "not safetensors": ("corrupt", lambda m: b"\x00" * 3 + b"hello"),
    "no metadata": ("bad_metadata", lambda m: np_save({"emb": np.zeros(8, np.float32)})),
    "key is another entity": ("bad_metadata", lambda m: payload(m, "u2", 2)[0]),
    "NaN": ("non_finite", _with_nan),
    "wrong shape": (
        "wrong_tensors",
        lambda m: _raw_arrays(m, {"emb": np.zeros(9, np.float32), "bias": np.zeros(1, np.float32)}),
    ),
    "float64": (
        "wrong_tensors",
        lambda m: _raw_arrays(m, {"emb": np.zeros(8, np.float64), "bias": np.zeros(1, np.float64)}),
    ),
    "missing tensor": ("wrong_tensors", lambda m: _raw_arrays(m, {"emb": np.zeros(8, np.float32)})),
}


@pytest.mark.parametrize("case", list(BAD_PAYLOADS))
def test_a_rejected_record_is_counted_and_never_replaces_the_good_adapter(
    model: NeuralRecommender, sub: ModelSubscriber, case: str
) -> None:
    reason, make = BAD_PAYLOADS[case]
    good, tensors = payload(model, "u1", 1)
    sub.apply(b"u1", good)
    scores = sub.predict("u1", ITEMS)

    assert sub.apply(b"u1", make(model)) is False

    assert sub.rejected == {reason: 1}
    assert sub.version("u1") == 1
    assert sub.predict("u1", ITEMS) == scores == pytest.approx(expected_scores(model, tensors, "u1", ITEMS))
    assert (sub.stats.records, sub.stats.accepted) == (2, 1)


@pytest.mark.parametrize("stale_version", [1, 2])
def test_an_older_or_equal_version_is_rejected_as_stale(
    model: NeuralRecommender, sub: ModelSubscriber, stale_version: int
) -> None:
    data, newest = payload(model, "u1", 2)
    sub.apply(b"u1", data)
    assert sub.apply(b"u1", payload(model, "u1", stale_version, seed=99)[0]) is False
    assert sub.rejected == {"stale": 1}
    assert sub.version("u1") == 2
    assert sub.predict("u1", ITEMS) == pytest.approx(expected_scores(model, newest, "u1", ITEMS))


def test_an_unusable_record_for_an_unseen_entity_leaves_it_unknown(
    model: NeuralRecommender, sub: ModelSubscriber
) -> None:
    assert sub.apply(b"u1", _with_nan(model)) is False
    assert sub.version("u1") is None
    assert sub.stats.entities == 0


def test_rejections_are_logged_at_warning_with_entity_partition_and_offset(
    model: NeuralRecommender, sub: ModelSubscriber, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="stream_adapt.serving"):
        sub.apply(b"u3", _with_nan(model), partition=2, offset=41)
    [line] = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = line.getMessage()
    assert "entity=u3" in message and "partition=2" in message and "offset=41" in message
    assert "non_finite" in message


# ---- the global (shared) adapter ----------------------------------------------------------------------


def test_global_adapter_applies_to_every_entity_and_rejects_stale_or_misshapen_versions(
    model: NeuralRecommender, sub: ModelSubscriber
) -> None:
    adapter_u1 = payload(model, "u1", 1)
    sub.apply(b"u1", adapter_u1[0])
    data, shared = payload(model, GLOBAL_ENTITY, 3)

    assert sub.apply(GLOBAL_ENTITY.encode(), data) is True

    assert sub.version(GLOBAL_ENTITY) == 3 and sub.stats.global_version == 3
    assert sub.predict("u1", ITEMS) == pytest.approx(expected_scores(model, adapter_u1[1], "u1", ITEMS, shared))
    assert sub.predict("stranger", ITEMS) == pytest.approx(expected_scores(model, None, "stranger", ITEMS, shared))

    stale = payload(model, GLOBAL_ENTITY, 2)[0]
    entity_shaped = encode_update(update_metadata(model, GLOBAL_ENTITY, 4), tensors_for(model, "u1", 4))
    assert sub.apply(GLOBAL_ENTITY.encode(), stale) is False
    assert sub.apply(GLOBAL_ENTITY.encode(), entity_shaped) is False
    assert sub.rejected == {"stale": 1, "wrong_tensors": 1}
    assert sub.predict("stranger", ITEMS) == pytest.approx(expected_scores(model, None, "stranger", ITEMS, shared))


def test_a_tombstone_forgets_the_entity_and_a_later_version_is_accepted_again(
    model: NeuralRecommender, sub: ModelSubscriber
) -> None:
    initial = sub.predict("u1", ITEMS)
    sub.apply(b"u1", payload(model, "u1", 4)[0])
    assert sub.apply(b"u1", None) is True
    assert sub.version("u1") is None
    assert sub.predict("u1", ITEMS) == pytest.approx(initial)
    assert sub.apply(b"u1", payload(model, "u1", 1)[0]) is True
    assert sub.stats.deleted == 1


# ---- item entities ------------------------------------------------------------------------------------


def test_item_entity_model_scores_each_item_with_its_own_adapter() -> None:
    model = tiny_model("item")
    sub = ModelSubscriber(model, None, "models")
    items = ["i3", "i4", "i5"]
    before = sub.predict("u0", items)
    data, tensors = payload(model, "i4", 1)

    assert sub.apply(b"i4", data)

    after = sub.predict("u0", items)
    assert after[0] == pytest.approx(before[0]) and after[2] == pytest.approx(before[2])
    single = {k: v.unsqueeze(0) for k, v in tensors.items()}
    with torch.no_grad():
        expected = served(
            model, model.predict(single, model.counterpart_index(["u0"]).unsqueeze(0), model.global_adapter())
        )
    assert after[1] == pytest.approx(float(expected[0, 0]))
    assert after[1] != pytest.approx(before[1])
    # A user adapter (same shapes, same base) is not an item adapter.
    assert not sub.apply(b"i4", encode_update(update_metadata(model, "i4", 2, entity_kind="user"), tensors))


# ---- snapshots under concurrent updates ---------------------------------------------------------------


def test_predictions_during_updates_always_match_one_whole_version(model: NeuralRecommender) -> None:
    sub = ModelSubscriber(model, None, "models")
    versions = [payload(model, "u1", v) for v in range(1, 61)]
    allowed = [expected_scores(model, None, "u1", ITEMS)] + [
        expected_scores(model, t, "u1", ITEMS) for _, t in versions
    ]
    seen: list[list[float]] = []
    done = threading.Event()

    def predict_forever() -> None:
        while not done.is_set():
            seen.append(sub.predict("u1", ITEMS))

    reader = threading.Thread(target=predict_forever)
    reader.start()
    try:
        for data, _ in versions:
            assert sub.apply(b"u1", data)
    finally:
        done.set()
        reader.join(10)
    assert seen
    for scores in seen:
        assert any(scores == pytest.approx(a, abs=1e-6) for a in allowed)


# ---- offline: a directory sink's output ---------------------------------------------------------------


def _ratings(model: NeuralRecommender, users: list[str], per_user: int) -> list[Record]:
    """Each user rates a clear step above the base score, a bigger step each window of 4: every window
    has something to learn, so the run publishes several versions whatever the adaptation's tuning."""
    records: list[Record] = []
    for k in range(per_user):
        for u in users:
            n = len(records)
            item = ITEMS[(n * 7) % len(ITEMS)]
            base = expected_scores(model, None, u, [item])[0]
            event = {
                "event_id": f"e{n}",
                "user_id": u,
                "item_id": item,
                "event_type": "rating",
                "value": round(base + 0.6 * (1 + k // 4), 3),
                "timestamp": T0 + n,
            }
            records.append(Record(json.dumps(event).encode(), Position("feedback", 0, n), key=u.encode()))
    return records


def test_from_directory_holds_what_a_real_pipeline_run_published(tmp_path: Path) -> None:
    model = tiny_model()
    cfg = pipeline_config(
        {
            "window": {"shots": 4, "query_shots": 1, "min_shots": 2},
            "drift": {"global_detector": {"kind": "none"}, "entity_detector": {"kind": "none"}},
        }
    )
    pipeline = Pipeline(model, cfg)
    sink = DirSink(tmp_path / "out")
    users = ["u0", "u1", "u2", "stranger"]
    records = _ratings(model, users, per_user=8)
    step = cfg.window.shots * len(users)  # each batch fills exactly one window per user
    for start in range(0, len(records), step):
        sink.publish(pipeline.process(records[start : start + step], now=T0 + 1000))
    sink.close()
    published = {e: pipeline.table.version(e) for e in pipeline.table.entities if pipeline.table.version(e)}
    assert published == dict.fromkeys(users, 2)  # every window was accepted

    sub = ModelSubscriber.from_directory(model, tmp_path / "out")

    assert sub.wait_until_caught_up(0)
    assert {e: sub.version(e) for e in published} == published
    assert sub.stats.accepted == sum(published.values()) and sub.rejected == {}
    for entity in [*published, "never-adapted"]:
        adapter = pipeline.table.get(entity) if entity in published else None
        assert sub.predict(entity, ITEMS) == pytest.approx(
            expected_scores(model, adapter, entity, ITEMS, pipeline.shared), abs=1e-6
        )


def test_from_directory_refuses_updates_of_another_base_model(tmp_path: Path) -> None:
    model = tiny_model()
    sink = DirSink(tmp_path / "out")
    pipeline = Pipeline(model, pipeline_config({"window": {"shots": 4, "query_shots": 1, "min_shots": 2}}))
    sink.publish(pipeline.process(_ratings(model, ["u0", "u1"], per_user=4), now=T0 + 1000))
    sink.close()
    other = tiny_model()
    other.fingerprint = "sha256:" + "77" * 32

    sub = ModelSubscriber.from_directory(other, tmp_path / "out")

    assert sub.stats.accepted == 0 and sub.stats.entities == 0
    assert sub.rejected["foreign_fingerprint"] == sub.stats.records > 0


def test_an_offline_subscriber_cannot_start() -> None:
    with pytest.raises(StreamAdaptError, match="offline"):
        ModelSubscriber(tiny_model(), None, "models").start()
