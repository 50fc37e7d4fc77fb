"""Kafka client settings and topic administration.

`client_config` is the one place where `KafkaConfig` becomes librdkafka settings, so every producer,
consumer and admin client connects (and authenticates) the same way. `default_topic_specs` says what
the service's topics look like; `ensure_topics` creates the missing ones at start and fails with a
message that names the brokers instead of hanging when they cannot be reached.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from stream_adapt.config import KafkaConfig
from stream_adapt.errors import ConfigError, StreamAdaptError

log = logging.getLogger(__name__)

#: A librdkafka configuration: dotted keys; values are strings, numbers, booleans or callbacks.
ClientConfig = dict[str, Any]

_SENSITIVE_WORDS = ("password", "secret", "key", "token", "jaas", "credential")
_MASK = "***"

_DAY_MS = 24 * 3600 * 1000

#: Largest model-topic record: adapter tensors as safetensors plus their JSON metadata (the lineage
#: lists every source position, up to a few thousand). Publishers must set the producer's
#: `message.max.bytes` to at least this and check sizes themselves (not every broker enforces it).
MODEL_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Dead letters carry the whole rejected record plus headers, so they need headroom over the
#: feedback topic's limit (Kafka's default is 1 MiB).
DEAD_LETTER_MAX_MESSAGE_BYTES = 2 * 1024 * 1024

TopicStatus = Literal["created", "exists"]


def client_config(kafka: KafkaConfig, **overrides: Any) -> ClientConfig:
    """librdkafka settings for `kafka`: base settings, then `overrides`, then `kafka.extra`.

    - `bootstrap.servers` from `kafka.bootstrap_servers`.
    - SASL credentials only when `sasl_username` is set (a password without a username, or the
      reverse, is a `ConfigError`). With credentials the defaults are `security.protocol=SASL_SSL`
      and `sasl.mechanism=PLAIN` (what managed Kafka services expect); set either in `extra`
      (e.g. `SCRAM-SHA-512`, `SASL_PLAINTEXT`) to change it.
    - `overrides` are the caller's own keys (`group.id`, `client.id`, `stats_cb`...). Dotted keys
      need the dict form: `client_config(kafka, **{"group.id": "g"})`.
    - `kafka.extra` is merged last: the operator has the final word. A caller that needs a key to
      hold for correctness (e.g. `enable.auto.commit=false`) sets it on the returned dict.
    """
    config: ClientConfig = {"bootstrap.servers": kafka.bootstrap_servers}
    has_user = bool(kafka.sasl_username)
    has_password = kafka.sasl_password is not None and bool(kafka.sasl_password.get_secret_value())
    if has_user != has_password:
        missing = "kafka.sasl_password" if has_user else "kafka.sasl_username"
        raise ConfigError(f"{missing}: SASL needs both a username and a password")
    if has_user and kafka.sasl_password is not None:
        config.update(
            {
                "security.protocol": "SASL_SSL",
                "sasl.mechanism": "PLAIN",
                "sasl.username": kafka.sasl_username,
                "sasl.password": kafka.sasl_password.get_secret_value(),
            }
        )
    config.update(overrides)
    config.update(kafka.extra)
    return config


def redacted(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy safe to log: values of keys naming a password, secret, key or token are masked."""
    return {
        key: _MASK if any(word in key.lower() for word in _SENSITIVE_WORDS) else value for key, value in config.items()
    }


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """What a topic should look like when `ensure_topics` has to create it."""

    name: str
    partitions: int
    replication: int = 1
    config: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("topic name must not be empty")
        if self.partitions < 1:
            raise ConfigError(f"topic {self.name!r}: partitions must be >= 1, got {self.partitions}")
        if self.replication < 1 and self.replication != -1:
            raise ConfigError(
                f"topic {self.name!r}: replication must be >= 1 (or -1: broker default), got {self.replication}"
            )


def default_topic_specs(kafka: KafkaConfig, partitions: int, replication: int) -> list[TopicSpec]:
    """The service's four topics.

    - feedback (`kafka.topic`): plain delete policy, 7 days, so a restart or replay can re-read.
    - model (`kafka.model_topic`): compacted, keyed by entity, so the topic holds each entity's
      latest adapter forever and a new serving replica can rebuild its state from the start. A
      minute of `min.compaction.lag.ms` lets readers that lag slightly still see every version;
      hourly segments let compaction actually run (the active segment is never compacted).
    - adaptation log (`kafka.log_topic`) and dead letters (`kafka.dead_letter_topic`): audit trails
      kept 30 days.

    With 3 or more replicas, `min.insync.replicas=2` so an acknowledged write survives one broker.
    """
    durability = {"min.insync.replicas": "2"} if replication >= 3 else {}
    thirty_days = str(30 * _DAY_MS)
    return [
        TopicSpec(
            kafka.topic,
            partitions,
            replication,
            {"cleanup.policy": "delete", "retention.ms": str(7 * _DAY_MS), **durability},
        ),
        TopicSpec(
            kafka.model_topic,
            partitions,
            replication,
            {
                "cleanup.policy": "compact",
                "min.compaction.lag.ms": str(60_000),
                "segment.ms": str(3600 * 1000),
                "delete.retention.ms": str(_DAY_MS),
                "max.message.bytes": str(MODEL_MAX_MESSAGE_BYTES),
                **durability,
            },
        ),
        TopicSpec(
            kafka.log_topic,
            partitions,
            replication,
            {"cleanup.policy": "delete", "retention.ms": thirty_days, **durability},
        ),
        TopicSpec(
            kafka.dead_letter_topic,
            partitions,
            replication,
            {
                "cleanup.policy": "delete",
                "retention.ms": thirty_days,
                "max.message.bytes": str(DEAD_LETTER_MAX_MESSAGE_BYTES),
                **durability,
            },
        ),
    ]


