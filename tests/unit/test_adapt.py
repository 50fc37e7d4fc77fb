"""Batched few-shot adaptation equals the per-window reference; the gate's reasons; adaptation learns."""

from __future__ import annotations

import math

import pytest
import torch

from stream_adapt.config import AdaptConfig, GateConfig
from stream_adapt.learning.adapt import (
    ROLLBACK_REASONS,
    AdaptResult,
    WindowBatch,
    adapt_batched,
    adapt_loop,
    gate,
    masked_mean,
    pad_batch,
)
from stream_adapt.learning.models import Adapter, NeuralRecommender, RecommenderConfig, freeze

N_USERS, N_ITEMS = 6, 30
#: (support length, query length) per window: padded to the longest in one batch.
SHAPES = [(6, 2), (3, 1), (1, 1), (5, 2), (9, 3)]


def _model(lora_rank: int = 0, seed: int = 0) -> NeuralRecommender:
    torch.manual_seed(seed)
    cfg = RecommenderConfig(n_users=N_USERS, n_items=N_ITEMS, dim=8, hidden=16, lora_rank=lora_rank)
    model = NeuralRecommender(cfg, [f"u{i}" for i in range(N_USERS)], [f"i{i}" for i in range(N_ITEMS)])
    with torch.no_grad():  # a base model whose predictions are not all ~0
        model.global_bias.fill_(3.0)
        model.item_bias.weight.normal_(0, 0.3)
    freeze(model)
    return model


def _batch(model: NeuralRecommender, shapes: list[tuple[int, int]] = SHAPES, seed: int = 1) -> WindowBatch:
    gen = torch.Generator().manual_seed(seed)
    entity_idx = torch.arange(len(shapes)) % (N_USERS + 1)
    start = model.initial_adapter(entity_idx)
    start = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in start.items()}

    def rows(length: int) -> tuple[list[int], list[float]]:
        idx = torch.randint(0, N_ITEMS + 1, (length,), generator=gen).tolist()
        y = (1 + 4 * torch.rand(length, generator=gen)).tolist()
        return idx, y

    support = [rows(s) for s, _ in shapes]
    query = [rows(q) for _, q in shapes]
    return pad_batch(start, support, query, model.global_adapter())


def _support_losses(model: NeuralRecommender, adapter: Adapter, batch: WindowBatch) -> torch.Tensor:
    with torch.no_grad():
        err = model.predict(adapter, batch.support_idx, batch.shared) - batch.support_y
    return masked_mean(err**2, batch.support_mask)


def _assert_results_close(a: AdaptResult, b: AdaptResult, atol: float = 1e-4) -> None:
    assert set(a.adapter) == set(b.adapter)
    for name in a.adapter:
        torch.testing.assert_close(a.adapter[name], b.adapter[name], atol=atol, rtol=0, msg=name)
    for field in ("loss_before", "loss_after", "mae_before", "mae_after"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), atol=atol, rtol=1e-5, msg=field)


# ---- batched == reference loop -----------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("l2", [0.0, 0.05])
@pytest.mark.parametrize("lora_rank", [0, 2])
def test_batched_adaptation_equals_the_per_window_reference_loop(optimizer: str, l2: float, lora_rank: int) -> None:
    model = _model(lora_rank)
    batch = _batch(model)
    cfg = AdaptConfig(optimizer=optimizer, lr=0.05, steps=7, l2=l2)  # type: ignore[arg-type]
    batched = adapt_batched(model, batch, cfg)
    reference = adapt_loop(model, batch, cfg)
    _assert_results_close(batched, reference)
    moved = sum(float((batched.adapter[k] - batch.start[k]).abs().sum()) for k in batch.start)
    assert moved > 1e-3, "the comparison is vacuous if nothing moved"


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_each_windows_result_does_not_depend_on_the_other_windows_in_the_batch(optimizer: str) -> None:
    model = _model()
    batch = _batch(model)
    cfg = AdaptConfig(optimizer=optimizer, lr=0.05, steps=5, l2=0.01)  # type: ignore[arg-type]
    together = adapt_batched(model, batch, cfg)
    for b, (n_support, n_query) in enumerate(SHAPES):
        alone_batch = pad_batch(
            {k: v[b : b + 1] for k, v in batch.start.items()},
            [(batch.support_idx[b, :n_support].tolist(), batch.support_y[b, :n_support].tolist())],
            [(batch.query_idx[b, :n_query].tolist(), batch.query_y[b, :n_query].tolist())],
            batch.shared,
        )
        alone = adapt_batched(model, alone_batch, cfg)
        for name in together.adapter:
            torch.testing.assert_close(together.adapter[name][b : b + 1], alone.adapter[name], atol=1e-5, rtol=0)
        torch.testing.assert_close(together.loss_after[b : b + 1], alone.loss_after, atol=1e-5, rtol=1e-5)


