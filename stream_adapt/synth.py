"""Seeded synthetic feedback with a known latent structure, for the demo, tests and benchmarks.

Real logs cannot tell us whether adaptation found the *right* answer; a generator that knows the truth
can. Ratings follow the biased matrix-factorisation model the built-in recommender assumes:

    rating = clip(round_half(mu + b_u + b_i + <p_u, q_i> + noise), 1, 5)

on a MovieLens-style half-star scale: clipped to [1, 5] (symmetric about 3) and rounded to 0.5 steps,
so the values look like a real rating log while the noise-free truth stays available for oracle
comparisons. Item popularity is Zipf-like and user activity log-normal, as in real logs, but every live
user gets at least `live_events_min` events so that several few-shot windows fill.

`generate` writes four files:

- `history.jsonl`: warm users' events over an earlier span (pretraining data, all valid);
- `live.jsonl`: the served stream. Warm users continue, cold users arrive part-way (their first events
  are truly new), a fraction of warm users change taste at `drift_time` (per-user drift), a subset of
  items shifts bias at `global_drift_time` (global drift), and a small fraction of lines is replaced
  by realistic bad records so the demo has dead letters;
- `truth.npz`: factors and biases before and after drift, who drifted and when, cold users, and where
  the bad lines are (load it with `load_truth`);
- `synth.json`: the `SynthSummary` (counts, drift times, injected bad records by kind, config).

Every valid line is exactly the canonical bytes `events.event_to_json` writes for its event. Everything
is a pure function of (config, seed): the same inputs give byte-identical files.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from stream_adapt.errors import ConfigError

DAY_S = 86_400
START_2024 = 1_704_067_200  # 2024-01-01T00:00:00Z

#: The bad-record kinds injected into `live.jsonl`, named by the `decode` reason each one triggers.
#: `duplicate_event_id` is a redelivered earlier line: valid JSON, caught by the pipeline's dedup.
INVALID_KINDS = (
    "not_json",
    "non_finite",
    "unknown_event_type",
    "value_out_of_range",
    "missing_field",
    "id_invalid",
    "timestamp_out_of_range",
    "duplicate_event_id",
)
#: How far back (in lines) a redelivered duplicate may reach: close enough for a bounded dedup cache.
DUPLICATE_MAX_LAG = 1000


@dataclass(frozen=True)
class SynthConfig:
    """Shape of the synthetic world. Defaults: ~110k events that pretrain in seconds on 2 cores."""

    n_users: int = 1000
    cold_user_fraction: float = 0.2  # users seen only in the live stream
    n_items: int = 500
    dim: int = 8
    global_mean: float = 3.6  # MovieLens' mean is ~3.5
    user_bias_std: float = 0.35
    item_bias_std: float = 0.45
    factor_std: float = 0.5  # <p, q> std = sqrt(dim) * factor_std**2 ~ 0.7: taste matters as much as bias
    noise_std: float = 0.35
    rating_min: float = 1.0
    rating_max: float = 5.0
    rating_step: float = 0.5
    # Zipf s over items. Each user rates an item at most once, so the head saturates (the top item is
    # rated by about half the users, as in MovieLens) while the tail is rated by a handful.
    item_popularity_exponent: float = 0.8
    activity_sigma: float = 0.8  # log-normal spread of per-user activity (shared by history and live)
    history_events_mean: float = 60.0
    history_events_min: int = 20
    live_events_mean: float = 64.0
    live_events_min: int = 32  # 4 windows of 8 for the least active live user
    max_items_per_user_fraction: float = 0.5  # a user rates each item at most once
    start_timestamp: int = START_2024
    history_days: float = 60.0
    live_days: float = 28.0
    session_events_mean: float = 6.0  # events arrive in sessions, not uniformly
    session_minutes_mean: float = 20.0
    cold_arrival: tuple[float, float] = (0.1, 0.5)  # fraction of the live span when cold users arrive
    drift_user_fraction: float = 0.15  # of warm users
    drift_at: float = 0.5  # fraction of the live span
    drift_angle_deg: float = 150.0  # taste vector rotated this far (180 would be an exact flip)
    drift_user_bias_shift: float = 1.0  # towards the other side of the global mean
    global_drift: bool = True
    global_drift_at: float = 0.75
    global_drift_item_fraction: float = 0.1  # drawn by popularity, so they carry ~25% of traffic
    global_drift_item_bias_shift: float = 1.5  # acclaimed items fall, panned ones recover
    invalid_rate: float = 0.002

    def __post_init__(self) -> None:
        checks = {
            "n_users": self.n_users >= 2,
            "cold_user_fraction": 0.0 <= self.cold_user_fraction < 1.0,
            "n_items": self.n_items >= 2,
            "dim": self.dim >= 1,
            "rating_max": self.rating_min < self.rating_max,
            "rating_step": self.rating_step > 0,
            "history_events_min": self.history_events_min >= 1,
            "history_events_mean": self.history_events_mean >= self.history_events_min,
            "live_events_min": self.live_events_min >= 1,
            "live_events_mean": self.live_events_mean >= self.live_events_min,
            "max_items_per_user_fraction": 0.0 < self.max_items_per_user_fraction <= 1.0,
            "n_items (too few distinct items for the per-user event minimums)": (
                self.history_events_min + self.live_events_min
                <= math.floor(self.max_items_per_user_fraction * self.n_items)
            ),
            "start_timestamp": self.start_timestamp >= 631152000,
            "history_days": self.history_days > 0,
            "live_days": self.live_days > 0,
            "session_events_mean": self.session_events_mean >= 1,
            "session_minutes_mean": self.session_minutes_mean > 0,
            "cold_arrival": 0.0 <= self.cold_arrival[0] <= self.cold_arrival[1] < 1.0,
            "drift_user_fraction": 0.0 <= self.drift_user_fraction <= 1.0,
            "drift_at": 0.0 < self.drift_at < 1.0,
            "global_drift_at": 0.0 < self.global_drift_at < 1.0,
            "global_drift_item_fraction": 0.0 <= self.global_drift_item_fraction <= 1.0,
            "invalid_rate": 0.0 <= self.invalid_rate <= 0.5,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"invalid SynthConfig field(s): {', '.join(bad)}")


DEFAULT_CONFIG = SynthConfig()


@dataclass(frozen=True)
class SynthSummary:
    """The facts about one generated data set (also written as `synth.json`)."""

    seed: int
    n_users: int
    n_warm_users: int
    n_cold_users: int
    n_items: int
    history_events: int
    live_lines: int
    live_valid_events: int  # lines that decode and are not duplicates
    live_events_per_user_min: int  # before bad-record injection
    invalid_by_kind: dict[str, int]
    history_start: float
    live_start: float
    live_end: float
    drift_time: float
    n_drifted_users: int
    global_drift_time: float | None
    n_global_drift_items: int
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def n_invalid(self) -> int:
        """All injected bad lines, duplicates included."""
        return sum(self.invalid_by_kind.values())

    def to_json(self) -> str:
        """Stable, human-readable JSON (sorted keys) for `synth.json`."""
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


@dataclass(frozen=True)
class SynthTruth:
    """The latent world behind a generated data set (`truth.npz`). Ids are strings as in the events."""

    user_ids: np.ndarray
    item_ids: np.ndarray
    global_mean: float
    user_factors: np.ndarray  # [U, D], before drift
    user_bias: np.ndarray
    user_factors_after: np.ndarray  # equal to the above except for drifted users
    user_bias_after: np.ndarray
    item_factors: np.ndarray
    item_bias: np.ndarray
    item_bias_after: np.ndarray  # after the global drift
    item_popularity: np.ndarray  # sampling probability of each item
    drift_time: float
    global_drift_time: float  # NaN when disabled
    drifted_users: np.ndarray
    cold_users: np.ndarray
    cold_arrival_time: np.ndarray  # per cold user, same order
    global_drift_items: np.ndarray
    invalid_offsets: np.ndarray  # 0-based line offsets in live.jsonl
    invalid_kinds: np.ndarray

    def expected_rating(
        self, user_ids: Sequence[str], item_ids: Sequence[str], timestamps: Sequence[float] | None = None
    ) -> np.ndarray:
        """Noise-free, unclipped rating in force at `timestamps`; pre-drift parameters when None.

        This is the oracle: no model can beat its error on average, and comparing against the pre-drift
        truth shows how much the world changed under a model that stopped learning. Unknown ids raise
        KeyError.
        """
        u = _lookup(self.user_ids, user_ids)
        i = _lookup(self.item_ids, item_ids)
        if timestamps is None:
            p, q = self.user_factors[u], self.item_factors[i]
            return _score(self.global_mean, self.user_bias[u], self.item_bias[i], p, q)
        t = np.asarray(timestamps, dtype=np.float64)
        drifted = t >= self.drift_time
        shifted = t >= self.global_drift_time  # False for NaN: no global drift
        p = np.where(drifted[:, None], self.user_factors_after[u], self.user_factors[u])
        bu = np.where(drifted, self.user_bias_after[u], self.user_bias[u])
        bi = np.where(shifted, self.item_bias_after[i], self.item_bias[i])
        return _score(self.global_mean, bu, bi, p, self.item_factors[i])


def load_truth(path: Path) -> SynthTruth:
    """Read `truth.npz` without unpickling anything."""
    with np.load(path, allow_pickle=False) as data:
        values = {f.name: data[f.name] for f in fields(SynthTruth)}
    for name in ("global_mean", "drift_time", "global_drift_time"):
        values[name] = float(values[name])
    return SynthTruth(**values)


def _lookup(ids: np.ndarray, wanted: Sequence[str]) -> np.ndarray:
    index = {str(x): k for k, x in enumerate(ids.tolist())}
    return np.fromiter((index[w] for w in wanted), dtype=np.int64, count=len(wanted))


def _score(mu: float, bu: np.ndarray, bi: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return mu + bu + bi + np.einsum("nd,nd->n", p, q)


def _rng(seed: int, stream: int) -> np.random.Generator:
    """One independent generator per purpose, so e.g. changing `invalid_rate` leaves the events alone."""
    return np.random.default_rng([seed, stream])


def _ids(prefix: str, n: int) -> list[str]:
    width = max(4, len(str(n - 1)))
    return [f"{prefix}{k:0{width}d}" for k in range(n)]


def _zipf_popularity(rng: np.random.Generator, n_items: int, exponent: float) -> np.ndarray:
    """Zipf weights over a random ranking, so popularity is not readable from the item id."""
    weights = np.arange(1, n_items + 1, dtype=np.float64) ** -exponent
    return rng.permutation(weights / weights.sum())


def _rotate(rng: np.random.Generator, p: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotate each row of `p` by `angle_deg` towards a random orthogonal direction, keeping its norm."""
    norm = np.linalg.norm(p, axis=1, keepdims=True)
    unit = p / np.maximum(norm, 1e-12)
    w = rng.normal(size=p.shape)
    w -= np.sum(w * unit, axis=1, keepdims=True) * unit
    w /= np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    angle = math.radians(angle_deg)
    return math.cos(angle) * p + math.sin(angle) * norm * w


