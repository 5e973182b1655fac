from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.shared.link import BrokerSettings
from tests.e2e.harness import Harness


@pytest.fixture
def harness(tmp_path: Path, broker: BrokerSettings) -> Iterator[Harness]:
    """Controller on SQLite, on each broker."""
    h = Harness(tmp_path, broker, f"sqlite:///{tmp_path / 'registry.db'}")
    yield h
    h.close()


@pytest.fixture
def harness_db(
    tmp_path: Path, embedded_broker: BrokerSettings, database_url: str
) -> Iterator[Harness]:
    """Controller on each database (SQLite, and PostgreSQL when configured)."""
    h = Harness(tmp_path, embedded_broker, database_url)
    yield h
    h.close()