def test_loss_before_is_the_query_error_of_the_start_adapter() -> None:
    model = _model()
    batch = _batch(model)
    result = adapt_batched(model, batch, AdaptConfig())
    with torch.no_grad():
        err = model.predict(batch.start, batch.query_idx, batch.shared) - batch.query_y
    torch.testing.assert_close(result.loss_before, masked_mean(err**2, batch.query_mask))
    torch.testing.assert_close(result.mae_before, masked_mean(err.abs(), batch.query_mask))


# ---- adaptation learns --------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_adaptation_with_the_default_settings_lowers_every_windows_support_loss(optimizer: str, seed: int) -> None:
    model = _model()
    batch = _batch(model, seed=seed)
    result = adapt_batched(model, batch, AdaptConfig(optimizer=optimizer))  # type: ignore[arg-type]
    before = _support_losses(model, batch.start, batch)
    after = _support_losses(model, result.adapter, batch)
    assert bool((after < before).all()), (before, after)


def test_more_steps_fit_the_support_shots_more_closely() -> None:
    model = _model()
    batch = _batch(model)
    few = adapt_batched(model, batch, AdaptConfig(steps=2, lr=0.05, l2=0.0))
    many = adapt_batched(model, batch, AdaptConfig(steps=20, lr=0.05, l2=0.0))
    assert bool((_support_losses(model, many.adapter, batch) < _support_losses(model, few.adapter, batch)).all())


def test_l2_keeps_the_adapter_closer_to_where_it_started() -> None:
    model = _model()
    batch = _batch(model)

    def distance(result: AdaptResult) -> torch.Tensor:
        return sum((result.adapter[k] - batch.start[k]).flatten(1).pow(2).sum(1) for k in batch.start)

    free = adapt_batched(model, batch, AdaptConfig(steps=10, lr=0.05, l2=0.0))
    pulled = adapt_batched(model, batch, AdaptConfig(steps=10, lr=0.05, l2=1.0))
    assert bool((distance(pulled) < distance(free)).all())


def test_adaptation_leaves_the_start_adapter_and_the_base_model_untouched() -> None:
    model = _model()
    batch = _batch(model)
    start = {k: v.clone() for k, v in batch.start.items()}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    adapt_batched(model, batch, AdaptConfig(optimizer="adam", steps=5))
    for k in start:
        assert torch.equal(batch.start[k], start[k])
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k


# ---- the gate -----------------------------------------------------------------------------------------

GATE = GateConfig(min_improvement=0.0, max_delta_norm=5.0, max_adapter_norm=50.0)


def _result(start: Adapter, new_emb: list[list[float]], before: list[float], after: list[float]) -> AdaptResult:
    emb = torch.tensor(new_emb)
    adapter = {"emb": emb, "bias": start["bias"].clone()}
    b, a = torch.tensor(before), torch.tensor(after)
    return AdaptResult(adapter, b, a, b.sqrt(), a.sqrt())


def _start(rows: list[list[float]]) -> Adapter:
    emb = torch.tensor(rows)
    return {"emb": emb, "bias": torch.zeros(len(rows), 1)}


