"""The registry database: migrations match the models, SQLite setup, and clear errors."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from edgefleet.controller.errors import (
    RegistryError,
)
from edgefleet.controller.registry import Registry, sqlite_url
from edgefleet.controller.registry.migrations import HEAD
from edgefleet.controller.registry.models import Base
from tests.controller.registry.builders import (
    make_version,
)


def test_migrated_schema_matches_models(registry: Registry) -> None:
    with registry.engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        assert compare_metadata(context, Base.metadata) == []
        assert context.get_current_revision() == HEAD


def test_schema_comparison_detects_a_drifted_model(registry: Registry) -> None:
    # Guards the test above: a comparison that reports nothing proves nothing
    # unless it does report a column the migrations never created.
    drifted = sa.MetaData()
    for table in Base.metadata.sorted_tables:
        table.to_metadata(drifted)
    drifted.tables["devices"].append_column(sa.Column("nickname", sa.String(32)))
    with registry.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), drifted)
    assert [d[0] for d in diffs] == ["add_column"]


def test_reopening_keeps_data_and_migrates_idempotently(database_url: str) -> None:
    first = Registry(database_url)
    try:
        make_version(first)
    finally:
        first.close()
    second = Registry(database_url)
    try:
        assert [v.label for v in second.list_model_versions()] == ["clf@1.0"]
    finally:
        second.close()


def _pragma(reg: Registry, name: str) -> Any:
    """Read a per-connection PRAGMA the way the registry's own connections see it."""
    with reg.engine.connect() as conn:
        return conn.exec_driver_sql(f"PRAGMA {name}").scalar()


def test_sqlite_file_gets_parent_dirs_and_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "registry.db"
    reg = Registry(f"sqlite:///{path}")
    try:
        assert path.is_file()
        assert _pragma(reg, "journal_mode") == "wal"
        assert _pragma(reg, "foreign_keys") == 1
        assert _pragma(reg, "busy_timeout") >= 1000
    finally:
        reg.close()
    # WAL is a property of the file, so another client sees it too.
    plain = sqlite3.connect(path)
    try:
        assert plain.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        plain.close()


def test_sqlite_enforces_foreign_keys(tmp_path: Path) -> None:
    reg = Registry(sqlite_url(tmp_path / "fk.db"))
    try:
        with pytest.raises(sa.exc.IntegrityError), reg.engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO telemetry (device_id, at, window_s, requests, errors,"
                " rss_bytes, cpu_percent) VALUES ('ghost', '2026-01-01', 1, 1, 0, 1, 1)"
            )
    finally:
        reg.close()


def test_in_memory_sqlite_is_refused() -> None:
    with pytest.raises(RegistryError, match="in memory"):
        Registry("sqlite://")


def test_unreachable_database_names_url_without_password() -> None:
    url = "postgresql+psycopg://edge:s3cret-pw@127.0.0.1:1/registry?connect_timeout=2"
    with pytest.raises(RegistryError) as info:
        Registry(url)
    message = str(info.value)
    assert "127.0.0.1:1/registry" in message
    assert "s3cret-pw" not in message
    assert "cannot open registry database" in message


def test_file_that_is_not_a_database_is_a_registry_error(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    path.write_bytes(b"this is not a SQLite database, just some text " * 100)
    with pytest.raises(RegistryError, match="cannot open registry database"):
        Registry(sqlite_url(path))


def test_sqlite_path_under_a_file_is_a_registry_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(RegistryError):
        Registry(sqlite_url(blocker / "sub" / "registry.db"))


def test_sqlite_registry_and_new_home_are_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    """Issue 9 item 10: ``registry.db`` was 0644 in a 0755 home under the usual umask."""
    import os
    import stat

    home = tmp_path / "home"
    path = home / "registry.db"
    old = os.umask(0)  # the most permissive umask there is
    try:
        reg = Registry(sqlite_url(path))
        try:
            reg.enroll_device("gw-1")  # a write: SQLite creates -wal and -shm now
            files = [p for p in home.iterdir() if p.name.startswith("registry.db")]
            assert {p.name for p in files} >= {"registry.db", "registry.db-wal"}
            for p in files:
                assert stat.S_IMODE(p.stat().st_mode) == 0o600, p.name
        finally:
            reg.close()
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        # A database an older version left world-readable is tightened when opened.
        path.chmod(0o644)
        Registry(sqlite_url(path)).close()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old)
