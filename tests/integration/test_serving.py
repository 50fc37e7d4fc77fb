"""ModelSubscriber against a real broker: catch up on a topic holding good and bad records, then
follow new ones while serving predictions."""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable, Iterable

import pytest
import torch
from confluent_kafka import KafkaError, Message, Producer
from kafka_helpers import producer_config
from model_helpers import tiny_model

from stream_adapt.errors import StreamAdaptError
from stream_adapt.events import GLOBAL_ENTITY, ModelUpdate
from stream_adapt.learning.models import Adapter, NeuralRecommender, served
from stream_adapt.learning.updates import CONTENT_TYPE, encode_update
from stream_adapt.serving import ModelSubscriber

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TopicFactory = Callable[..., str]
#: (partition, key, value)
Row = tuple[int, bytes, bytes | None]

USERS = [f"u{i}" for i in range(6)]
ITEMS = [f"i{i}" for i in range(10)]
FINGERPRINT = "sha256:" + "9a" * 32
T0 = 1_700_000_000.0


def update(
    model: NeuralRecommender, entity: str, version: int, *, fingerprint: str = FINGERPRINT, nan: bool = False
) -> tuple[bytes, Adapter]:
    """An adapter version as the service publishes it (random tensors, seeded by entity and version)."""
    is_global = entity == GLOBAL_ENTITY
    spec = model.global_spec() if is_global else model.adapter_spec()
    gen = torch.Generator().manual_seed(zlib.crc32(f"{entity}/{version}".encode()))
    tensors = {name: torch.randn(shape, generator=gen) for name, shape in spec.items()}
    if nan:
        tensors["emb"][0] = float("nan")
    meta = ModelUpdate(
        entity=entity,
        entity_kind="global" if is_global else "user",
        version=version,
        parent_version=version - 1 or None,
        base_fingerprint=fingerprint,
        trigger="global_drift" if is_global else "window_full",
        positions=[] if is_global else [{"topic": "feedback", "partition": 0, "offset": version}],
        loss_before=1.0,
        loss_after=0.5,
        n_support=3,
        n_query=1,
        event_time_first=T0,
        event_time_last=T0 + 1,
        created_at=T0 + 2,
        tensors={k: list(v) for k, v in spec.items()},
    )
    return encode_update(meta, tensors), tensors


def produce_at(bootstrap: str, topic: str, rows: Iterable[Row], timeout_s: float = 15.0) -> None:
    """Produce to explicit partitions with the model topic's headers; fail unless all are acknowledged."""
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err)

    producer = Producer(producer_config(bootstrap))
    for partition, key, value in rows:
        headers: dict[str, str | bytes | None] = {
            "content-type": CONTENT_TYPE,
            "stream-adapt-base-fingerprint": FINGERPRINT,
        }
        producer.produce(topic, value=value, key=key, partition=partition, headers=headers, on_delivery=on_delivery)
    assert producer.flush(timeout_s) == 0, "not every record was delivered in time"
    assert not errors, errors[:3]


def expected(model: NeuralRecommender, adapter: Adapter | None, user: str, shared: Adapter) -> list[float]:
    batched = (
        model.initial_adapter(model.entity_index([user]))
        if adapter is None
        else {k: v.unsqueeze(0) for k, v in adapter.items()}
    )
    with torch.no_grad():
        out = served(model, model.predict(batched, model.counterpart_index(ITEMS).unsqueeze(0), shared))
    return [float(x) for x in out[0]]


