"""Per-entity windows against a brute-force model: no shot lost or duplicated, order kept, bounds hold."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from stream_adapt.config import WindowConfig
from stream_adapt.events import Position
from stream_adapt.learning.windows import Shot, Window, WindowStore

ENTITIES = [f"u{i}" for i in range(7)]
PARTITIONS = [("feedback", 0), ("feedback", 1), ("other", 0)]


def _window_config(shots: int, max_entities: int, max_age_s: float) -> WindowConfig:
    query = max(1, shots // 4)
    return WindowConfig(
        shots=shots,
        query_shots=query,
        min_shots=query + 1,
        max_age_s=max_age_s,
        max_entities=max_entities,
    )


class Audit:
    """Brute-force bookkeeping of what was added and where each window went."""

    def __init__(self) -> None:
        self.added: dict[str, list[Position]] = defaultdict(list)  # per entity, in add order
        self.closed: list[tuple[str, Window]] = []  # (how, window)
        self.touch: list[str] = []  # entities, least recently touched first, among open windows

    def check_partition(self, store: WindowStore) -> None:
        """Every added shot is in exactly one closed or open window; each entity's windows are its
        shots cut into consecutive runs, in order."""
        windows = [w for _, w in self.closed] + list(store)
        seen = [s.position for w in windows for s in w.shots]
        assert len(seen) == len(set(seen)), "a shot is in two windows"
        assert set(seen) == {p for ps in self.added.values() for p in ps}, "a shot was lost"
        for entity, positions in self.added.items():
            runs = sorted(
                ([s.position for s in w.shots] for w in windows if w.entity == entity and w.shots),
                key=lambda run: positions.index(run[0]),
            )
            assert [p for run in runs for p in run] == positions, f"{entity}: order or grouping broken"


class WindowMachine(RuleBasedStateMachine):
    """Random adds, time advances, takes and evictions; checked against `Audit` after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.audit = Audit()
        self.next_offset = 0  # one counter for all partitions: offsets rise per partition, as a consumer reads
        self.clock = 1_700_000_000.0

    @initialize(
        shots=st.integers(2, 6),
        max_entities=st.integers(1, 5),
        max_age_s=st.sampled_from([30.0, 100.0, 1e9]),
    )
    def setup(self, shots: int, max_entities: int, max_age_s: float) -> None:
        self.cfg = _window_config(shots, max_entities, max_age_s)
        self.store = WindowStore(self.cfg)

    def _touch(self, entity: str) -> None:
        if entity in self.audit.touch:
            self.audit.touch.remove(entity)
        self.audit.touch.append(entity)

    def _closed(self, how: str, window: Window) -> None:
        self.audit.closed.append((how, window))
        if window.entity in self.audit.touch:
            self.audit.touch.remove(window.entity)

    @rule(entity=st.sampled_from(ENTITIES), tp=st.sampled_from(PARTITIONS), dt=st.floats(0, 40))
    def add(self, entity: str, tp: tuple[str, int], dt: float) -> None:
        self.clock += dt
        position = Position(tp[0], tp[1], self.next_offset)
        self.next_offset += 1
        was_open = self.store.get(entity) is not None
        lru = self.audit.touch[0] if self.audit.touch else None
        full = self.store.add(entity, Shot(0, 1.0, self.clock, position, 0.0))
        self.audit.added[entity].append(position)
        self._touch(entity)
        evicted = self.store.drain_evicted()
        if evicted:
            assert not was_open, "an add to an open window must not evict"
            assert [w.entity for w in evicted] == [lru], "the least recently touched window is evicted"
            for w in evicted:
                self._closed("evicted", w)
        if full is not None:
            assert full.entity == entity
            assert len(full.shots) == self.cfg.shots
            assert full.shots[-1].position == position
            assert self.store.get(entity) is None
            self._closed("full", full)
        else:
            window = self.store.get(entity)
            assert window is not None and window.shots[-1].position == position
            assert len(window.shots) < self.cfg.shots

    @rule(dt=st.floats(0, 200))
    def close_due(self, dt: float) -> None:
        now = self.clock + dt
        open_before = {w.entity: w.opened_at for w in self.store}
        due = self.store.due(now)
        horizon = now - self.cfg.max_age_s
        assert {w.entity for w in due} == {e for e, t in open_before.items() if t <= horizon}
        for w in due:
            self._closed("due", w)

    @precondition(lambda self: len(self.store) > 0)
    @rule(data=st.data())
    def take(self, data: st.DataObject) -> None:
        entity = data.draw(st.sampled_from(sorted(w.entity for w in self.store)))
        window = self.store.take(entity)
        assert window is not None and window.entity == entity
        assert self.store.get(entity) is None
        self._closed("taken", window)

    @rule(entity=st.sampled_from(ENTITIES))
    def take_of_an_entity_without_window_returns_none(self, entity: str) -> None:
        if self.store.get(entity) is None:
            assert self.store.take(entity) is None

    @invariant()
    def nothing_lost_or_duplicated_and_order_kept(self) -> None:
        self.audit.check_partition(self.store)

    @invariant()
    def open_windows_within_bounds(self) -> None:
        assert len(self.store) <= self.cfg.max_entities
        assert sorted(w.entity for w in self.store) == sorted(self.audit.touch)
        assert all(0 < len(w.shots) < self.cfg.shots for w in self.store)
        assert self.store.open_events == sum(len(w.shots) for w in self.store)

    @invariant()
    def low_watermarks_are_the_lowest_offset_held_per_partition(self) -> None:
        expected: dict[tuple[str, int], int] = {}
        for w in self.store:
            for s in w.shots:
                tp = (s.position.topic, s.position.partition)
                expected[tp] = min(expected.get(tp, s.position.offset), s.position.offset)
        assert self.store.low_watermarks() == expected


