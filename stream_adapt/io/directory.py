"""A directory sink: the offline twin of the model, adaptation-log and dead-letter topics.

    OUT/updates.jsonl          one line per accepted version: key, headers, metadata, payload (base64
                               safetensors bytes, exactly what the model topic would carry)
    OUT/adaptation_log.jsonl   one AdaptationRecord per line (accepted, rolled back, expired)
    OUT/dead_letters.jsonl     reason, detail, position (and line number for files), raw record

Lines are appended and flushed to disk on `flush()`; a reader can follow the files like topics.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from stream_adapt.events import DecodeError
from stream_adapt.learning.pipeline import BatchResult, PublishedUpdate
from stream_adapt.learning.updates import CONTENT_TYPE

UPDATES_FILE = "updates.jsonl"
LOG_FILE = "adaptation_log.jsonl"
DEAD_LETTERS_FILE = "dead_letters.jsonl"


def update_headers(update: PublishedUpdate) -> dict[str, str]:
    """Routing headers for an update (the same on the model topic)."""
    meta = update.update
    return {
        "content-type": CONTENT_TYPE,
        "stream-adapt-entity-kind": meta.entity_kind,
        "stream-adapt-version": str(meta.version),
        "stream-adapt-base-fingerprint": meta.base_fingerprint,
    }


def dead_letter_dict(dl: DecodeError) -> dict[str, Any]:
    """A dead letter as JSON: the raw record as text when it is UTF-8, else base64."""
    topic, partition, offset = dl.position
    out: dict[str, Any] = {
        "reason": dl.reason,
        "detail": dl.detail,
        "topic": topic,
        "partition": partition,
        "offset": offset,
    }
    try:
        out["raw"] = dl.raw.decode("utf-8")
    except UnicodeDecodeError:
        out["raw_b64"] = base64.b64encode(dl.raw).decode()
    return out


class DirSink:
    """Appends a run's outputs to files in one directory."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, IO[str]] = {
            name: open(directory / name, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
            for name in (UPDATES_FILE, LOG_FILE, DEAD_LETTERS_FILE)
        }

    def publish(self, result: BatchResult) -> None:
        out = self._files[UPDATES_FILE]
        for upd in result.updates:
            line = {
                "key": upd.entity,
                "headers": update_headers(upd),
                "metadata": upd.update.model_dump(mode="json"),
                "payload_b64": base64.b64encode(upd.payload).decode(),
            }
            out.write(json.dumps(line) + "\n")
        log = self._files[LOG_FILE]
        for rec in result.log:
            log.write(rec.model_dump_json() + "\n")
        dead = self._files[DEAD_LETTERS_FILE]
        for dl in result.dead_letters:
            dead.write(json.dumps(dead_letter_dict(dl)) + "\n")

    def flush(self, timeout_s: float = 10.0) -> bool:
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
        return True

    def close(self) -> None:
        for f in self._files.values():
            if not f.closed:
                f.flush()
                f.close()


def read_updates(directory: Path) -> Iterator[tuple[str, dict[str, str], bytes]]:
    """(key, headers, payload) for each update a `DirSink` wrote, in order."""
    path = directory / UPDATES_FILE
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            yield row["key"], row["headers"], base64.b64decode(row["payload_b64"])
