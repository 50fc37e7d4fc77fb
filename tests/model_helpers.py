"""Small frozen recommenders for tests, built the same way everywhere (seeded, so results repeat)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch

from stream_adapt.events import GLOBAL_ENTITY, ModelUpdate
from stream_adapt.learning.models import NeuralRecommender, RecommenderConfig, freeze

#: Event times of the updates `update_metadata` builds.
UPDATE_T0 = 1_700_000_000.0


def tiny_model(
    users: Sequence[str],
    items: Sequence[str],
    fingerprint: str,
    *,
    noise: float | None = None,
    global_bias: float | None = 3.0,
    cls: type[NeuralRecommender] = NeuralRecommender,
    dim: int = 8,
    hidden: int = 16,
) -> NeuralRecommender:
    """A frozen `cls` with seed 0. `noise`: every weight redrawn from N(0, noise) (random but deterministic
    scores); `global_bias`: base scores centred in the 1-5 rating range (None: left as initialised)."""
    torch.manual_seed(0)
    model = cls(RecommenderConfig(n_users=len(users), n_items=len(items), dim=dim, hidden=hidden), users, items)
    with torch.no_grad():
        if noise is not None:
            for p in model.parameters():
                p.normal_(0, noise)
        if global_bias is not None:
            model.global_bias.fill_(global_bias)
    freeze(model)
    model.fingerprint = fingerprint
    return model


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module, as the service runs: a tiny model's predictions are ~100x slower
    with threads spinning up on a shared 2-core host. Use with `pytest.mark.usefixtures`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def update_metadata(model: NeuralRecommender, entity: str, version: int, **changes: Any) -> ModelUpdate:
    """A valid `ModelUpdate` of `model` for `entity` (or the global adapter) at `version`; `changes`
    override fields (a foreign fingerprint, a wrong shape, ...)."""
    is_global = entity == GLOBAL_ENTITY
    spec = model.global_spec() if is_global else model.adapter_spec()
    fields: dict[str, Any] = {
        "entity": entity,
        "entity_kind": "global" if is_global else model.entity_kind,
        "version": version,
        "parent_version": version - 1 or None,
        "base_fingerprint": model.fingerprint,
        "trigger": "global_drift" if is_global else "window_full",
        "positions": [] if is_global else [{"topic": "feedback", "partition": 0, "offset": version}],
        "loss_before": 1.0,
        "loss_after": 0.5,
        "n_support": 6,
        "n_query": 2,
        "event_time_first": UPDATE_T0,
        "event_time_last": UPDATE_T0 + 1,
        "created_at": UPDATE_T0 + 2,
        "tensors": {k: list(v) for k, v in spec.items()},
    }
    return ModelUpdate(**{**fields, **changes})
