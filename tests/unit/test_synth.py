"""The synthetic generator: deterministic, decodable, and its latent story (cold users, drift) is real."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from stream_adapt.errors import ConfigError
from stream_adapt.events import DecodeError, FeedbackEvent, Position, decode, event_to_json
from stream_adapt.synth import (
    DUPLICATE_MAX_LAG,
    INVALID_KINDS,
    SynthConfig,
    SynthSummary,
    SynthTruth,
    generate,
    load_truth,
    synthetic_stream,
)

SMALL = SynthConfig(n_users=200, n_items=200, invalid_rate=0.02)
FILES = ("history.jsonl", "live.jsonl", "truth.npz", "synth.json")


class Dataset:
    """One generated directory, decoded once for the module."""

    def __init__(self, out: Path, summary: SynthSummary) -> None:
        self.out = out
        self.summary = summary
        self.truth: SynthTruth = load_truth(out / "truth.npz")
        self.history_raw = (out / "history.jsonl").read_bytes().splitlines()
        self.live_raw = (out / "live.jsonl").read_bytes().splitlines()
        self.history = [decode(r, Position("history", 0, k)) for k, r in enumerate(self.history_raw)]
        self.live = [decode(r, Position("live", 0, k)) for k, r in enumerate(self.live_raw)]
        duplicates = set(self.truth.invalid_offsets[self.truth.invalid_kinds == "duplicate_event_id"].tolist())
        #: Valid live events, redelivered duplicates left out.
        self.live_events = [e for k, e in enumerate(self.live) if isinstance(e, FeedbackEvent) and k not in duplicates]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    out = tmp_path_factory.mktemp("synth-small")
    return Dataset(out, generate(out, SMALL, seed=7))


def _prequential_error(truth: SynthTruth, events: list[FeedbackEvent]) -> float:
    """Mean |rating - pre-drift truth|: the error of a model that stopped learning before the drift."""
    pred = truth.expected_rating([e.user_id for e in events], [e.item_id for e in events])
    return float(np.mean(np.abs(np.array([e.value for e in events]) - pred)))


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    generate(tmp_path / "a", SMALL, seed=3)
    generate(tmp_path / "b", SMALL, seed=3)
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_different_seeds_give_different_data(tmp_path: Path) -> None:
    generate(tmp_path / "a", SMALL, seed=3)
    generate(tmp_path / "b", SMALL, seed=4)
    for name in ("history.jsonl", "live.jsonl", "truth.npz"):
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "b" / name).read_bytes(), name


def test_every_history_line_decodes_to_its_own_canonical_bytes(small: Dataset) -> None:
    assert len(small.history) == small.summary.history_events > 0
    for raw, event in zip(small.history_raw, small.history, strict=True):
        assert isinstance(event, FeedbackEvent), event
        assert event_to_json(event) == raw


def test_live_has_exactly_the_injected_bad_lines_with_the_expected_reasons(small: Dataset) -> None:
    truth, summary = small.truth, small.summary
    assert len(small.live) == summary.live_lines
    assert summary.n_invalid == round(SMALL.invalid_rate * summary.live_lines)
    assert all(summary.invalid_by_kind[kind] >= 1 for kind in INVALID_KINDS)
    expected = {
        off: kind
        for off, kind in zip(truth.invalid_offsets.tolist(), truth.invalid_kinds.tolist(), strict=True)
        if kind != "duplicate_event_id"
    }
    rejected = {k: e.reason for k, e in enumerate(small.live) if isinstance(e, DecodeError)}
    assert rejected == expected
    assert Counter(rejected.values()) == {k: n for k, n in summary.invalid_by_kind.items() if k != "duplicate_event_id"}
    assert summary.live_valid_events == len(small.live_events) == summary.live_lines - summary.n_invalid


def test_duplicates_are_redeliveries_of_a_recent_earlier_line(small: Dataset) -> None:
    offsets = small.truth.invalid_offsets[small.truth.invalid_kinds == "duplicate_event_id"].tolist()
    assert len(offsets) == small.summary.invalid_by_kind["duplicate_event_id"] >= 1
    for off in offsets:
        earlier = small.live_raw[max(0, off - DUPLICATE_MAX_LAG) : off]
        assert small.live_raw[off] in earlier
        assert isinstance(small.live[off], FeedbackEvent)


def test_events_are_time_ordered_with_unique_ids_across_both_files(small: Dataset) -> None:
    history = [e for e in small.history if isinstance(e, FeedbackEvent)]
    for events in (history, small.live_events):
        times = np.array([e.timestamp for e in events])
        assert np.all(np.diff(times) >= 0)
    assert history[-1].timestamp < small.summary.live_start <= small.live_events[0].timestamp
    assert small.live_events[-1].timestamp < small.summary.live_end
    ids = [e.event_id for e in history] + [e.event_id for e in small.live_events]
    assert len(set(ids)) == len(ids)


def test_cold_users_are_absent_from_history_and_arrive_part_way(small: Dataset) -> None:
    truth, summary = small.truth, small.summary
    cold = set(truth.cold_users.tolist())
    assert len(cold) == summary.n_cold_users == round(SMALL.cold_user_fraction * SMALL.n_users)
    history_users = {e.user_id for e in small.history if isinstance(e, FeedbackEvent)}
    live_users = {e.user_id for e in small.live_events}
    assert history_users.isdisjoint(cold)
    assert live_users - history_users == cold
    first_seen: dict[str, float] = {}
    for e in small.live_events:
        first_seen.setdefault(e.user_id, e.timestamp)
    for user, arrival in zip(truth.cold_users.tolist(), truth.cold_arrival_time.tolist(), strict=True):
        assert summary.live_start < arrival <= first_seen[user]


def test_every_live_user_gets_several_windows(small: Dataset) -> None:
    per_user = Counter(e.user_id for e in small.live_events)
    assert len(per_user) == SMALL.n_users
    # Bad-record injection removes a few events; the generator guarantees the minimum before it.
    assert small.summary.live_events_per_user_min >= SMALL.live_events_min
    assert min(per_user.values()) >= SMALL.live_events_min - 4


def test_drifted_users_and_drift_time_are_recorded(small: Dataset) -> None:
    truth, summary = small.truth, small.summary
    span = summary.live_end - summary.live_start
    assert truth.drift_time == summary.drift_time == summary.live_start + SMALL.drift_at * span
    drifted = set(truth.drifted_users.tolist())
    assert len(drifted) == summary.n_drifted_users == round(SMALL.drift_user_fraction * summary.n_warm_users)
    assert drifted.isdisjoint(truth.cold_users.tolist())
    changed = np.any(truth.user_factors_after != truth.user_factors, axis=1)
    assert set(truth.user_ids[changed].tolist()) == drifted
    after = Counter(e.user_id for e in small.live_events if e.timestamp >= truth.drift_time)
    before = Counter(e.user_id for e in small.live_events if e.timestamp < truth.drift_time)
    assert all(before[u] >= 8 and after[u] >= 8 for u in drifted)


def test_user_drift_is_large_for_drifted_users_only(small: Dataset) -> None:
    truth = small.truth
    drifted = set(truth.drifted_users.tolist())
    before_global = [e for e in small.live_events if e.timestamp < truth.global_drift_time]
    pre = [e for e in before_global if e.timestamp < truth.drift_time]
    post = [e for e in before_global if e.timestamp >= truth.drift_time]
    err_before = _prequential_error(truth, [e for e in pre if e.user_id in drifted])
    err_after = _prequential_error(truth, [e for e in post if e.user_id in drifted])
    assert err_after > 2.5 * err_before
    others_before = _prequential_error(truth, [e for e in pre if e.user_id not in drifted])
    others_after = _prequential_error(truth, [e for e in post if e.user_id not in drifted])
    assert others_after < 1.2 * others_before


def test_global_drift_shifts_the_chosen_items_for_everyone(small: Dataset) -> None:
    truth, summary = small.truth, small.summary
    assert summary.global_drift_time == truth.global_drift_time > truth.drift_time
    items = set(truth.global_drift_items.tolist())
    assert len(items) == summary.n_global_drift_items == round(SMALL.global_drift_item_fraction * SMALL.n_items)
    drifted = set(truth.drifted_users.tolist())
    on_items = [e for e in small.live_events if e.item_id in items and e.user_id not in drifted]
    err_before = _prequential_error(truth, [e for e in on_items if e.timestamp < truth.global_drift_time])
    err_after = _prequential_error(truth, [e for e in on_items if e.timestamp >= truth.global_drift_time])
    assert err_after > 2.5 * err_before


def test_truth_explains_the_ratings_up_to_noise(small: Dataset) -> None:
    events = small.live_events
    oracle = small.truth.expected_rating(
        [e.user_id for e in events], [e.item_id for e in events], [e.timestamp for e in events]
    )
    error = np.abs(np.array([e.value for e in events]) - oracle)
    assert float(np.mean(error)) < 0.45  # noise_std 0.35 plus half-star rounding and clipping
    values = {e.value for e in events}
    assert values <= {1.0 + 0.5 * k for k in range(9)}


def test_summary_file_matches_the_returned_summary(small: Dataset) -> None:
    written = json.loads((small.out / "synth.json").read_text())
    assert written == json.loads(small.summary.to_json())
    assert written["config"]["n_users"] == SMALL.n_users
    assert written["seed"] == 7


def test_bad_record_injection_leaves_the_good_events_alone(tmp_path: Path) -> None:
    clean = generate(tmp_path / "clean", SynthConfig(n_users=100, n_items=120, invalid_rate=0.0), seed=1)
    dirty = generate(tmp_path / "dirty", SynthConfig(n_users=100, n_items=120, invalid_rate=0.05), seed=1)
    assert clean.n_invalid == 0 and dirty.n_invalid > 0
    clean_lines = (tmp_path / "clean" / "live.jsonl").read_bytes().splitlines()
    dirty_lines = (tmp_path / "dirty" / "live.jsonl").read_bytes().splitlines()
    bad = set(load_truth(tmp_path / "dirty" / "truth.npz").invalid_offsets.tolist())
    assert len(clean_lines) == len(dirty_lines)
    assert [x for k, x in enumerate(clean_lines) if k not in bad] == [
        x for k, x in enumerate(dirty_lines) if k not in bad
    ]
    for name in ("history.jsonl",):
        assert (tmp_path / "clean" / name).read_bytes() == (tmp_path / "dirty" / name).read_bytes()


def test_global_drift_can_be_turned_off(tmp_path: Path) -> None:
    summary = generate(tmp_path, SynthConfig(n_users=60, n_items=120, global_drift=False), seed=2)
    truth = load_truth(tmp_path / "truth.npz")
    assert summary.global_drift_time is None and summary.n_global_drift_items == 0
    assert np.isnan(truth.global_drift_time) and len(truth.global_drift_items) == 0
    assert np.array_equal(truth.item_bias_after, truth.item_bias)


def test_default_config_has_the_documented_shape(tmp_path: Path) -> None:
    summary = generate(tmp_path)
    assert (summary.n_users, summary.n_cold_users, summary.n_items) == (1000, 200, 500)
    assert 80_000 <= summary.history_events + summary.live_lines <= 130_000
    assert summary.live_events_per_user_min >= 32
    assert summary.n_drifted_users == 120
    assert summary.n_invalid == round(0.002 * summary.live_lines)


@pytest.mark.parametrize(
    "bad",
    [
        {"n_users": 1},
        {"cold_user_fraction": 1.0},
        {"drift_at": 0.0},
        {"invalid_rate": 0.9},
        {"live_events_mean": 10.0},
        {"n_items": 50},  # too few items for the per-user minimum of distinct items
        {"cold_arrival": (0.6, 0.2)},
    ],
)
def test_invalid_config_is_rejected_naming_the_field(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        SynthConfig(**bad)  # type: ignore[arg-type]


def test_synthetic_stream_is_valid_ordered_and_deterministic() -> None:
    stream = synthetic_stream(3000, n_users=50, n_items=80, seed=5)
    assert len(stream) == 3000
    events = [decode(raw, Position("bench", 0, k)) for k, raw in enumerate(stream)]
    assert all(isinstance(e, FeedbackEvent) for e in events)
    valid = [e for e in events if isinstance(e, FeedbackEvent)]
    assert np.all(np.diff([e.timestamp for e in valid]) >= 0)
    assert len({e.event_id for e in valid}) == 3000
    assert synthetic_stream(3000, n_users=50, n_items=80, seed=5) == stream
    assert synthetic_stream(3000, n_users=50, n_items=80, seed=6) != stream
