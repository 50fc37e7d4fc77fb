"""Per-entity state that must not grow without bound (found while measuring 1M distinct entities).

- An entity whose drift was detected while its window was short stayed in the pipeline's set of
  drifted entities for good once that window expired (aged out, evicted): one entry per such entity,
  forever. It is now forgotten with the expired window.
- `AdapterTable.drop_partitions` (a rebalance revoked the entity's partition) never reused the rows of
  the entities it dropped: every revoke/re-assign cycle grew the adapter tensors. Freed rows are now
  handed out again.

The bounded structures themselves (open windows, drift detectors, the dedup cache, the global
reservoir) are checked under load in test_hostile_input.py and benchmarks/bench_entities.py.
"""

from __future__ import annotations

import json

import torch
from model_helpers import tiny_model

from stream_adapt.config import pipeline_config
from stream_adapt.events import Position, Record
from stream_adapt.learning.pipeline import BatchResult, Pipeline
from stream_adapt.learning.state import AdapterTable

T0 = 1_700_000_000.0
ITEMS = [f"i{i}" for i in range(10)]
HOUR = 3600.0


def rating(offset: int, user: str, value: float, ts: float) -> Record:
    body: dict[str, object] = {"event_id": f"e{offset}", "user_id": user, "item_id": ITEMS[offset % 10]}
    body |= {"event_type": "rating", "value": value, "timestamp": ts}
    return Record(json.dumps(body).encode(), Position("feedback", 0, offset))


def drifting_pipeline() -> Pipeline:
    """Windows of 8 (adapted from 4 shots), one hour max age; an entity detector that fires at once."""
    return Pipeline(
        tiny_model(["a", "b"], ITEMS, "sha256:bounded", dim=4, hidden=8),
        pipeline_config(
            {
                "window": {"shots": 8, "min_shots": 4, "max_age_s": HOUR},
                "drift": {
                    "global_detector": {"kind": "none"},
                    "entity_detector": {"kind": "page_hinkley", "ph_threshold": 0.5, "ph_min_instances": 1},
                    "entity_warmup": 0,
                },
            }
        ),
    )


def test_an_entity_that_drifted_with_a_short_window_is_forgotten_when_the_window_expires() -> None:
    p = drifting_pipeline()
    users = [f"gone{k}" for k in range(50)]
    # Each user: two ratings the base model predicts well, then one far off (drift), then silence.
    first = [rating(3 * k + j, u, (3.0, 3.0, 10.0)[j], T0 + k) for k, u in enumerate(users) for j in range(3)]
    res = p.process(first, now=T0 + 10 * HOUR)
    assert res.entity_drifts == len(users), "each user's third rating is detected as drift"
    assert len(p._drifted) == len(users)  # the set whose growth is at stake

    later = p.process([rating(10_000, "b", 3.0, T0 + 2 * HOUR)], now=T0 + 10 * HOUR)  # their windows age out

    expired = [r for r in later.log if r.entity in users]
    assert [(r.trigger, r.outcome) for r in expired] == [("max_age", "expired")] * len(users)
    assert len(p._drifted) == 0


def test_a_drifted_entity_with_enough_shots_is_still_re_adapted_at_once() -> None:
    """The other path out of the drifted set is unchanged: 4+ shots and a drift close the window."""
    p = drifting_pipeline()
    records = [rating(k, "a", 3.0, T0 + k) for k in range(4)] + [rating(4, "a", 10.0, T0 + 4)]
    res: BatchResult = p.process(records, now=T0 + HOUR)
    assert [(r.entity, r.trigger, len(r.positions)) for r in res.log] == [("a", "drift", 5)]
    assert len(p._drifted) == 0


def test_rows_of_entities_dropped_by_a_rebalance_are_reused() -> None:
    table = AdapterTable({"emb": (4,), "bias": (1,)}, capacity=4)
    revoked, kept = ("feedback", 1), ("feedback", 0)

    def adapter(x: float) -> dict[str, torch.Tensor]:
        return {"emb": torch.full((4,), x), "bias": torch.full((1,), x)}

    table.mark_consumed("keep", [Position(*kept, 0)])
    table.put("keep", adapter(-1.0), 1)
    for cycle in range(20):  # a partition revoked and assigned back 20 times, 10 entities restored each time
        for k in range(10):
            entity = f"moving{k}"
            table.mark_consumed(entity, [Position(*revoked, cycle)])
            table.put(entity, adapter(cycle + k / 100), cycle + 1)
        assert table.drop_partitions({revoked}) == 10
    assert table.allocated_rows == 11, "one row per entity held at once, not one per restore"
    for k in range(10):
        entity = f"again{k}"
        table.mark_consumed(entity, [Position(*revoked, 99)])
        table.put(entity, adapter(float(k)), 1)
    assert table.allocated_rows == 11
    kept_adapter = table.get("keep")
    assert kept_adapter is not None and torch.equal(kept_adapter["emb"], torch.full((4,), -1.0))  # not overwritten
    for k in range(10):
        again = table.get(f"again{k}")
        assert again is not None and torch.equal(again["bias"], torch.full((1,), float(k)))