def _rate(cfg: SynthConfig, mean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = mean + rng.normal(scale=cfg.noise_std, size=mean.shape)
    stepped = np.round(noisy / cfg.rating_step) * cfg.rating_step
    return np.clip(stepped, cfg.rating_min, cfg.rating_max)


def _session_times(
    rng: np.random.Generator, cfg: SynthConfig, counts: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> np.ndarray:
    """Integer timestamps for `counts[g]` events of each segment g in [lo[g], hi[g]), grouped in sessions.

    Each segment (one user in one phase) gets ~count/session_events_mean sessions starting uniformly in
    its span; each event falls uniformly inside one session of exponential length. Flat output, segment
    by segment.
    """
    n_sessions = np.maximum(1, np.rint(counts / cfg.session_events_mean)).astype(np.int64)
    session_seg = np.repeat(np.arange(len(counts)), n_sessions)
    session_len = np.minimum(rng.exponential(cfg.session_minutes_mean * 60.0, size=len(session_seg)), 4 * 3600)
    span = np.maximum(hi[session_seg] - lo[session_seg] - session_len, 1.0)
    session_start = lo[session_seg] + rng.random(len(session_seg)) * span
    first_session = np.concatenate(([0], np.cumsum(n_sessions)[:-1]))
    event_seg = np.repeat(np.arange(len(counts)), counts)
    session = first_session[event_seg] + (rng.random(len(event_seg)) * n_sessions[event_seg]).astype(np.int64)
    t = session_start[session] + rng.random(len(event_seg)) * session_len[session]
    return np.minimum(np.floor(t), hi[event_seg] - 1).astype(np.int64)


def _format_lines(
    id_prefix: str, users: list[str], items: list[str], u: np.ndarray, i: np.ndarray, r: np.ndarray, t: np.ndarray
) -> list[str]:
    """Canonical event JSON (what `event_to_json` writes), one string per event, without newline."""
    width = max(7, len(str(len(u))))
    return [
        f'{{"event_id":"{id_prefix}{k:0{width}d}","user_id":"{users[uu]}","item_id":"{items[ii]}",'
        f'"event_type":"rating","value":{rr!r},"timestamp":{tt}.0}}'
        for k, (uu, ii, rr, tt) in enumerate(zip(u.tolist(), i.tolist(), r.tolist(), t.tolist(), strict=True))
    ]


def _corrupt(kind: str, line: str, earlier: str) -> str:
    """A realistic bad record made from a good line (and, for a duplicate, an earlier one)."""
    event = json.loads(line)
    if kind == "not_json":  # a partial write
        return line[: len(line) * 2 // 3]
    if kind == "non_finite":
        return line.replace(f'"value":{event["value"]!r}', '"value":NaN')
    if kind == "unknown_event_type":
        return line.replace('"event_type":"rating"', '"event_type":"review"')
    if kind == "value_out_of_range":  # "this one goes to eleven": outside the 0-10 rating range
        return line.replace(f'"value":{event["value"]!r}', '"value":11.0')
    if kind == "missing_field":
        return line.replace(f'"item_id":"{event["item_id"]}",', "")
    if kind == "id_invalid":  # a producer sending the product URL (> MAX_ID_LENGTH chars) as the id
        url = f"https://shop.example.com/catalog/products/{event['item_id']}?utm_source=newsletter"
        url += "&utm_medium=email&utm_campaign=spring-sale-2024&utm_content=hero-banner"
        return line.replace(f'"item_id":"{event["item_id"]}"', f'"item_id":"{url}"')
    if kind == "timestamp_out_of_range":  # milliseconds instead of seconds
        ts = int(event["timestamp"])
        return line.replace(f'"timestamp":{ts}.0', f'"timestamp":{ts * 1000}')
    if kind == "duplicate_event_id":  # an at-least-once redelivery of an earlier record
        return earlier
    raise ValueError(f"unknown invalid kind {kind!r}")


def _inject_invalid(rng: np.random.Generator, lines: list[str], rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Replace round(rate * len(lines)) lines in place, kinds balanced; returns (offsets, kinds)."""
    n_bad = min(round(rate * len(lines)), len(lines) - 1)
    if n_bad <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype="<U1")
    offsets = np.sort(rng.choice(np.arange(1, len(lines)), size=n_bad, replace=False))
    kinds = rng.permutation(np.resize(np.array(INVALID_KINDS), n_bad))
    bad = set(offsets.tolist())
    originals = {k: lines[k] for k in bad}
    for offset, kind in zip(offsets.tolist(), kinds.tolist(), strict=True):
        earlier = ""
        if kind == "duplicate_event_id":
            candidates = [j for j in range(max(0, offset - DUPLICATE_MAX_LAG), offset) if j not in bad]
            earlier = lines[candidates[int(rng.integers(len(candidates)))]] if candidates else lines[0]
        lines[offset] = _corrupt(kind, originals[offset], earlier)
    return offsets, kinds


def _write_npz(path: Path, arrays: dict[str, Any]) -> None:
    """Like `np.savez_compressed`, but with fixed zip timestamps so the bytes depend only on the data."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, value in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w") as fh:
                np.lib.format.write_array(fh, np.asarray(value), allow_pickle=False)


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_bytes(("\n".join(lines) + "\n").encode() if lines else b"")


@dataclass(frozen=True)
class _World:
    """Latent parameters before any drift."""

    bu: np.ndarray
    bi: np.ndarray
    p: np.ndarray
    q: np.ndarray
    popularity: np.ndarray


def _sample_world(rng: np.random.Generator, cfg: SynthConfig, n_users: int, n_items: int) -> _World:
    return _World(
        bu=rng.normal(scale=cfg.user_bias_std, size=n_users),
        bi=rng.normal(scale=cfg.item_bias_std, size=n_items),
        p=rng.normal(scale=cfg.factor_std, size=(n_users, cfg.dim)),
        q=rng.normal(scale=cfg.factor_std, size=(n_items, cfg.dim)),
        popularity=_zipf_popularity(rng, n_items, cfg.item_popularity_exponent),
    )


def _activity(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """Log-normal activity multipliers with mean 1: most users are light, a few are heavy."""
    return rng.lognormal(mean=-(sigma**2) / 2, sigma=sigma, size=n)


def _event_counts(rng: np.random.Generator, cfg: SynthConfig, warm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-user (history, live) event counts: skewed, above the minimums, within the per-user item cap."""
    extra_h = cfg.history_events_mean - cfg.history_events_min
    extra_l = cfg.live_events_mean - cfg.live_events_min
    cap = math.floor(cfg.max_items_per_user_fraction * cfg.n_items)
    a = _activity(rng, cfg.n_users, cfg.activity_sigma)
    if extra_h + extra_l > 0:
        a = np.minimum(a, (cap - cfg.history_events_min - cfg.live_events_min) / (extra_h + extra_l))
    n_hist = np.where(warm, cfg.history_events_min + np.floor(a * extra_h), 0).astype(np.int64)
    n_live = (cfg.live_events_min + np.floor(a * extra_l)).astype(np.int64)
    return n_hist, n_live


def _choose_items(
    rng: np.random.Generator, popularity: np.ndarray, n_hist: np.ndarray, n_live: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct items per user, drawn by popularity (Gumbel top-k), split at random into history/live.

    Returns flat item indices, user by user, for history and for live.
    """
    n_total = n_hist + n_live
    width = int(n_total.max())
    keys = np.log(popularity)[None, :] + rng.gumbel(size=(len(n_total), len(popularity)))
    chosen = np.argsort(-keys, axis=1, kind="stable")[:, :width]
    col = np.arange(width)[None, :]
    in_use = col < n_total[:, None]
    # Top-k order is popularity-biased; shuffle so history does not take the popular items first.
    shuffle = np.argsort(np.where(in_use, rng.random(chosen.shape), 2.0), axis=1, kind="stable")
    chosen = np.take_along_axis(chosen, shuffle, axis=1)
    hist = chosen[col < n_hist[:, None]]
    live = chosen[(col >= n_hist[:, None]) & in_use]
    return hist, live


def _live_times(
    rng: np.random.Generator,
    cfg: SynthConfig,
    n_live: np.ndarray,
    cold: np.ndarray,
    cold_arrival: np.ndarray,
    drifted: np.ndarray,
    bounds: tuple[int, int, int],
) -> np.ndarray:
    """Live timestamps, user by user. Cold users start at their arrival.

    Drifted users' events are split in proportion around the drift time (instead of left to chance), so
    each of them has at least (1 - drift_at) * live_events_min events after the drift to detect it on.
    """
    live_start, drift_time, live_end = bounds
    lo = np.full(cfg.n_users, live_start, dtype=np.int64)
    lo[cold] = cold_arrival
    hi = np.full(cfg.n_users, live_end, dtype=np.int64)
    counts = n_live.copy()
    n_before = np.floor(cfg.drift_at * n_live[drifted]).astype(np.int64)
    counts[drifted] = n_before
    hi[drifted] = drift_time
    seg_user = np.concatenate([np.arange(cfg.n_users), drifted])
    seg_lo = np.concatenate([lo, np.full(len(drifted), drift_time, dtype=np.int64)])
    seg_hi = np.concatenate([hi, np.full(len(drifted), live_end, dtype=np.int64)])
    seg_n = np.concatenate([counts, n_live[drifted] - n_before])
    order = np.argsort(seg_user, kind="stable")  # a drifted user's before-segment, then its after-segment
    return _session_times(rng, cfg, seg_n[order], seg_lo[order], seg_hi[order])


def _opposite_sign(x: np.ndarray) -> np.ndarray:
    return np.where(x >= 0, -1.0, 1.0)


def generate(out_dir: Path, config: SynthConfig = DEFAULT_CONFIG, seed: int = 0) -> SynthSummary:
    """Write history.jsonl, live.jsonl, truth.npz and synth.json under `out_dir`; return the summary."""
    cfg = config
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    world = _sample_world(_rng(seed, 0), cfg, cfg.n_users, cfg.n_items)
    pick = _rng(seed, 1)

    n_cold = round(cfg.cold_user_fraction * cfg.n_users)
    cold = np.sort(pick.choice(cfg.n_users, size=n_cold, replace=False))
    is_warm = np.ones(cfg.n_users, dtype=bool)
    is_warm[cold] = False
    warm = np.flatnonzero(is_warm)

    history_start = cfg.start_timestamp
    live_start = history_start + round(cfg.history_days * DAY_S)
    live_span = round(cfg.live_days * DAY_S)
    live_end = live_start + live_span
    drift_time = live_start + round(cfg.drift_at * live_span)
    global_drift_time = live_start + round(cfg.global_drift_at * live_span) if cfg.global_drift else math.nan

    # Drift: a fraction of warm users change taste; a popularity-weighted subset of items shifts bias.
    drifted = np.sort(pick.choice(warm, size=round(cfg.drift_user_fraction * len(warm)), replace=False))
    is_drifted = np.zeros(cfg.n_users, dtype=bool)
    is_drifted[drifted] = True
    p_after = world.p.copy()
    p_after[drifted] = _rotate(_rng(seed, 2), world.p[drifted], cfg.drift_angle_deg)
    bu_after = world.bu.copy()
    bu_after[drifted] += cfg.drift_user_bias_shift * _opposite_sign(world.bu[drifted])
    n_shifted = round(cfg.global_drift_item_fraction * cfg.n_items) if cfg.global_drift else 0
    shift_keys = np.log(world.popularity) + pick.gumbel(size=cfg.n_items)
    shifted_items = np.sort(np.argsort(-shift_keys, kind="stable")[:n_shifted])
    bi_after = world.bi.copy()
    bi_after[shifted_items] += cfg.global_drift_item_bias_shift * _opposite_sign(world.bi[shifted_items])

    n_hist, n_live = _event_counts(pick, cfg, is_warm)
    hist_items, live_items = _choose_items(_rng(seed, 3), world.popularity, n_hist, n_live)
    hist_users = np.repeat(np.arange(cfg.n_users), n_hist)
    live_users = np.repeat(np.arange(cfg.n_users), n_live)

    times = _rng(seed, 4)
    arrival_frac = times.uniform(cfg.cold_arrival[0], cfg.cold_arrival[1], size=n_cold)
    cold_arrival = live_start + np.floor(arrival_frac * live_span).astype(np.int64)
    hist_t = _session_times(times, cfg, n_hist, np.full(cfg.n_users, history_start), np.full(cfg.n_users, live_start))
    live_t = _live_times(times, cfg, n_live, cold, cold_arrival, drifted, (live_start, drift_time, live_end))

    noise = _rng(seed, 5)
    u, i = hist_users, hist_items
    hist_r = _rate(cfg, _score(cfg.global_mean, world.bu[u], world.bi[i], world.p[u], world.q[i]), noise)
    u, i = live_users, live_items
    after = is_drifted[u] & (live_t >= drift_time)
    bi_live = np.where(live_t >= global_drift_time, bi_after[i], world.bi[i])
    mean = _score(
        cfg.global_mean,
        np.where(after, bu_after[u], world.bu[u]),
        bi_live,
        np.where(after[:, None], p_after[u], world.p[u]),
        world.q[i],
    )
    live_r = _rate(cfg, mean, noise)

    user_ids, item_ids = _ids("u", cfg.n_users), _ids("i", cfg.n_items)
    order = np.lexsort((hist_items, hist_users, hist_t))
    history = _format_lines(
        f"s{seed}-h", user_ids, item_ids, hist_users[order], hist_items[order], hist_r[order], hist_t[order]
    )
    order = np.lexsort((live_items, live_users, live_t))
    live = _format_lines(
        f"s{seed}-l", user_ids, item_ids, live_users[order], live_items[order], live_r[order], live_t[order]
    )
    bad_offsets, bad_kinds = _inject_invalid(_rng(seed, 6), live, cfg.invalid_rate)
    invalid_by_kind = {k: int(np.count_nonzero(bad_kinds == k)) for k in INVALID_KINDS}

    uid, iid = np.array(user_ids), np.array(item_ids)
    truth = SynthTruth(
        user_ids=uid,
        item_ids=iid,
        global_mean=cfg.global_mean,
        user_factors=world.p,
        user_bias=world.bu,
        user_factors_after=p_after,
        user_bias_after=bu_after,
        item_factors=world.q,
        item_bias=world.bi,
        item_bias_after=bi_after,
        item_popularity=world.popularity,
        drift_time=float(drift_time),
        global_drift_time=float(global_drift_time),
        drifted_users=uid[drifted],
        cold_users=uid[cold],
        cold_arrival_time=cold_arrival.astype(np.float64),
        global_drift_items=iid[shifted_items],
        invalid_offsets=bad_offsets,
        invalid_kinds=bad_kinds,
    )
    summary = SynthSummary(
        seed=seed,
        n_users=cfg.n_users,
        n_warm_users=len(warm),
        n_cold_users=n_cold,
        n_items=cfg.n_items,
        history_events=len(history),
        live_lines=len(live),
        live_valid_events=len(live) - len(bad_offsets),
        live_events_per_user_min=int(n_live.min()),
        invalid_by_kind=invalid_by_kind,
        history_start=float(history_start),
        live_start=float(live_start),
        live_end=float(live_end),
        drift_time=float(drift_time),
        n_drifted_users=len(drifted),
        global_drift_time=None if math.isnan(global_drift_time) else float(global_drift_time),
        n_global_drift_items=n_shifted,
        config=asdict(cfg),
    )
    _write_lines(out_dir / "history.jsonl", history)
    _write_lines(out_dir / "live.jsonl", live)
    _write_npz(out_dir / "truth.npz", {f.name: getattr(truth, f.name) for f in fields(SynthTruth)})
    (out_dir / "synth.json").write_text(summary.to_json())
    return summary


def synthetic_stream(
    n_events: int,
    n_users: int = 1000,
    n_items: int = 500,
    seed: int = 0,
    *,
    start_timestamp: int = START_2024,
    events_per_second: float = 50.0,
) -> list[bytes]:
    """`n_events` valid, time-ordered rating records (canonical JSON bytes) for benchmarks.

    Same latent model and skews as `generate`, without drift, cold users or bad records, and users may
    rate an item twice: a benchmark wants a cheap, realistic load, not a story.
    """
    if n_events < 0 or n_users < 1 or n_items < 1 or events_per_second <= 0:
        raise ValueError("need n_events >= 0, n_users >= 1, n_items >= 1 and events_per_second > 0")
    cfg = DEFAULT_CONFIG
    rng = _rng(seed, 100)
    world = _sample_world(rng, cfg, n_users, n_items)
    activity = _activity(rng, n_users, cfg.activity_sigma)
    u = rng.choice(n_users, size=n_events, p=activity / activity.sum())
    i = rng.choice(n_items, size=n_events, p=world.popularity)
    t = start_timestamp + np.floor(np.cumsum(rng.exponential(1.0 / events_per_second, size=n_events)))
    r = _rate(cfg, _score(cfg.global_mean, world.bu[u], world.bi[i], world.p[u], world.q[i]), rng)
    lines = _format_lines(f"b{seed}-", _ids("u", n_users), _ids("i", n_items), u, i, r, t.astype(np.int64))
    return [line.encode() for line in lines]
