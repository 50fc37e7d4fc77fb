"""`stream-adapt evaluate`: protocol splits, metrics, baselines, the harness and the report, on small generated logs."""

from __future__ import annotations

import importlib.util
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from stream_adapt.cli import main
from stream_adapt.config import PipelineConfig
from stream_adapt.evaluate import EvalSettings, Evaluation, ResultRow, evaluate, write_report
from stream_adapt.evaluate import report as report_mod
from stream_adapt.evaluate.baselines import (
    BASELINES,
    BiasBaseline,
    RiverRecommender,
    fit_predict,
    prequential_predictions,
)
from stream_adapt.evaluate.harness import few_shot_config, gate_off, override_dataclass, seeded
from stream_adapt.evaluate.metrics import dcg_at_k, mean_ndcg, ndcg_at_k, rmse, score, user_mae
from stream_adapt.evaluate.protocols import (
    MELU_QUERY,
    chronological,
    cold_start_split,
    melu_split,
    prequential_split,
)
from stream_adapt.events import FeedbackEvent, validate_event
from stream_adapt.learning.pretrain import PretrainConfig

T0 = 880_000_000.0  # 1997
N_ITEMS = 120
FAST_PRETRAIN = PretrainConfig(dim=4, hidden=8, epochs=2)


def make_log(seed: int = 0) -> list[FeedbackEvent]:
    """A small rating log with structure (biases + 2 latent factors) and users of every size class:
    40 users with 14-30 ratings, 4 heavy users (110, above MeLU's 100), 3 light ones (12, below 13).
    Users arrive one per day in id order; each rates at one-minute steps, in file order by user."""
    rng = np.random.default_rng(seed)
    sizes = [int(rng.integers(14, 31)) for _ in range(40)] + [110] * 4 + [12] * 3
    item_bias = rng.normal(0, 0.5, N_ITEMS)
    q = rng.normal(0, 0.5, (N_ITEMS, 2))
    events = []
    for u, n in enumerate(sizes):
        bu, p = rng.normal(0, 0.4), rng.normal(0, 0.5, 2)
        for k, i in enumerate(rng.choice(N_ITEMS, size=n, replace=False)):
            y = float(np.clip(np.round(3.6 + bu + item_bias[i] + p @ q[i] + rng.normal(0, 0.4)), 1, 5))
            data = {
                "event_id": f"u{u}-{k}",
                "user_id": f"u{u}",
                "item_id": f"i{i}",
                "event_type": "rating",
                "value": y,
                "timestamp": T0 + u * 86400.0 + k * 60.0,
            }
            events.append(validate_event(data))
    # interleave users' later ratings with the next arrivals: shuffle the file order, times decide
    order = rng.permutation(len(events))
    return [events[j] for j in order]


def write_udata(path: Path, events: list[FeedbackEvent]) -> Path:
    lines = [f"{e.user_id[1:]}\t{e.item_id[1:]}\t{int(e.value)}\t{int(e.timestamp)}" for e in events]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def log() -> list[FeedbackEvent]:
    return make_log()


def ids(events: object) -> set[str]:
    return {e.event_id for e in events}  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------ protocols


def test_prequential_split_is_chronological_disjoint_and_complete(log: list[FeedbackEvent]) -> None:
    split = prequential_split(log, 0.3)
    assert len(split.pretrain) == int(len(log) * 0.3)
    assert not ids(split.pretrain) & ids(split.stream)
    assert ids(split.pretrain) | ids(split.stream) == ids(log)
    both = list(split.pretrain) + list(split.stream)
    assert [e.timestamp for e in both] == sorted(e.timestamp for e in log)
    with pytest.raises(ValueError):
        prequential_split(log, 1.0)


def test_cold_start_split_by_arrival_same_query_for_every_k(log: list[FeedbackEvent]) -> None:
    cs = cold_start_split(log, [1, 3, 5, 10], cold_fraction=0.2)
    cold_users = [u for u, _ in cs.histories]
    # the latest arrivals are cold: users arrive one per day in id order, the 3 light users last
    assert cold_users == [f"u{u}" for u in range(47 - round(47 * 0.2), 47)]
    assert cs.dropped_users == 0  # every cold user has more than 10 ratings
    # warm data: strictly before the first cold arrival, hence no cold user's event
    assert all(e.timestamp < cs.split_time for e in cs.warm)
    assert not {e.user_id for e in cs.warm} & set(cold_users)
    queries = []
    for k in (1, 3, 5, 10):
        split = cs.for_shots(k)
        for cu in split.cold:
            history = chronological([e for e in log if e.user_id == cu.user])
            assert list(cu.support) == history[:k]
            assert list(cu.query) == history[10:]
            assert not ids(cu.support) & ids(cu.query)
        assert not ids(split.warm) & (ids(split.support_events()) | ids(split.query_events()))
        queries.append(ids(split.query_events()))
    assert all(q == queries[0] for q in queries)
    # deterministic: no seed, same split
    assert cold_start_split(log, [1, 3, 5, 10]).for_shots(5) == cs.for_shots(5)


