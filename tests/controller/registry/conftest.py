"""The ``registry`` fixture: a migrated registry on each test database.

``database_url`` (tests/conftest.py) is a fresh SQLite file, and a throwaway
PostgreSQL schema when ``EDGEFLEET_TEST_DATABASE_URL`` is set (e.g.
``postgresql+psycopg://postgres@127.0.0.1:5432/test``), so every test here
runs on both databases.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from edgefleet.controller.registry import Registry


@pytest.fixture
def registry(database_url: str) -> Iterator[Registry]:
    reg = Registry(database_url)
    try:
        yield reg
    finally:
        reg.close()