def ensure_topics(
    bootstrap_or_config: str | Mapping[str, Any] | KafkaConfig,
    specs: Sequence[TopicSpec],
    timeout_s: float = 15.0,
) -> dict[str, TopicStatus]:
    """Create the topics of `specs` that do not exist yet; returns `{name: "created" | "exists"}`.

    `bootstrap_or_config` is a `bootstrap.servers` string, a librdkafka config, or a `KafkaConfig`.
    Existing topics are left as they are (their partitions and configs are not changed; a
    partition count that differs from the spec is logged). A topic created concurrently by someone
    else counts as "exists". Everything finishes within about `timeout_s`; an unreachable cluster,
    a refused creation or a timeout raises `StreamAdaptError` naming the bootstrap servers.
    Returns only once the created topics show up in metadata, so callers can use them at once.
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    config = _admin_config(bootstrap_or_config)
    servers = str(config.get("bootstrap.servers", "?"))
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"duplicate topic names in {names}")
    deadline = time.monotonic() + timeout_s
    errors: list[str] = []

    user_error_cb = config.get("error_cb")

    def remember(err: KafkaError) -> None:
        errors.append(err.str())
        if callable(user_error_cb):
            user_error_cb(err)

    # Callbacks travel as keyword arguments (confluent-kafka merges them into the config).
    plain = {k: v for k, v in config.items() if isinstance(v, str | int | float | bool)}
    objects = {k: v for k, v in config.items() if k not in plain}
    objects["error_cb"] = remember
    objects.setdefault("logger", _QuietClientLog())
    admin = AdminClient(plain, **objects)

    def fail(what: str, cause: object) -> StreamAdaptError:
        seen = f" (last client error: {errors[-1]})" if errors else ""
        return StreamAdaptError(f"Kafka at {servers}: {what}: {cause}{seen}")

    def remaining() -> float:
        return max(0.0, deadline - time.monotonic())

    try:
        metadata = admin.list_topics(timeout=max(0.1, remaining()))
    except KafkaException as exc:
        admin.poll(0)  # serve error_cb so the message can say why (e.g. connection refused)
        raise fail(f"not reachable within {timeout_s:g}s", exc.args[0].str()) from None

    result: dict[str, TopicStatus] = {}
    to_create: list[TopicSpec] = []
    for spec in specs:
        existing = metadata.topics.get(spec.name)
        if existing is None or existing.error is not None:
            to_create.append(spec)
            continue
        result[spec.name] = "exists"
        if len(existing.partitions) != spec.partitions:
            log.warning(
                "topic %s exists with %d partitions (spec: %d); left unchanged",
                spec.name,
                len(existing.partitions),
                spec.partitions,
            )

    if to_create:
        wait = max(0.1, remaining())
        futures = admin.create_topics(
            [NewTopic(s.name, s.partitions, s.replication, config=dict(s.config)) for s in to_create],
            operation_timeout=wait,
            request_timeout=wait,
        )
        for name, future in futures.items():
            try:
                future.result(timeout=remaining() + 1.0)
            except concurrent.futures.TimeoutError:
                raise fail(f"creating topic {name!r}", f"no answer within {timeout_s:g}s") from None
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                if err.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise fail(f"cannot create topic {name!r}", err.str()) from None
                result[name] = "exists"
            else:
                result[name] = "created"
                log.info("created topic %s", name)
        _wait_visible(admin, [n for n, s in result.items() if s == "created"], deadline, fail)

    return {name: result[name] for name in names}


class _QuietClientLog:
    """librdkafka's log lines at DEBUG: it logs every failed reconnect as an error, while
    `ensure_topics` reports the outcome (with the last client error) itself."""

    def log(self, level: int, msg: str, *args: object) -> None:
        log.debug(msg, *args)


def _admin_config(bootstrap_or_config: str | Mapping[str, Any] | KafkaConfig) -> ClientConfig:
    if isinstance(bootstrap_or_config, KafkaConfig):
        return client_config(bootstrap_or_config)
    if isinstance(bootstrap_or_config, str):
        return {"bootstrap.servers": bootstrap_or_config}
    # Consumer/producer-only keys in a shared config would make librdkafka warn; harmless.
    return dict(bootstrap_or_config)


def _wait_visible(
    admin: Any, names: list[str], deadline: float, fail: Callable[[str, object], StreamAdaptError]
) -> None:
    """Poll metadata until every created topic has its partitions (creation can lag on Kafka)."""
    from confluent_kafka import KafkaException

    pending = set(names)
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise fail("created topics not visible in metadata in time", sorted(pending))
        try:
            metadata = admin.list_topics(timeout=max(0.1, min(1.0, left)))
        except KafkaException:
            continue
        pending = {
            n for n in pending if (t := metadata.topics.get(n)) is None or t.error is not None or not t.partitions
        }
        if pending:
            admin.poll(0.05)  # a short pause between metadata requests (also serves callbacks)
