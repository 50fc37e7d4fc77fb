"""A hot entity (10% of all traffic) among many ordinary ones: nobody starves, and a batch stays cheap.

The pipeline adapts an entity's window before that entity's later events in the same batch are scored,
in rounds (README, "How it works" 4). A hot entity with h events in a batch needs about h/K rounds.
What must hold:

- the other entities' windows close, adapt and publish exactly as they do without the hot entity, in
  the same batches (no starvation, no delay);
- each event is scored about once however many rounds the batch takes. Before the fix in
  `Pipeline._score_and_window` every round re-scored all of the hot entity's deferred events: 8
  predictions per event at 10% of a 5,000-event batch, 27 at 20,000 (quadratic in h).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from model_helpers import tiny_model
from torch import Tensor

from stream_adapt.config import pipeline_config
from stream_adapt.events import Position, Record
from stream_adapt.learning.models import Adapter, NeuralRecommender
from stream_adapt.learning.pipeline import BatchResult, Pipeline
from stream_adapt.learning.updates import decode_update

pytestmark = pytest.mark.usefixtures("one_torch_thread")

T0 = 1_700_000_000.0
ITEMS = [f"i{i}" for i in range(40)]
HOT = "hot"
BATCH = 2000
BATCHES = 4


class CountingRecommender(NeuralRecommender):
    """The real model, counting the rows the pipeline scores: `predict` without gradients on one
    counterpart per row is prequential scoring (adaptation scores [B, shots] blocks, with gradients)."""

    scored_rows = 0

    def predict(self, adapter: Adapter, counterpart_idx: Tensor, shared: Adapter) -> Tensor:
        if not torch.is_grad_enabled() and counterpart_idx.dim() == 2 and counterpart_idx.shape[1] == 1:
            CountingRecommender.scored_rows += counterpart_idx.shape[0]
        return super().predict(adapter, counterpart_idx, shared)


MODEL = tiny_model([f"o{i}" for i in range(100)], ITEMS, "sha256:hot-entity", noise=0.3, cls=CountingRecommender)


def rating(partition: int, offset: int, user: str, rng: random.Random, ts: float) -> Record:
    body = {
        "event_id": f"{partition}-{offset}",
        "user_id": user,
        "item_id": rng.choice(ITEMS),
        "event_type": "rating",
        "value": float(rng.randint(1, 5)),
        "timestamp": ts,
    }
    return Record(json.dumps(body).encode(), Position("feedback", partition, offset), key=user.encode())


def batches(hot_share: float, seed: int = 0) -> list[list[Record]]:
    """`BATCHES` batches of `BATCH` ordinary events (600 users, partition 0); with `hot_share` > 0 the
    hot entity's events (partition 1) are mixed in so that it sends that share of each batch. The
    ordinary events are the same, at the same positions and in the same batches, either way."""
    rng, hot_rng = random.Random(seed), random.Random(seed + 1)
    out: list[list[Record]] = []
    hot_offset = 0
    for b in range(BATCHES):
        batch = []
        for k in range(BATCH):
            offset = b * BATCH + k
            ts = T0 + offset
            if hot_share and hot_rng.random() < hot_share / (1 - hot_share):  # hot / all = hot_share
                batch.append(rating(1, hot_offset, HOT, hot_rng, ts))
                hot_offset += 1
            batch.append(rating(0, offset, f"o{rng.randrange(600)}", rng, ts))
        out.append(batch)
    return out


@dataclass
class Run:
    results: list[BatchResult]
    scored_rows: list[int]  # per batch


def run(stream: list[list[Record]]) -> Run:
    # Shared part fixed (no global drift), so entities can only meet through the batching itself.
    cfg = pipeline_config({"drift": {"global_detector": {"kind": "none"}}})
    p = Pipeline(MODEL, cfg)
    out = Run([], [])
    for batch in stream:
        rows = CountingRecommender.scored_rows
        out.results.append(p.process(batch, now=T0 + 10**6))
        out.scored_rows.append(CountingRecommender.scored_rows - rows)
    return out


@pytest.fixture(scope="module")
def without_hot() -> Run:
    return run(batches(0.0))


@pytest.fixture(scope="module")
def with_hot() -> Run:
    return run(batches(0.10))


def test_the_hot_entity_sends_about_a_tenth_of_the_traffic(with_hot: Run) -> None:
    for res in with_hot.results:
        hot = sum(1 for rec in res.log if rec.entity == HOT for _ in rec.positions)
        assert 0.07 * res.records <= hot + 8 and hot <= 0.13 * res.records
    assert sum(r.records for r in with_hot.results) > BATCHES * BATCH * 1.08


def test_other_entities_adapt_in_the_same_batches_with_the_same_outcomes(without_hot: Run, with_hot: Run) -> None:
    spec = MODEL.adapter_spec()
    for b, (alone, crowded) in enumerate(zip(without_hot.results, with_hot.results, strict=True)):
        others = [r for r in crowded.log if r.entity != HOT]
        assert [(r.entity, r.outcome, r.reason, r.version, r.positions) for r in others] == [
            (r.entity, r.outcome, r.reason, r.version, r.positions) for r in alone.log
        ], f"batch {b}"
        mine = [u for u in crowded.updates if u.entity != HOT]
        assert [u.entity for u in mine] == [u.entity for u in alone.updates]
        for a, c in zip(alone.updates, mine, strict=True):
            ta, tc = decode_update(a.payload, spec, None)[1], decode_update(c.payload, spec, None)[1]
            for name in spec:
                torch.testing.assert_close(ta[name], tc[name], atol=1e-5, rtol=0)
    adapted = sum(1 for res in without_hot.results for r in res.log if r.outcome != "expired")
    assert adapted > 100, "enough ordinary windows close for the comparison to mean something"


def test_each_event_is_scored_about_once_however_many_rounds_a_batch_takes(without_hot: Run, with_hot: Run) -> None:
    for res, rows in zip(with_hot.results, with_hot.scored_rows, strict=True):
        # Windows closed inside the rounds (full, or early on drift), per entity. Each round adapts the
        # windows it closed in one vectorised call: one call per window of the entity that closes the most.
        closed = Counter(r.entity for r in res.log if r.trigger in ("window_full", "drift"))
        assert closed[HOT] >= 20 and closed.most_common(1)[0][0] == HOT
        assert len(res.adapt_batch_sizes) <= closed[HOT], (res.adapt_batch_sizes, closed.most_common(3))
        # Scored twice (current adapter, no adaptation), plus the gate's rows of one-query windows.
        assert rows <= 2 * res.learned * 1.05, f"{rows / res.learned:.1f} predictions per event"
    for res, rows in zip(without_hot.results, without_hot.scored_rows, strict=True):
        assert rows <= 2 * res.learned * 1.05