def test_cold_start_drops_users_without_a_query(log: list[FeedbackEvent]) -> None:
    cs = cold_start_split(log, [1, 12], cold_fraction=0.2)
    assert cs.dropped_users == 3  # the three light users have exactly 12 ratings: nothing left to query
    assert all(len(h) > 12 for _, h in cs.histories)


def test_melu_split_filters_users_and_draws_ten_query_ratings(log: list[FeedbackEvent]) -> None:
    split = melu_split(log, seed=0)
    counts = Counter(e.user_id for e in log)
    eligible = {u for u, n in counts.items() if 13 <= n <= 100}
    warm_users = {e.user_id for e in split.warm}
    cold_users = {cu.user for cu in split.cold}
    assert warm_users | cold_users == eligible  # heavy (110) and light (12) users are out
    assert not warm_users & cold_users
    assert len(warm_users) == round(len(eligible) * 0.8)
    for cu in split.cold:
        assert len(cu.query) == MELU_QUERY
        assert len(cu.support) == counts[cu.user] - MELU_QUERY
        assert not ids(cu.support) & ids(cu.query)
        assert ids(cu.support) | ids(cu.query) == ids(e for e in log if e.user_id == cu.user)
        assert [e.timestamp for e in cu.support] == sorted(e.timestamp for e in cu.support)
    # warm events are all of the warm users' ratings
    assert len(split.warm) == sum(counts[u] for u in warm_users)


def test_melu_split_is_deterministic_per_seed(log: list[FeedbackEvent]) -> None:
    assert melu_split(log, seed=3) == melu_split(list(reversed(log)), seed=3)  # not the file order either
    a, b = melu_split(log, seed=0), melu_split(log, seed=1)
    assert {cu.user for cu in a.cold} != {cu.user for cu in b.cold} or any(
        x.query != y.query for x, y in zip(a.cold, b.cold, strict=True)
    )


# -------------------------------------------------------------------------------------------- metrics


def test_ndcg_at_3_hand_computed() -> None:
    # true ratings 3, 2, 1 ranked exactly backwards by the predictions
    dcg = (2**1 - 1) / 1 + (2**2 - 1) / math.log2(3) + (2**3 - 1) / 2
    idcg = (2**3 - 1) / 1 + (2**2 - 1) / math.log2(3) + (2**1 - 1) / 2
    assert ndcg_at_k([3, 2, 1], [0.1, 0.2, 0.3], 3) == pytest.approx(dcg / idcg)
    assert dcg / idcg == pytest.approx(0.680606, abs=1e-6)  # (1 + 1.8928 + 3.5) / (7 + 1.8928 + 0.5)
    assert ndcg_at_k([3, 2, 1], [9, 8, 7], 3) == pytest.approx(1.0)
    # only the top 3 count: the 4th item's rank does not matter
    assert ndcg_at_k([5, 1, 1, 4], [4, 3, 2, 1], 3) == pytest.approx(dcg_at_k([5, 1, 1], 3) / dcg_at_k([5, 4, 1], 3))
    assert ndcg_at_k([0, 0], [1, 2], 3) is None  # nothing relevant: no ranking to judge


def test_mae_is_per_user_then_averaged_rmse_pooled() -> None:
    users = ["a", "a", "b"]
    y = [3.0, 1.0, 4.0]
    pred = [4.0, 4.0, 4.0]  # a: errors 1, 3 -> 2; b: 0 -> 0
    assert user_mae(users, y, pred) == pytest.approx(1.0)  # pooled would be 4/3
    assert rmse(y, pred) == pytest.approx(math.sqrt(10 / 3))
    assert mean_ndcg(users, y, pred) == pytest.approx(1.0)  # a: the tie keeps the given order, the ideal one
    s = score(users, y, pred)
    assert (s.mae, s.rmse) == (pytest.approx(1.0), pytest.approx(math.sqrt(10 / 3)))


# ------------------------------------------------------------------------------------------ baselines


def rating(u: str, i: str, y: float, t: float) -> FeedbackEvent:
    return validate_event(
        {"event_id": f"{u}{i}{t}", "user_id": u, "item_id": i, "event_type": "rating", "value": y, "timestamp": t}
    )


