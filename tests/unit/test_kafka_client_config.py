"""librdkafka settings from KafkaConfig, their redaction for logs, and the service's topic specs."""

from __future__ import annotations

import pytest

from stream_adapt.config import KafkaConfig
from stream_adapt.errors import ConfigError
from stream_adapt.io.admin import TopicSpec, client_config, default_topic_specs, redacted


def test_client_config_without_credentials_has_no_sasl_settings() -> None:
    config = client_config(KafkaConfig(bootstrap_servers="k1:9092,k2:9092"))
    assert config == {"bootstrap.servers": "k1:9092,k2:9092"}


def test_client_config_with_credentials_defaults_to_sasl_ssl_plain() -> None:
    config = client_config(KafkaConfig(sasl_username="svc", sasl_password="s3cret"))
    assert config["security.protocol"] == "SASL_SSL"
    assert config["sasl.mechanism"] == "PLAIN"
    assert (config["sasl.username"], config["sasl.password"]) == ("svc", "s3cret")


def test_extra_is_merged_last_over_base_and_overrides() -> None:
    kafka = KafkaConfig(
        sasl_username="svc",
        sasl_password="s3cret",
        extra={"sasl.mechanism": "SCRAM-SHA-512", "client.id": "from-extra"},
    )
    config = client_config(kafka, **{"client.id": "from-caller", "group.id": "g"})
    assert config["sasl.mechanism"] == "SCRAM-SHA-512"
    assert config["client.id"] == "from-extra"
    assert config["group.id"] == "g"


@pytest.mark.parametrize(
    ("user", "password", "missing"),
    [("svc", None, "kafka.sasl_password"), (None, "s3cret", "kafka.sasl_username")],
)
def test_half_of_the_sasl_credentials_is_a_config_error(user: str | None, password: str | None, missing: str) -> None:
    with pytest.raises(ConfigError, match=missing):
        client_config(KafkaConfig(sasl_username=user, sasl_password=password))


def test_redacted_masks_secrets_and_keeps_the_rest() -> None:
    config = {
        "bootstrap.servers": "k:9092",
        "sasl.username": "svc",
        "sasl.password": "p",
        "ssl.key.password": "p",
        "sasl.oauthbearer.client.secret": "s",
        "Some.TOKEN": "t",
    }
    shown = redacted(config)
    assert shown == {
        "bootstrap.servers": "k:9092",
        "sasl.username": "svc",
        "sasl.password": "***",
        "ssl.key.password": "***",
        "sasl.oauthbearer.client.secret": "***",
        "Some.TOKEN": "***",
    }
    assert config["sasl.password"] == "p"  # the original is untouched


def test_default_topic_specs_compact_only_the_model_topic() -> None:
    kafka = KafkaConfig()
    specs = {s.name: s for s in default_topic_specs(kafka, partitions=6, replication=3)}
    assert set(specs) == {kafka.topic, kafka.model_topic, kafka.log_topic, kafka.dead_letter_topic}
    policies = {name: s.config["cleanup.policy"] for name, s in specs.items()}
    assert policies.pop(kafka.model_topic) == "compact"
    assert set(policies.values()) == {"delete"}
    assert all(s.partitions == 6 and s.replication == 3 for s in specs.values())
    assert all(s.config["min.insync.replicas"] == "2" for s in specs.values())


def test_single_replica_topics_do_not_ask_for_two_in_sync_replicas() -> None:
    specs = default_topic_specs(KafkaConfig(), partitions=1, replication=1)
    assert all("min.insync.replicas" not in s.config for s in specs)


@pytest.mark.parametrize(("partitions", "replication"), [(0, 1), (1, 0), (1, -2)])
def test_topic_spec_rejects_impossible_sizes(partitions: int, replication: int) -> None:
    with pytest.raises(ConfigError):
        TopicSpec("t", partitions, replication)
