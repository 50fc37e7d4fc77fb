"""Rating-prediction metrics over a query set, per user then over users where it matters.

- MAE: each user's mean absolute error, then the mean over users (MeLU's definition: every cold user
  counts once, however many query ratings they have).
- RMSE: over all query ratings pooled (the usual definition; a per-user RMSE would weigh a user with
  one query rating like one with a hundred).
- nDCG@3: per user, the query items ranked by prediction (ties: the order given), gain 2^r - 1 of the
  true rating r, discount 1 / log2(rank + 1), divided by the ideal DCG of the same items; then the mean
  over users. Users whose ideal DCG is 0 (every true rating 0) have no ranking to judge and are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike


@dataclass(frozen=True)
class Scores:
    mae: float
    rmse: float
    ndcg3: float | None


def _groups(users: Sequence[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, u in enumerate(users):
        out.setdefault(u, []).append(i)
    return out


def user_mae(users: Sequence[str], y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Mean over users of each user's mean absolute error."""
    err = np.abs(np.asarray(y_pred, dtype=np.float64) - np.asarray(y_true, dtype=np.float64))
    if len(err) != len(users):
        raise ValueError(f"{len(users)} users but {len(err)} errors")
    if not len(err):
        return float("nan")
    return float(np.mean([err[idx].mean() for idx in _groups(users).values()]))


def rmse(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Root mean squared error over all pairs pooled."""
    err = np.asarray(y_pred, dtype=np.float64) - np.asarray(y_true, dtype=np.float64)
    return float(math.sqrt(np.mean(err**2))) if len(err) else float("nan")


def dcg_at_k(gains_in_rank_order: Sequence[float], k: int) -> float:
    """DCG of the first k gains: sum of (2^r - 1) / log2(rank + 1), ranks from 1."""
    return sum((2.0**r - 1.0) / math.log2(rank + 2) for rank, r in enumerate(gains_in_rank_order[:k]))


def ndcg_at_k(y_true: Sequence[float], y_pred: Sequence[float], k: int = 3) -> float | None:
    """nDCG@k of one user's items ranked by prediction (stable: equal predictions keep their order)."""
    order = sorted(range(len(y_pred)), key=lambda i: -y_pred[i])
    ideal = dcg_at_k(sorted(y_true, reverse=True), k)
    if ideal <= 0.0:
        return None
    return dcg_at_k([y_true[i] for i in order], k) / ideal


def mean_ndcg(users: Sequence[str], y_true: ArrayLike, y_pred: ArrayLike, k: int = 3) -> float | None:
    """Mean over users of nDCG@k (None if no user has a ranking to judge)."""
    yt = np.asarray(y_true, dtype=np.float64).tolist()
    yp = np.asarray(y_pred, dtype=np.float64).tolist()
    values = []
    for idx in _groups(users).values():
        v = ndcg_at_k([yt[i] for i in idx], [yp[i] for i in idx], k)
        if v is not None:
            values.append(v)
    return float(np.mean(values)) if values else None


def score(users: Sequence[str], y_true: ArrayLike, y_pred: ArrayLike) -> Scores:
    """All three metrics of one method on one query set."""
    return Scores(user_mae(users, y_true, y_pred), rmse(y_true, y_pred), mean_ndcg(users, y_true, y_pred, 3))
