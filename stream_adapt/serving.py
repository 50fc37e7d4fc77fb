"""What a serving process embeds: `ModelSubscriber` reads the model topic and predicts with
base model + the entity's latest accepted adapter + the latest shared (global) adapter.

A background thread reads every partition of the model topic from the beginning (assigned, no group:
each replica needs all entities) and then keeps tailing it. Each record is verified before anything is
loaded (`apply`): base fingerprint, entity kind, tensor names/shapes/dtype, finite values, and a version
newer than the one held. A rejected record is counted by reason and never replaces the last good
adapter. The topic may be uncompacted (the local broker never compacts), so versions, not record
order, decide what is newest.

Thread safety: entity adapters and the global adapter are immutable once stored; an update replaces a
whole per-entity dict (or the global dict) under a lock, and `predict` reads the adapters it needs
under the same lock, so every prediction uses one consistent snapshot while updates keep arriving.

For models whose entities are items (`entity_kind == "item"`) the adapters belong to items:
`predict(user_id, item_ids)` still takes one user and a list of items, scores each item with its own
adapter, and uses the user as the counterpart.

`ModelSubscriber.from_directory(model, path)` applies a directory sink's `updates.jsonl` instead, so
serving can be tested and demonstrated without Kafka.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from stream_adapt.config import KafkaConfig
from stream_adapt.errors import StreamAdaptError
from stream_adapt.events import GLOBAL_ENTITY
from stream_adapt.io.changelog import TopicReader, check_update
from stream_adapt.io.directory import read_updates
from stream_adapt.learning.models import AdaptableModel, Adapter, served
from stream_adapt.learning.updates import RejectedUpdate

log = logging.getLogger(__name__)

#: Record headers as the topic (list of pairs) or the directory sink (a dict) carries them.
Headers = Mapping[str, str | bytes | None] | Sequence[tuple[str, str | bytes | None]] | None

#: Rejections logged at WARNING per reason; the rest at DEBUG. After a base-model upgrade every old
#: record on the topic is foreign: one line each would bury everything else. Counts stay exact.
WARN_PER_REASON = 10


@dataclass(frozen=True)
class SubscriberStats:
    """A snapshot of what the subscriber has read and holds."""

    records: int  # records seen (applied or not)
    accepted: int  # adapter versions loaded (entities and global)
    rejected: dict[str, int]  # by reason (REJECT_REASONS)
    deleted: int  # entities forgotten by a tombstone
    entities: int  # entities with an adapter held now
    global_version: int | None
    caught_up: bool  # every partition has been read to its end once
    running: bool  # the background reader is alive


class ModelSubscriber:
    """Holds the latest accepted adapter per entity (and the shared one) from a model topic.

    >>> with ModelSubscriber(model, "localhost:9092", "stream-adapt.models") as sub:  # doctest: +SKIP
    ...     sub.wait_until_caught_up(30)
    ...     scores = sub.predict("user-17", ["item-1", "item-2"])
    """

    def __init__(
        self,
        model: AdaptableModel,
        kafka: KafkaConfig | str | None,
        topic: str,
        *,
        overrides: Mapping[str, Any] | None = None,
        metadata_timeout_s: float = 15.0,
    ):
        """`kafka` None makes an offline subscriber (fed through `apply`, e.g. by `from_directory`)."""
        self.model = model
        self.kafka = kafka
        self.topic = topic
        self.rejected: Counter[str] = Counter()
        self._overrides = dict(overrides or {})
        self._metadata_timeout_s = metadata_timeout_s
        self._base_global = {k: v.detach() for k, v in model.global_adapter().items()}
        self._device = next(iter(self._base_global.values())).device
        self._adapters: dict[str, Adapter] = {}
        self._versions: dict[str, int] = {}
        self._global: Adapter = self._base_global
        self._global_version: int | None = None
        self._records = self._accepted = self._deleted = 0
        self._changed = threading.Condition()  # guards the state above; notified on every change
        self._stop = threading.Event()
        self._caught_up = threading.Event()
        self._settled = threading.Event()  # caught up, or the reader failed
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # ---- offline ----------------------------------------------------------------------------------
    @classmethod
    def from_directory(cls, model: AdaptableModel, path: Path) -> ModelSubscriber:
        """A subscriber holding what a `DirSink` wrote to `path/updates.jsonl`, applied in order."""
        sub = cls(model, None, str(path))
        for key, headers, payload in read_updates(path):
            sub.apply(key.encode(), payload, headers)
        sub._caught_up.set()
        sub._settled.set()
        return sub

    # ---- applying records -------------------------------------------------------------------------
    def apply(
        self,
        key: bytes | None,
        payload: bytes | None,
        headers: Headers = None,
        *,
        partition: int | None = None,
        offset: int | None = None,
    ) -> bool:
        """Verify one model-topic record and load it if it is valid and newer. Returns True if loaded.

        `headers` are not trusted (the payload's own metadata is what is verified); `partition` and
        `offset` only make the log lines findable. A tombstone (`payload` None) forgets the entity: it
        then scores with its initial adapter, and its next version is accepted from any number.
        """
        entity = key.decode("utf-8", "replace") if key is not None else None
        if payload is None:
            return self._delete(entity)
        try:
            update, tensors = check_update(self.model, key, payload)
        except RejectedUpdate as rej:
            self._reject(rej, entity, partition, offset)
            return False
        tensors = {k: v.to(self._device) for k, v in tensors.items()}
        is_global = update.entity == GLOBAL_ENTITY
        with self._changed:
            held = self._global_version if is_global else self._versions.get(update.entity)
            if held is None or update.version > held:
                if is_global:
                    self._global, self._global_version = tensors, update.version
                else:
                    self._adapters[update.entity] = tensors
                    self._versions[update.entity] = update.version
                self._records += 1
                self._accepted += 1
                self._changed.notify_all()
                return True
        stale = RejectedUpdate("stale", f"version {update.version} <= held version {held}")
        self._reject(stale, entity, partition, offset)
        return False

    def _delete(self, entity: str | None) -> bool:
        with self._changed:
            self._records += 1
            if entity == GLOBAL_ENTITY:
                found = self._global_version is not None
                self._global, self._global_version = self._base_global, None
            else:
                found = self._versions.pop(entity or "", None) is not None
                self._adapters.pop(entity or "", None)
            self._deleted += found
            self._changed.notify_all()
        return found

    def _reject(self, rej: RejectedUpdate, entity: str | None, partition: int | None, offset: int | None) -> None:
        """Count the record as read and rejected (together, so stats stay consistent), then log it."""
        with self._changed:
            self._records += 1
            self.rejected[rej.reason] += 1
            n = self.rejected[rej.reason]
            self._changed.notify_all()
        level = logging.WARNING if n <= WARN_PER_REASON else logging.DEBUG
        more = f" (further {rej.reason!r} rejections are logged at DEBUG)" if n == WARN_PER_REASON else ""
        log.log(
            level,
            "model update rejected: entity=%s topic=%s partition=%s offset=%s: %s%s",
            entity,
            self.topic,
            partition,
            offset,
            rej,
            more,
        )

    # ---- reading ----------------------------------------------------------------------------------
    def version(self, entity: str) -> int | None:
        """The version held for `entity` (or for the shared adapter: `GLOBAL_ENTITY`); None if none."""
        with self._changed:
            return self._global_version if entity == GLOBAL_ENTITY else self._versions.get(entity)

    @property
    def stats(self) -> SubscriberStats:
        with self._changed:
            return SubscriberStats(
                records=self._records,
                accepted=self._accepted,
                rejected=dict(self.rejected),
                deleted=self._deleted,
                entities=len(self._adapters),
                global_version=self._global_version,
                caught_up=self._caught_up.is_set(),
                running=self._thread is not None and self._thread.is_alive(),
            )

    def predict(self, user_id: str, item_ids: Sequence[str]) -> list[float]:
        """Scores of `item_ids` for `user_id`: base model + adapter(s) + the shared adapter.

        Entities without an accepted adapter use `model.initial_adapter` (their base row, or the
        cold-start row when the base model never saw them). For item-entity models each item is
        scored with its own adapter and the user is the counterpart.
        """
        if not item_ids:
            return []
        model = self.model
        entities = [user_id] if model.entity_kind == "user" else list(item_ids)
        with self._changed:  # one consistent snapshot: stored adapters are never modified in place
            held = [self._adapters.get(e) for e in entities]
            shared = self._global
        adapter = model.initial_adapter(model.entity_index(entities))
        rows = [i for i, a in enumerate(held) if a is not None]
        if rows:
            adapter = {name: t.clone() for name, t in adapter.items()}
            for i in rows:
                row = held[i]
                assert row is not None
                for name in adapter:
                    adapter[name][i] = row[name]
        if model.entity_kind == "user":
            counterparts = model.counterpart_index(list(item_ids)).unsqueeze(0)  # [1, K]
        else:
            counterparts = model.counterpart_index([user_id]).expand(len(entities)).unsqueeze(1)  # [K, 1]
        with torch.no_grad():
            scores = served(model, model.predict(adapter, counterparts, shared))
        return [float(x) for x in scores.reshape(-1).tolist()]

    # ---- the background reader --------------------------------------------------------------------
    def start(self) -> ModelSubscriber:
        """Open the topic (raises `StreamAdaptError` if it is missing or unreachable) and start reading
        it from the beginning in a background thread, then keep tailing it."""
        if self.kafka is None:
            raise StreamAdaptError("this subscriber is offline (no Kafka configured); feed it with apply()")
        if self._thread is not None:
            raise StreamAdaptError("subscriber already started")
        reader = TopicReader(
            self.kafka, self.topic, None, timeout_s=self._metadata_timeout_s, overrides=self._overrides
        )
        self._thread = threading.Thread(target=self._run, args=(reader,), name=f"model-subscriber-{self.topic}")
        self._thread.daemon = True
        self._thread.start()
        return self

    def _run(self, reader: TopicReader) -> None:
        started = time.monotonic()
        try:
            while not self._stop.is_set():
                for msg in reader.poll(0.2):
                    self.apply(msg.key(), msg.value(), msg.headers(), partition=msg.partition(), offset=msg.offset())
                if reader.at_end and not self._caught_up.is_set():
                    self._caught_up.set()
                    self._settled.set()
                    s = self.stats
                    log.info(
                        "caught up with %s in %.2fs: %d records, %d entities, global version %s, rejected %s",
                        self.topic,
                        time.monotonic() - started,
                        s.records,
                        s.entities,
                        s.global_version,
                        s.rejected,
                    )
        except BaseException as exc:
            self.error = exc
            log.exception("model subscriber for %s stopped", self.topic)
        finally:
            reader.close()
            self._settled.set()
            with self._changed:
                self._changed.notify_all()

    def wait_until_caught_up(self, timeout_s: float) -> bool:
        """True once every partition has been read to its end (as it was when reached); False on
        timeout. Raises the reader's error if it stopped on one (e.g. the topic was deleted)."""
        self._settled.wait(timeout_s)
        if self.error is not None:
            raise StreamAdaptError(f"model subscriber for {self.topic!r} failed: {self.error}") from self.error
        return self._caught_up.is_set()

    def wait_for(self, condition: Callable[[ModelSubscriber], bool], timeout_s: float) -> bool:
        """Block until `condition(self)` holds (re-checked on every change); False on timeout.
        For example `sub.wait_for(lambda s: (s.version("u1") or 0) >= 3, 10)`."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not condition(self):
                left = deadline - time.monotonic()
                if left <= 0 or self.error is not None:
                    return False
                self._changed.wait(left)
        return True

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the reader and wait for it (at most `timeout_s`); what is held stays usable."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def __enter__(self) -> ModelSubscriber:
        return self.start() if self._thread is None and self.kafka is not None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