def test_gate_gives_each_window_its_own_reason() -> None:
    nan = math.nan
    start = _start([[0, 0], [0, 0], [0, 0], [0, 0], [49.8, 0], [0, 0], [0, 0], [1, 1]])
    new = [
        [nan, 0.0],  # NaN in an adapted tensor
        [0.1, 0.0],  # fine tensors, NaN loss
        [6.0, 0.0],  # a jump of 6 > max_delta_norm 5
        [3.0, 4.0],  # a jump of exactly 5: allowed
        [50.5, 0.0],  # small jump, but |theta| 50.5 > max_adapter_norm 50
        [0.1, 0.0],  # not better: equal loss
        [0.1, 0.0],  # not better: worse
        [1.2, 1.0],  # better, bounded, finite
    ]
    before = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    after = [0.5, nan, 0.5, 0.5, 0.5, 1.0, 1.5, 0.25]
    reasons = gate(start, _result(start, new, before, after), GATE)
    assert reasons == [
        "non_finite",
        "non_finite",
        "norm_jump",
        "accepted",
        "norm_bound",
        "not_better",
        "not_better",
        "accepted",
    ]
    assert set(reasons) - {"accepted"} <= set(ROLLBACK_REASONS)


def test_gate_rejects_non_finite_loss_before_and_infinite_tensors() -> None:
    start = _start([[0, 0], [0, 0]])
    result = _result(start, [[0.1, 0.0], [math.inf, 0.0]], [math.nan, 1.0], [0.5, 0.5])
    assert gate(start, result, GATE) == ["non_finite", "non_finite"]


def test_gate_reasons_follow_the_documented_order_when_several_apply() -> None:
    start = _start([[0, 0], [49.0, 0], [49.0, 0]])
    new = [
        [math.nan, 60.0],  # non-finite beats everything
        [56.0, 0.0],  # jump 7 and norm 56: the jump is reported
        [50.5, 0.0],  # norm bound and worse: the bound is reported
    ]
    result = _result(start, new, [1.0, 1.0, 1.0], [2.0, 2.0, 2.0])
    assert gate(start, result, GATE) == ["non_finite", "norm_jump", "norm_bound"]


def test_gate_min_improvement_requires_a_relative_gain() -> None:
    start = _start([[0, 0], [0, 0]])
    result = _result(start, [[0.1, 0], [0.1, 0]], [1.0, 1.0], [0.95, 0.85])
    strict = GateConfig(min_improvement=0.1, max_delta_norm=5.0, max_adapter_norm=50.0)
    assert gate(start, result, strict) == ["not_better", "accepted"]
    assert gate(start, result, GATE) == ["accepted", "accepted"]


def test_gate_measures_the_jump_over_all_adapter_tensors() -> None:
    start = {"emb": torch.zeros(1, 2), "bias": torch.zeros(1, 1)}
    adapter = {"emb": torch.tensor([[3.0, 0.0]]), "bias": torch.tensor([[4.5]])}  # jump sqrt(9 + 20.25) > 5
    one = torch.ones(1)
    result = AdaptResult(adapter, one, one / 2, one, one / 2)
    assert gate(start, result, GATE) == ["norm_jump"]


def test_a_disabled_gate_accepts_worse_but_never_non_finite_or_unbounded_updates() -> None:
    start = {"emb": torch.zeros(3, 2), "bias": torch.zeros(3, 1)}
    adapted = {"emb": torch.tensor([[0.1, 0.0], [float("nan"), 0.0], [100.0, 0.0]]), "bias": torch.zeros(3, 1)}
    before, after = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([2.0, 0.5, 0.5])  # the first got worse
    result = AdaptResult(adapted, before, after, before, after)
    assert gate(start, result, GateConfig(enabled=False)) == ["accepted", "non_finite", "norm_jump"]
    assert gate(start, result, GateConfig())[0] == "not_better"