def test_bias_baselines_hand_computed() -> None:
    train = [rating("a", "x", 5, T0), rating("a", "y", 3, T0 + 1), rating("b", "x", 4, T0 + 2)]
    mu = 4.0
    bx = (5 + 4 - 2 * mu) / (2 + 25)
    by = (3 - mu) / (1 + 25)
    ba = ((5 - mu - bx) + (3 - mu - by)) / (2 + 10)
    preds = {
        name: fit_predict(BASELINES[name](1, 5), train, [("a", "x"), ("c", "z")])
        for name in ("global_mean", "item_bias", "user_item_bias")
    }
    assert preds["global_mean"] == pytest.approx([mu, mu])
    assert preds["item_bias"] == pytest.approx([mu + bx, mu])
    assert preds["user_item_bias"] == pytest.approx([mu + bx + ba, mu])  # unknown user and item: the mean


def test_prequential_predictions_are_made_before_learning() -> None:
    events = [rating("a", "x", 5, T0), rating("a", "y", 3, T0 + 1), rating("b", "x", 4, T0 + 2)]
    preds = prequential_predictions(BiasBaseline(item=False, user=False), events)
    assert preds.tolist() == [0.0, 5.0, 4.0]  # running mean before each rating


def test_river_biasedmf_learns_and_clips(log: list[FeedbackEvent]) -> None:
    ordered = chronological(log)
    preds = prequential_predictions(RiverRecommender(1.0, 5.0), ordered)
    y = np.array([e.value for e in ordered])
    assert preds.min() >= 1.0 and preds.max() <= 5.0
    late, early = slice(len(y) // 2, None), slice(0, 200)
    assert np.abs(preds[late] - y[late]).mean() < np.abs(preds[early] - y[early]).mean()


# -------------------------------------------------------------------------------------------- harness


def test_few_shot_windows_and_gate_off() -> None:
    base = PipelineConfig()
    for k, (shots, q) in {1: (2, 1), 3: (3, 1), 5: (5, 1), 10: (10, 2)}.items():
        w = few_shot_config(base, k).window
        assert (w.shots, w.query_shots, w.min_shots) == (shots, q, q + 1)
        assert w.max_age_s > 1e12
    w = few_shot_config(base, None).window
    assert (w.shots, w.query_shots, w.min_shots) == (8, 2, 3)
    assert gate_off(base).gate.enabled is False
    assert base.gate.enabled is True  # the original is untouched


def test_pretrain_overrides_and_seeds() -> None:
    cfg = override_dataclass(PretrainConfig(), ["epochs=3", "lr=0.5", "entity=user"])
    assert (cfg.epochs, cfg.lr) == (3, 0.5)
    with pytest.raises(ValueError, match="no field"):
        override_dataclass(PretrainConfig(), ["epoch=3"])
    assert seeded(cfg, 7).seed == 7


def methods_of(ev: Evaluation) -> set[str]:
    return {r.method for r in ev.results}


ALL_METHODS = {
    "global_mean",
    "item_bias",
    "user_item_bias",
    "river_biasedmf",
    "no_adaptation",
    "stream_adapt",
    "stream_adapt_ungated",
}


def test_cold_start_protocol_end_to_end(log: list[FeedbackEvent]) -> None:
    settings = EvalSettings(seeds=(0,), shots=(1, 3, 10), pretrain=FAST_PRETRAIN, batch_size=50)
    ev = evaluate("cold-start", log, settings)
    assert methods_of(ev) == ALL_METHODS
    rows = {(r.method, r.shots): r for r in ev.results}
    assert {k for _, k in rows} == {1, 3, 10}
    # K=1: one shot cannot be adapted and gated: identical to no adaptation
    assert rows[("stream_adapt", 1)] == ResultRow("stream_adapt", 1, 0, *_metrics(rows[("no_adaptation", 1)]))
    n_cold = ev.details["split"]["cold_users"]
    assert n_cold == 9
    k1 = ev.details["seeds"]["0"]["K=1"]["stream_adapt"]
    assert (k1["accepted"], k1["expired"]) == (0, n_cold)
    k10 = ev.details["seeds"]["0"]["K=10"]
    assert k10["stream_adapt_ungated"]["accepted"] == n_cold  # gate off: every window accepted
    assert k10["stream_adapt"]["accepted"] + k10["stream_adapt"]["rolled_back"] == n_cold
    assert all(math.isfinite(r.mae) and math.isfinite(r.rmse) for r in ev.results)
    assert ev.checks[0]["goal"].startswith("gated adaptation never worse")
    assert [(g["shots"], g["window"]["shots"], g["expired"]) for g in ev.details["gate"]] == [
        (1, 2, n_cold),
        (3, 3, 0),
        (10, 10, 0),
    ]
    assert "| 10 | 10 / 2 |" in report_mod.render_markdown(ev)


def _metrics(r: ResultRow) -> tuple[float, float, float | None]:
    return r.mae, r.rmse, r.ndcg3


def test_melu_protocol_two_seeds(log: list[FeedbackEvent]) -> None:
    ev = evaluate("melu", log, EvalSettings(seeds=(0, 1), pretrain=FAST_PRETRAIN))
    assert methods_of(ev) == ALL_METHODS
    assert Counter(r.seed for r in ev.results) == {0: 7, 1: 7}
    assert all(r.shots is None and r.ndcg3 is not None and 0 < r.ndcg3 <= 1 for r in ev.results)
    assert (
        ev.details["seeds"]["0"]["split"]["query_events"]
        == MELU_QUERY * ev.details["seeds"]["0"]["split"]["cold_users"]
    )


def test_validation_run_never_sees_the_test_users(log: list[FeedbackEvent]) -> None:
    outer = melu_split(log, seed=0)
    ev = evaluate("melu", log, EvalSettings(seeds=(0,), pretrain=FAST_PRETRAIN, validation=True))
    inner = ev.details["seeds"]["0"]["split"]
    assert inner["warm_users"] + inner["cold_users"] == len({e.user_id for e in outer.warm})
    assert ev.config["validation"] and ev.notes[0].startswith("VALIDATION run")
    cs = cold_start_split(log, [1, 3, 5, 10])
    ev = evaluate("cold-start", log, EvalSettings(seeds=(0,), pretrain=FAST_PRETRAIN, validation=True))
    assert ev.config["events"] == len(cs.warm)


def test_prequential_protocol_series_and_river_full_stream(log: list[FeedbackEvent]) -> None:
    ev = evaluate("prequential", log, EvalSettings(seeds=(0,), pretrain=FAST_PRETRAIN, batch_size=100))
    assert methods_of(ev) == ALL_METHODS | {"river_biasedmf_full_stream"}
    stream = len(log) - int(len(log) * 0.5)
    series = ev.series
    assert series is not None and series["events"][-1] == stream
    assert set(series["mae"]) == {"stream_adapt", "river_biasedmf", "user_item_bias", "no_adaptation"}
    assert all(len(v) == len(series["events"]) for v in series["mae"].values())
    # the gated run's pooled MAE is the mean of its per-batch MAEs weighted by batch size
    sizes = np.diff([0, *series["events"]])
    gated = next(r for r in ev.results if r.method == "stream_adapt")
    assert float(np.dot(series["mae"]["stream_adapt"], sizes) / sizes.sum()) == pytest.approx(gated.mae)
    assert ev.details["river_full_stream"]["documented_mae"] == 0.7486


# --------------------------------------------------------------------------------------------- report


def small_evaluation() -> Evaluation:
    rows = [
        ResultRow(m, k, s, 0.8 + 0.01 * s + 0.001 * k, 1.0, 0.7)
        for m in ("stream_adapt", "no_adaptation")
        for k in (1, 5)
        for s in (0, 1)
    ]
    return Evaluation("cold-start", rows, checks=[{"goal": "g", "passed": True, "detail": "d"}])


def test_report_files(tmp_path: Path) -> None:
    paths = write_report(small_evaluation(), tmp_path / "out")
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["protocol"] == "cold-start"
    assert set(data["results"][0]) == {"method", "shots", "seed", "mae", "rmse", "ndcg3"}
    s = next(x for x in data["summary"] if x["method"] == "stream_adapt" and x["shots"] == 5)
    assert s["mae"] == pytest.approx(0.8 + 0.005 + 0.005)
    assert s["mae_std"] == pytest.approx(np.std([0.805, 0.815], ddof=1))
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| stream-adapt (gated) | 0.8060 ± 0.0071 | 0.8100 ± 0.0071 |" in md
    if importlib.util.find_spec("matplotlib") is not None:
        png = tmp_path / "out" / "error_vs_shots.png"
        assert png in paths and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_matplotlib_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        report_mod.importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a)
    )
    paths = write_report(small_evaluation(), tmp_path)
    assert [p.name for p in paths] == ["report.json", "report.md"]
    assert "matplotlib is not installed" in (tmp_path / "report.md").read_text()


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_evaluate_writes_the_report(
    tmp_path: Path, log: list[FeedbackEvent], capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_udata(tmp_path / "u.data", log)
    out = tmp_path / "report"
    argv = ["evaluate", "--events", str(data), "--protocol", "melu", "--report", str(out), "--seeds", "0"]
    rc = main([*argv, "--pretrain-set", "epochs=2", "--pretrain-set", "dim=4", "--quiet"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"] == "melu" and report["config"]["pretrain"]["epochs"] == 2
    assert "stream-adapt (gated)" in capsys.readouterr().out


def test_cli_evaluate_rejects_bad_options(tmp_path: Path, log: list[FeedbackEvent]) -> None:
    data = write_udata(tmp_path / "u.data", log[:50])
    base = ["evaluate", "--events", str(data), "--protocol", "melu", "--report", str(tmp_path / "r")]
    assert main([*base, "--seeds", "a,b"]) == 2
    assert main([*base, "--pretrain-set", "nope=1"]) == 2
