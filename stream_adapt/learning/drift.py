"""Drift detection on the prequential error, per entity (bounded) and global.

River detectors are fed with `update(x)` and read through `drift_detected` (never a return value).
Each event's absolute error, measured *before* the event joins a window, is the signal. An entity's
detector only counts after `entity_warmup` events (a handful of errors says nothing), and the number
of entities tracked is bounded by an LRU so memory stays flat. KSWIN runs a KS test on every update
(~230 us): fine for the global detector, too slow per entity at high rates; ADWIN is ~0.2 us.

ADWIN flags any change of the mean, and the error falling (adaptation working) is not drift: a
detection counts only when ADWIN's estimate of the mean error went up. PageHinkley runs with
mode="up". KSWIN compares distributions and stays two-sided.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from river import drift

from stream_adapt.config import DetectorConfig, DriftConfig


def make_detector(cfg: DetectorConfig, seed: int = 0) -> Any | None:
    """A fresh river detector as configured, or None when this detector is off."""
    if cfg.kind == "adwin":
        return drift.ADWIN(delta=cfg.adwin_delta, clock=cfg.adwin_clock)
    if cfg.kind == "page_hinkley":
        return drift.PageHinkley(
            threshold=cfg.ph_threshold, delta=cfg.ph_delta, min_instances=cfg.ph_min_instances, mode="up"
        )
    if cfg.kind == "kswin":
        return drift.KSWIN(alpha=cfg.kswin_alpha, window_size=cfg.kswin_window, seed=seed)
    return None


class _EntityDrift:
    __slots__ = ("detector", "seen")

    def __init__(self, detector: Any):
        self.detector = detector
        self.seen = 0


class DriftMonitor:
    """Feeds errors to the global detector and to one detector per recently active entity."""

    def __init__(self, cfg: DriftConfig, max_entities: int, seed: int = 0):
        self.cfg = cfg
        self.max_entities = max_entities
        self.seed = seed
        self.global_detector = make_detector(cfg.global_detector, seed)
        self._entities: OrderedDict[str, _EntityDrift] = OrderedDict()
        self.per_entity = cfg.entity_detector.kind != "none"
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entities)

    def update(self, entity: str, error: float) -> tuple[bool, bool]:
        """Feed one error; returns (entity drift detected, global drift detected)."""
        global_drift = False
        if self.global_detector is not None:
            global_drift = _update(self.global_detector, error)
        if not self.per_entity:
            return False, global_drift
        state = self._entities.get(entity)
        if state is None:
            state = _EntityDrift(make_detector(self.cfg.entity_detector, self.seed))
            self._entities[entity] = state
            if len(self._entities) > self.max_entities:
                self._entities.popitem(last=False)
                self.evicted += 1
        else:
            self._entities.move_to_end(entity)
        state.seen += 1
        return _update(state.detector, error) and state.seen > self.cfg.entity_warmup, global_drift

    def reset_entity(self, entity: str) -> None:
        """Start an entity's detector afresh (after it re-adapted to the new regime)."""
        self._entities.pop(entity, None)


def _update(detector: Any, error: float) -> bool:
    """Feed one error; True only for a detected *increase* of the error where the detector can tell."""
    before = getattr(detector, "estimation", None)
    detector.update(error)
    if not detector.drift_detected:
        return False
    return before is None or detector.estimation >= before
