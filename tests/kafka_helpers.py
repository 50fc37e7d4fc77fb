"""Small helpers for tests that talk to a real broker (import as `from kafka_helpers import ...`).

Everything waits by polling a condition against a deadline, never by sleeping.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient

from stream_adapt.io.broker import resolve_tansu_binary

log = logging.getLogger(__name__)


def unique_name(prefix: str) -> str:
    """A topic or group name no other test (or earlier run against the same cluster) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def consumer_config(bootstrap: str, group: str, **kw: Any) -> dict[str, Any]:
    """Consumer settings for tests: fast group joins, read from the start, commits only by hand.

    session.timeout.ms=6000 matters on Tansu, whose first assignment takes about half the session
    timeout (23 s at the 45 s default). Pass dotted keys as `**{"max.poll.interval.ms": 10000}`.
    """
    return {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        **kw,
    }


def producer_config(bootstrap: str, **kw: Any) -> dict[str, Any]:
    """Producer settings for tests: durable and ordered (idempotent), small linger."""
    return {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5, **kw}


def produce_all(
    bootstrap: str, topic: str, records: Iterable[tuple[bytes | None, bytes]], timeout_s: float = 15.0
) -> None:
    """Produce `(key, value)` records and fail the test unless every one is acknowledged."""
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err)

    producer = Producer(producer_config(bootstrap))
    for key, value in records:
        producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
        producer.poll(0)
    left = producer.flush(timeout_s)
    assert left == 0, f"{left} records not delivered within {timeout_s}s"
    assert not errors, f"delivery failed: {errors[:3]}"


def consume_n(consumer: Consumer, n: int, timeout_s: float = 20.0) -> list[Message]:
    """Poll until `n` records arrived (fails the test at the deadline, saying how many came)."""
    got: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n:
        if time.monotonic() >= deadline:
            raise AssertionError(f"got {len(got)} of {n} records within {timeout_s}s")
        for msg in consumer.consume(num_messages=n - len(got), timeout=0.2):
            err = msg.error()
            if err is None:
                got.append(msg)
            elif err.code() != KafkaError._PARTITION_EOF:
                raise AssertionError(f"consumer error: {err}")
    return got


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, step: Callable[[], Any]) -> None:
    """Call `step` (e.g. `lambda: consumer.poll(0.1)`) until `condition()` holds; fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        step()


def delete_topics(bootstrap: str, names: list[str], timeout_s: float = 5.0) -> None:
    """Keep a shared cluster clean; a failure here must not fail a test that already passed."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for name, future in admin.delete_topics(names, request_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s + 1)
        except Exception as exc:
            log.warning("could not delete test topic %s: %s", name, exc)


class CuttableLink:
    """A TCP relay in front of a broker that can drop every connection and refuse new ones.

    Restarting Tansu would lose its topics and producer state (memory storage), so an outage is
    simulated here instead: the broker keeps running and advertises the relay's port to clients.
    """

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._open = True
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            self._open = False
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)  # close() alone would not wake a pump blocked in recv()
                conn.close()
            self._conns.clear()

    def restore(self) -> None:
        with self._lock:
            self._open = True

    def close(self) -> None:
        self.cut()
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            with self._lock:
                if not self._open:
                    client.close()
                    continue
                try:
                    upstream = socket.create_connection(self._target, timeout=2)
                except OSError:  # the broker is not listening yet: the client retries
                    client.close()
                    continue
                upstream.settimeout(None)
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()


def pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy one direction of a relayed connection until either side closes, then close both."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        src.close()
        dst.close()


@contextlib.contextmanager
def tansu_behind_relay(inner_port: int, relay_port: int, log_path: Path) -> Iterator[str]:
    """A broker of its own on `inner_port` that advertises the relay's port, so every client connection
    goes through the relay (an outage is simulated there: restarting Tansu would lose its topics).
    Yields the bootstrap address (the relay's)."""
    bootstrap = f"127.0.0.1:{relay_port}"
    cmd = [resolve_tansu_binary(), "broker", "--listener-url", f"tcp://127.0.0.1:{inner_port}"]
    cmd += ["--advertised-listener-url", f"tcp://{bootstrap}", "--storage-engine", "memory://tansu/"]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        yield bootstrap
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