def test_subscriber_catches_up_on_good_and_bad_records_then_follows_new_ones(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    model = tiny_model(USERS, ITEMS, FINGERPRINT, noise=0.3, global_bias=None)
    topic = topic_factory("models", partitions=2, config={"cleanup.policy": "compact"})
    u0_v1, _ = update(model, "u0", 1)
    u0_v2, u0_v2_tensors = update(model, "u0", 2)
    u1_v1, u1_v1_tensors = update(model, "u1", 1)
    g_v1, g_v1_tensors = update(model, GLOBAL_ENTITY, 1)
    rows: list[Row] = [
        (0, b"u0", u0_v1),
        (0, b"u0", u0_v2),
        (1, b"u1", u1_v1),
        (1, b"u2", update(model, "u2", 1, fingerprint="sha256:" + "01" * 32)[0]),  # another base model
        (0, b"u3", u0_v2[: len(u0_v2) // 2]),  # truncated
        (0, b"u0", update(model, "u0", 1)[0]),  # an older version after the newer one
        (1, b"u1", update(model, "u1", 2, nan=True)[0]),  # non-finite
        (0, GLOBAL_ENTITY.encode(), g_v1),
    ]
    produce_at(kafka_bootstrap, topic, rows)
    baseline = ModelSubscriber(model, None, topic)  # what serving scores with before any update

    with ModelSubscriber(model, kafka_bootstrap, topic) as sub:
        assert sub.wait_until_caught_up(30)

        assert {e: sub.version(e) for e in ["u0", "u1", "u2", "u3", GLOBAL_ENTITY]} == {
            "u0": 2,
            "u1": 1,
            "u2": None,
            "u3": None,
            GLOBAL_ENTITY: 1,
        }
        assert sub.rejected == Counter({"foreign_fingerprint": 1, "corrupt": 1, "stale": 1, "non_finite": 1})
        stats = sub.stats
        assert (stats.records, stats.accepted, stats.entities, stats.caught_up, stats.running) == (8, 4, 2, True, True)
        assert sub.predict("u0", ITEMS) == pytest.approx(expected(model, u0_v2_tensors, "u0", g_v1_tensors))
        assert sub.predict("u1", ITEMS) == pytest.approx(expected(model, u1_v1_tensors, "u1", g_v1_tensors))
        assert sub.predict("u2", ITEMS) == pytest.approx(expected(model, None, "u2", g_v1_tensors))
        assert sub.predict("u2", ITEMS) != pytest.approx(baseline.predict("u2", ITEMS))  # the global one counts

        # New records while serving: applied as they arrive, bad ones still refused.
        u0_v3, u0_v3_tensors = update(model, "u0", 3)
        u4_v1, u4_v1_tensors = update(model, "u4", 1)
        produce_at(kafka_bootstrap, topic, [(0, b"u0", u0_v3), (1, b"u4", u4_v1), (1, b"u4", b"\x01\x02")])

        def settled(s: ModelSubscriber) -> bool:
            return s.stats.records == 11

        assert sub.wait_for(settled, timeout_s=30), sub.stats
        assert (sub.version("u0"), sub.version("u4")) == (3, 1)
        assert sub.rejected["corrupt"] == 2
        assert sub.predict("u0", ITEMS) == pytest.approx(expected(model, u0_v3_tensors, "u0", g_v1_tensors))
        assert sub.predict("u4", ITEMS) == pytest.approx(expected(model, u4_v1_tensors, "u4", g_v1_tensors))
    assert not sub.stats.running
    assert sub.version("u0") == 3  # what was loaded stays usable after stop


def test_subscriber_on_an_empty_topic_is_caught_up_at_once_and_serves_the_base_model(
    kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    model = tiny_model(USERS, ITEMS, FINGERPRINT, noise=0.3, global_bias=None)
    topic = topic_factory("models", partitions=3)
    with ModelSubscriber(model, kafka_bootstrap, topic) as sub:
        assert sub.wait_until_caught_up(30)
        assert sub.stats.records == 0
        assert sub.predict("u1", ITEMS) == pytest.approx(expected(model, None, "u1", model.global_adapter()))


def test_subscriber_start_on_a_missing_topic_fails_naming_servers_and_topic(kafka_bootstrap: str) -> None:
    sub = ModelSubscriber(
        tiny_model(USERS, ITEMS, FINGERPRINT, noise=0.3, global_bias=None), kafka_bootstrap, "no-such-models-3b7a"
    )
    with pytest.raises(StreamAdaptError) as info:
        sub.start()
    message = str(info.value)
    assert kafka_bootstrap in message and "'no-such-models-3b7a'" in message and "does not exist" in message
