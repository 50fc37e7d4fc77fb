"""Small pieces the Kafka source and sink share: librdkafka's log routing and rate-limited warnings.

librdkafka reports a refused connection every ~50 ms while a broker is down (through `error_cb` and
its own log), so nothing here may log per event: a service that cannot reach Kafka must say so
clearly, a few times a minute, and not bury everything else.
"""

from __future__ import annotations

import logging
import time

from confluent_kafka import KafkaError

#: How often "cannot reach Kafka" is repeated while the cluster stays unreachable.
UNREACHABLE_WARN_INTERVAL_S = 10.0
#: How often the same (non-fatal) client error code is logged again while it keeps recurring.
REPEAT_ERROR_INTERVAL_S = 300.0

#: Client errors that mean "the brokers cannot be reached": librdkafka retries them by itself.
UNREACHABLE_CODES = frozenset({KafkaError._ALL_BROKERS_DOWN})
#: Errors librdkafka would retry forever that no retry can fix: credentials or permissions.
HOPELESS_CODES = frozenset(
    {
        KafkaError._AUTHENTICATION,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
    }
)


class ClientLog:
    """Routes librdkafka's own log lines to Python logging, errors one level down to DEBUG.

    Every error librdkafka logs also reaches `error_cb`, where it is classified and rate-limited;
    logging it a second time (every 50 ms while a broker is down) would only drown the real signal.
    Warnings (e.g. an ignored configuration property) keep their level.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger

    def log(self, level: int, msg: str, *args: object) -> None:
        self._log.log(logging.DEBUG if level >= logging.ERROR else level, msg, *args)


class ErrorLog:
    """Logs client errors once per distinct code per `REPEAT_ERROR_INTERVAL_S`, and warns that the
    cluster is unreachable at most every `UNREACHABLE_WARN_INTERVAL_S` until it is reachable again."""

    def __init__(self, logger: logging.Logger, servers: str, what: str) -> None:
        self._log = logger
        self._servers = servers
        self._what = what
        self._last_logged: dict[int, float] = {}
        self.unreachable_since: float | None = None
        self._unreachable_reason = ""
        self._last_unreachable_warning = float("-inf")

    def error(self, err: KafkaError) -> None:
        """Note one non-fatal client error (called from `error_cb`: cheap, no I/O for repeats)."""
        code = err.code()
        now = time.monotonic()
        if code in UNREACHABLE_CODES:
            if self.unreachable_since is None:
                self.unreachable_since = now
            self._unreachable_reason = err.str()
            return
        if now - self._last_logged.get(code, float("-inf")) >= REPEAT_ERROR_INTERVAL_S:
            self._last_logged[code] = now
            self._log.warning("%s: Kafka client error %s: %s (librdkafka retries)", self._what, err.name(), err.str())

    def reachable(self) -> None:
        """The cluster answered (records, an assignment, a broker UP in the statistics)."""
        if self.unreachable_since is not None:
            self.unreachable_since = None
            self._last_unreachable_warning = float("-inf")
            self._log.info("%s: reached Kafka at %s again", self._what, self._servers)

    def warn_if_unreachable(self, detail: str = "") -> None:
        """Repeat the unreachable warning while it holds, at most every `UNREACHABLE_WARN_INTERVAL_S`."""
        if self.unreachable_since is None:
            return
        now = time.monotonic()
        if now - self._last_unreachable_warning < UNREACHABLE_WARN_INTERVAL_S:
            return
        self._last_unreachable_warning = now
        self._log.warning(
            "%s: cannot reach Kafka at %s for %.0fs; retrying (%s)%s",
            self._what,
            self._servers,
            now - self.unreachable_since,
            self._unreachable_reason,
            detail,
        )
