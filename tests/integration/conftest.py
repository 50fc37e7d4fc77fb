"""Fixtures shared by the service's integration tests."""

from __future__ import annotations

import pytest
from service_helpers import World, make_world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """A synthetic world and a base model pretrained on its history (built once per test module)."""
    return make_world(tmp_path_factory.mktemp("world"))
