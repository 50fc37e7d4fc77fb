"""Baselines, fit on exactly the data the adapted model may learn from and scored on the same queries.

- `global_mean`: the mean training rating.
- `item_bias`: mean + shrunk item bias, b_i = sum(r - mu) / (n_i + 25).
- `user_item_bias`: mean + b_i + shrunk user bias, b_u = sum(r - mu - b_i) / (n_u + 10) (Koren's
  shrinkage constants; a cold user's b_u comes from their support ratings only).
- `river_biasedmf`: River's `reco.BiasedMF` with the hyper-parameters of River's own MovieLens 100K
  tutorial (n_factors 10, SGD 0.025 on biases and 0.05 on latents, zero bias init, Normal(0, 0.1,
  seed=73) latent init, no L2), wrapped in `PredClipper` to the rating range as there. That setup is
  what reports MAE 0.7486 / RMSE 0.9479 progressively over the whole time-sorted stream.

Two ways to use them, matching the protocols: `prequential_predictions` (every event predicted, then
learned; the first part of the stream only warms the model up and is not scored) and `fit_predict`
(learn the training events in time order, then predict the queries: River's model "folds in" the cold
users' support as online updates).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import numpy as np
from river import optim, preprocessing, reco

from stream_adapt.events import FeedbackEvent

#: Shrinkage of the item and user biases (pseudo-counts at the global mean), after Koren (2010).
LAMBDA_ITEM = 25.0
LAMBDA_USER = 10.0


class OnlineRecommender(Protocol):
    """What the harness needs from a baseline: score a (user, item) pair, learn from one rating."""

    def predict_one(self, user: str, item: str) -> float: ...

    def learn_one(self, user: str, item: str, y: float) -> None: ...


class BiasBaseline:
    """Global mean, plus optionally shrunk item and user biases.

    Online (`learn_one`), the user residual uses the item bias known at that moment, as a streaming
    system would have it; `fit` (batch) computes the mean, then the item biases, then the user
    biases from the final item biases.
    """

    def __init__(self, item: bool, user: bool, lam_item: float = LAMBDA_ITEM, lam_user: float = LAMBDA_USER):
        self.item, self.user = item, user
        self.lam_item, self.lam_user = lam_item, lam_user
        self._reset()

    def _reset(self) -> None:
        self.total, self.n = 0.0, 0
        self.item_sum: defaultdict[str, float] = defaultdict(float)
        self.item_n: defaultdict[str, int] = defaultdict(int)
        self.user_res: defaultdict[str, float] = defaultdict(float)
        self.user_n: defaultdict[str, int] = defaultdict(int)

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0

    def item_bias(self, item: str) -> float:
        n = self.item_n.get(item, 0)
        return (self.item_sum[item] - n * self.mean) / (n + self.lam_item) if n else 0.0

    def user_bias(self, user: str) -> float:
        n = self.user_n.get(user, 0)
        return self.user_res[user] / (n + self.lam_user) if n else 0.0

    def predict_one(self, user: str, item: str) -> float:
        pred = self.mean
        if self.item:
            pred += self.item_bias(item)
        if self.user:
            pred += self.user_bias(user)
        return pred

    def learn_one(self, user: str, item: str, y: float) -> None:
        if self.user:  # residual against what is known before this rating
            self.user_res[user] += y - self.mean - (self.item_bias(item) if self.item else 0.0)
            self.user_n[user] += 1
        self.total += y
        self.n += 1
        if self.item:
            self.item_sum[item] += y
            self.item_n[item] += 1

    def fit(self, events: Iterable[FeedbackEvent]) -> BiasBaseline:
        """Batch estimate over `events` (replaces what was learned)."""
        evs = list(events)
        self._reset()
        for e in evs:
            self.total += e.value
            self.n += 1
            if self.item:
                self.item_sum[e.item_id] += e.value
                self.item_n[e.item_id] += 1
        if self.user:
            mu = self.mean
            for e in evs:
                self.user_res[e.user_id] += e.value - mu - (self.item_bias(e.item_id) if self.item else 0.0)
                self.user_n[e.user_id] += 1
        return self


def river_biased_mf() -> reco.BiasedMF:
    """River's `BiasedMF` with the hyper-parameters of River's MovieLens tutorial (MAE 0.7486 documented)."""
    return reco.BiasedMF(
        n_factors=10,
        bias_optimizer=optim.SGD(0.025),
        latent_optimizer=optim.SGD(0.05),
        weight_initializer=optim.initializers.Zeros(),
        latent_initializer=optim.initializers.Normal(mu=0.0, sigma=0.1, seed=73),
        l2_bias=0.0,
        l2_latent=0.0,
    )


class RiverRecommender:
    """River's `BiasedMF` in `PredClipper`, behind the `OnlineRecommender` interface."""

    def __init__(self, y_min: float, y_max: float):
        # River types PredClipper's argument as a Regressor; its recommenders work there all the same
        # (River's own MovieLens tutorial wraps BiasedMF exactly like this).
        self.model = preprocessing.PredClipper(
            regressor=river_biased_mf(),  # type: ignore[arg-type]
            y_min=y_min,
            y_max=y_max,
        )

    def predict_one(self, user: str, item: str) -> float:
        return float(self.model.predict_one({}, user=user, item=item))

    def learn_one(self, user: str, item: str, y: float) -> None:
        self.model.learn_one({}, y, user=user, item=item)


#: The baselines by report name: factories taking the rating range (used by River's clipper).
BASELINES: dict[str, Callable[[float, float], OnlineRecommender]] = {
    "global_mean": lambda lo, hi: BiasBaseline(item=False, user=False),
    "item_bias": lambda lo, hi: BiasBaseline(item=True, user=False),
    "user_item_bias": lambda lo, hi: BiasBaseline(item=True, user=True),
    "river_biasedmf": RiverRecommender,
}


def prequential_predictions(model: OnlineRecommender, events: Sequence[FeedbackEvent]) -> np.ndarray:
    """Progressive validation: each event is predicted, then learned (River's `progressive_val_score`)."""
    preds = np.empty(len(events))
    for k, e in enumerate(events):
        preds[k] = model.predict_one(e.user_id, e.item_id)
        model.learn_one(e.user_id, e.item_id, e.value)
    return preds


def learn(model: OnlineRecommender, train: Sequence[FeedbackEvent]) -> None:
    """Learn `train`: a `BiasBaseline` in batch (replacing what it knew), anything else online in order."""
    if isinstance(model, BiasBaseline):
        model.fit(train)
    else:
        for e in train:
            model.learn_one(e.user_id, e.item_id, e.value)


def predict(model: OnlineRecommender, queries: Sequence[tuple[str, str]]) -> np.ndarray:
    """Predictions for (user, item) pairs, nothing learned."""
    return np.array([model.predict_one(u, i) for u, i in queries], dtype=np.float64)


def fit_predict(
    model: OnlineRecommender, train: Sequence[FeedbackEvent], queries: Sequence[tuple[str, str]]
) -> np.ndarray:
    """`learn` the training events, then `predict` the queries."""
    learn(model, train)
    return predict(model, queries)
