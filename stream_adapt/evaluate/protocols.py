"""Evaluation protocols: how an event log is cut into what the model may learn from and what it is judged on.

Every split is a pure function of the events (and, for MeLU, a seed): no model, no I/O. The parts of a
split are disjoint by construction, and the tests check that they are.

- `prequential_split`: the log sorted by time (stable: ties keep file order); the first `fraction` of
  the events pretrain the base model, the rest is the stream scored test-then-train.
- `cold_start_split`: users ordered by arrival (their first rating). The first `1 - cold_fraction` of
  them are warm; the cold users' arrival starts at time T, and the warm data is every event before T
  (so nothing the base model or a baseline learns from comes from the cold users' time or later). Each
  cold user's ratings in time order: the first K (K from the shots list) are the support, everything from
  position max(shots) on is the query, so the query set is one and the same for every K and the error
  vs shots curve compares like with like. Cold users with too few ratings for that are left out.
- `melu_split`: as in MeLU (Lee et al., KDD 2019): only users with 13-100 ratings; a seeded random 80%
  of them are warm (all their ratings); for each cold user 10 random ratings are the query and the rest
  (3-90) the support.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stream_adapt.events import FeedbackEvent

#: MeLU's user filter and query size.
MELU_MIN_RATINGS = 13
MELU_MAX_RATINGS = 100
MELU_QUERY = 10


def chronological(events: Sequence[FeedbackEvent]) -> list[FeedbackEvent]:
    """Events sorted by timestamp; ties keep their order in the log (Python's sort is stable)."""
    return sorted(events, key=lambda e: e.timestamp)


def by_user(events: Sequence[FeedbackEvent]) -> dict[str, list[FeedbackEvent]]:
    """Each user's events in time order (ties in log order); users in order of first appearance."""
    out: dict[str, list[FeedbackEvent]] = {}
    for e in chronological(events):
        out.setdefault(e.user_id, []).append(e)
    return out


@dataclass(frozen=True)
class PrequentialSplit:
    """The first part of the chronological log pretrains; the rest is streamed test-then-train."""

    pretrain: tuple[FeedbackEvent, ...]
    stream: tuple[FeedbackEvent, ...]
    fraction: float


def prequential_split(events: Sequence[FeedbackEvent], fraction: float) -> PrequentialSplit:
    """Cut the time-sorted log after its first `fraction` of events (0 <= fraction < 1)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"pretrain fraction must be in [0, 1), got {fraction}")
    ordered = chronological(events)
    cut = int(len(ordered) * fraction)
    return PrequentialSplit(tuple(ordered[:cut]), tuple(ordered[cut:]), fraction)


@dataclass(frozen=True)
class ColdUser:
    """One cold user: the support the pipeline may learn from, and the query it is judged on."""

    user: str
    support: tuple[FeedbackEvent, ...]  # in time order
    query: tuple[FeedbackEvent, ...]


@dataclass(frozen=True)
class FewShotSplit:
    """Warm data (pretraining, baselines) and the cold users with their support and query sets."""

    protocol: str
    seed: int
    shots: int | None  # K of the cold-start protocol; None for MeLU (support = all but the query)
    warm: tuple[FeedbackEvent, ...]  # in time order
    cold: tuple[ColdUser, ...]

    def support_events(self) -> list[FeedbackEvent]:
        """Every cold user's support, merged in time order: the stream the pipeline consumes."""
        return chronological([e for u in self.cold for e in u.support])

    def query_events(self) -> list[FeedbackEvent]:
        return [e for u in self.cold for e in u.query]


@dataclass(frozen=True)
class ColdStartUsers:
    """The cold-start protocol before K is chosen: warm data and each cold user's full history."""

    warm: tuple[FeedbackEvent, ...]
    histories: tuple[tuple[str, tuple[FeedbackEvent, ...]], ...]  # cold users, each in time order
    max_shots: int
    split_time: float  # T: the first cold user's arrival; every warm event is earlier
    dropped_users: int  # cold users with at most max_shots ratings (no query left)

    def for_shots(self, shots: int) -> FewShotSplit:
        """Support = each cold user's first `shots` ratings; query = ratings from position max_shots on."""
        if not 0 <= shots <= self.max_shots:
            raise ValueError(f"shots must be in [0, {self.max_shots}], got {shots}")
        cold = tuple(ColdUser(u, h[:shots], h[self.max_shots :]) for u, h in self.histories)
        return FewShotSplit("cold-start", 0, shots, self.warm, cold)


def cold_start_split(
    events: Sequence[FeedbackEvent], shots: Sequence[int], cold_fraction: float = 0.2
) -> ColdStartUsers:
    """Warm and cold users by arrival time (see the module docstring). Deterministic: no seed."""
    if not shots or min(shots) < 0:
        raise ValueError(f"shots must be non-negative and not empty, got {list(shots)}")
    if not 0.0 < cold_fraction < 1.0:
        raise ValueError(f"cold fraction must be in (0, 1), got {cold_fraction}")
    histories = by_user(events)  # users in order of arrival (first event), ties in log order
    users = list(histories)
    n_cold = max(1, round(len(users) * cold_fraction))
    if n_cold >= len(users):
        raise ValueError(f"need at least 2 users for a cold-start split, got {len(users)}")
    cold_users = users[len(users) - n_cold :]
    split_time = histories[cold_users[0]][0].timestamp
    warm = tuple(e for e in chronological(events) if e.timestamp < split_time)
    k_max = max(shots)
    kept = tuple((u, tuple(histories[u])) for u in cold_users if len(histories[u]) > k_max)
    return ColdStartUsers(warm, kept, k_max, split_time, len(cold_users) - len(kept))


def melu_split(
    events: Sequence[FeedbackEvent],
    seed: int,
    warm_fraction: float = 0.8,
    n_query: int = MELU_QUERY,
    min_ratings: int = MELU_MIN_RATINGS,
    max_ratings: int = MELU_MAX_RATINGS,
) -> FewShotSplit:
    """MeLU's user cold-start split (see the module docstring); users and query ratings drawn with `seed`."""
    if not 0.0 < warm_fraction < 1.0:
        raise ValueError(f"warm fraction must be in (0, 1), got {warm_fraction}")
    if min_ratings <= n_query:
        raise ValueError(f"min_ratings ({min_ratings}) must exceed the query size ({n_query})")
    histories = {u: h for u, h in by_user(events).items() if min_ratings <= len(h) <= max_ratings}
    users = sorted(histories)  # a canonical order, so the draw depends on the seed only
    if len(users) < 2:
        raise ValueError(f"need at least 2 users with {min_ratings}-{max_ratings} ratings, got {len(users)}")
    rng = np.random.default_rng(seed)
    order = [users[i] for i in rng.permutation(len(users))]
    n_warm = min(len(users) - 1, max(1, round(len(users) * warm_fraction)))
    warm = chronological([e for u in order[:n_warm] for e in histories[u]])
    cold = []
    for u in sorted(order[n_warm:]):
        h = histories[u]
        query_pos = set(rng.choice(len(h), size=n_query, replace=False).tolist())
        support = tuple(e for i, e in enumerate(h) if i not in query_pos)  # stays in time order
        query = tuple(e for i, e in enumerate(h) if i in query_pos)
        cold.append(ColdUser(u, support, query))
    return FewShotSplit("melu", seed, None, tuple(warm), tuple(cold))