TestWindowStoreMachine = WindowMachine.TestCase
TestWindowStoreMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    shots=st.integers(2, 3),
    max_entities=st.integers(1, 20),
    n_entities=st.integers(1, 400),
)
def test_long_streams_keep_every_shot_and_exact_watermarks(
    seed: int, shots: int, max_entities: int, n_entities: int
) -> None:
    """Thousands of windows between two age checks, so the store compacts its heaps on the way."""
    rng = random.Random(seed)
    max_age_s = 3000.0
    cfg = _window_config(shots, max_entities, max_age_s)
    store = WindowStore(cfg)
    audit = Audit()
    clock = 1_700_000_000.0
    for offset in range(6000):
        clock += rng.random() * 3
        entity = f"e{rng.randrange(n_entities)}"
        tp = rng.choice(PARTITIONS)
        position = Position(tp[0], tp[1], offset)
        audit.added[entity].append(position)
        full = store.add(entity, Shot(0, 1.0, clock, position, 0.0))
        if full is not None:
            audit.closed.append(("full", full))
        audit.closed += [("evicted", w) for w in store.drain_evicted()]
        assert len(store) <= max_entities
        if offset % 7 == 0:
            held: dict[tuple[str, int], int] = {}
            for w in store:
                for s in w.shots:
                    tp_ = (s.position.topic, s.position.partition)
                    held[tp_] = min(held.get(tp_, s.position.offset), s.position.offset)
            assert store.low_watermarks() == held
        if offset in (2999, 4999, 5999):
            audit.closed += [("due", w) for w in store.due(clock)]
            assert all(w.opened_at > clock - max_age_s for w in store), "a window past max age stayed open"
    audit.check_partition(store)


def test_a_quiet_window_keeps_its_age_and_watermark_while_thousands_of_others_come_and_go() -> None:
    store = WindowStore(_window_config(shots=2, max_entities=10, max_age_s=10_000.0))
    store.add("quiet", Shot(0, 1.0, 1000.0, Position("t", 0, 0), 0.0))
    for offset in range(1, 5001):  # 2500 windows of busy entities open and close
        store.add(f"busy{offset % 3}", Shot(0, 1.0, 1000.0 + offset, Position("t", offset % 2, offset), 0.0))
        assert store.low_watermarks()[("t", 0)] == 0
    assert store.due(10_999.0) == []
    assert [w.entity for w in store.due(11_000.0)] == ["quiet"]
    assert store.low_watermarks().get(("t", 0), 1) > 0


def test_window_closes_when_full_and_the_next_shot_opens_a_new_one() -> None:
    store = WindowStore(_window_config(shots=3, max_entities=10, max_age_s=1e9))
    shots = [Shot(i, float(i), 1e9 + i, Position("t", 0, i), 0.0) for i in range(4)]
    assert store.add("u", shots[0]) is None
    assert store.add("u", shots[1]) is None
    full = store.add("u", shots[2])
    assert full is not None and full.shots == shots[:3]
    assert store.get("u") is None and store.open_events == 0
    assert store.add("u", shots[3]) is None
    window = store.get("u")
    assert window is not None and window.shots == shots[3:] and window.opened_at == shots[3].timestamp


def test_due_closes_by_event_time_of_the_first_shot() -> None:
    store = WindowStore(_window_config(shots=8, max_entities=10, max_age_s=100.0))
    store.add("old", Shot(0, 1.0, 1000.0, Position("t", 0, 0), 0.0))
    store.add("new", Shot(0, 1.0, 1050.0, Position("t", 0, 1), 0.0))
    store.add("old", Shot(0, 1.0, 1090.0, Position("t", 0, 2), 0.0))  # a later shot does not reset the age
    assert store.due(1099.0) == []
    due = store.due(1100.0)
    assert [w.entity for w in due] == ["old"]
    assert [w.entity for w in store] == ["new"]
    assert store.low_watermarks() == {("t", 0): 1}


# ---- split -------------------------------------------------------------------------------------------


@settings(deadline=None)
@given(shots=st.integers(2, 40), data=st.data())
def test_split_puts_the_last_q_shots_scaled_to_the_window_length_in_the_query(shots: int, data: st.DataObject) -> None:
    query = data.draw(st.integers(1, shots - 1))
    min_shots = data.draw(st.integers(query + 1, shots))
    cfg = WindowConfig(shots=shots, query_shots=query, min_shots=min_shots)
    n = data.draw(st.integers(1, shots))
    window = Window("u", 1, 0.0, [Shot(i, float(i), float(i), Position("t", 0, i), 0.0) for i in range(n)])
    support, q = window.split(cfg)
    assert support + q == window.shots  # support first, query last: the gate checks on later data
    assert 1 <= len(q) <= query
    if n == shots:
        assert len(q) == query
    else:
        assert len(q) == 1 or abs(len(q) - n * query / shots) <= 0.5
    if n >= min_shots:
        assert support, "a window that is adapted has support shots"


@pytest.mark.parametrize(("n", "expected_query"), [(8, 2), (6, 2), (5, 1), (4, 1), (2, 1)])
def test_split_of_default_windows(n: int, expected_query: int) -> None:
    cfg = WindowConfig()  # K=8, Q=2
    window = Window("u", 1, 0.0, [Shot(i, float(i), float(i), Position("t", 0, i), 0.0) for i in range(n)])
    support, query = window.split(cfg)
    assert [s.counterpart for s in query] == list(range(n - expected_query, n))
    assert len(support) == n - expected_query
