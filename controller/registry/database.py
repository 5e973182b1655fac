"""The registry's database: engine, sessions and the transaction rules every part follows.

:class:`Database` is shared by the registry's parts (catalog, devices,
deployments, events, telemetry, fleet views, counters) and by the rollout
store. It is called from several threads (the CLI, the MQTT ingest loop, the
desired-state publisher, the rollout loop), so:

* every public registry method runs in its own short transaction
  (:meth:`Database.read` or :meth:`Database.write`) and returns frozen
  dataclasses, never ORM objects that would tie a caller to a session;
* writes that read-then-write take locks up front: ``BEGIN IMMEDIATE`` on
  SQLite (a deferred transaction that later wants to write can fail with
  "database is locked" even with a busy timeout, because SQLite cannot upgrade
  a stale read snapshot), ``SELECT ... FOR UPDATE`` on PostgreSQL;
* the few writes that may race to *create* the same row (a new model name, a
  new counter) retry on a unique-constraint violation
  (:meth:`Database.write_retrying`).

SQLite runs in WAL mode with foreign keys on and a busy timeout, so readers
never block the writer and short write bursts queue instead of failing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import sqlalchemy as sa
from alembic.util.exc import CommandError
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.controller.errors import RegistryError
from edgefleet.controller.registry import migrations
from edgefleet.shared.durable import ensure_private_dir, ensure_private_file

__all__ = [
    "DEFAULT_DB_FILENAME",
    "SQLITE_BUSY_TIMEOUT_MS",
    "Database",
    "HasDatabase",
    "require_text",
    "rowcount",
    "sqlite_url",
]

DEFAULT_DB_FILENAME = "registry.db"

# Long enough to ride out a burst of ingest writes, short enough that a wedged
# writer surfaces as an error instead of a hung controller.
SQLITE_BUSY_TIMEOUT_MS = 15_000
# How often a write that lost a create-race is retried before giving up.
_CREATE_RACE_ATTEMPTS = 3
# Execution option that makes the SQLite "begin" hook take the write lock.
_IMMEDIATE = "edgefleet_sqlite_immediate"

T = TypeVar("T")


def sqlite_url(path: str | Path) -> str:
    """Return the SQLAlchemy URL of a SQLite database file at ``path``."""
    return f"sqlite:///{Path(path).expanduser().resolve()}"


def require_text(value: str, what: str, max_len: int) -> str:
    """Check a string destined for a ``VARCHAR(max_len)`` column.

    PostgreSQL rejects over-long strings while SQLite stores them, so the limit
    is enforced here to make both databases behave the same.

    Raises:
        RegistryError: ``value`` is empty, not a string, or too long.
    """
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise RegistryError(f"{what} must be 1-{max_len} characters, got {value!r}")
    return value


def rowcount(result: sa.Result[Any]) -> int:
    """Rows matched by an UPDATE run through a session.

    ``Session.execute`` is typed to return a plain ``Result``; for DML it is a
    ``CursorResult``, which is what carries ``rowcount``.
    """
    return cast("sa.CursorResult[Any]", result).rowcount


def _prepare_sqlite(url: URL) -> None:
    """Refuse in-memory databases and create a database file's parent dirs.

    An in-memory SQLite database exists per connection, so a pooled,
    multi-threaded registry would silently see different, empty databases.
    """
    database = url.database or ""
    if database in ("", ":memory:") or url.query.get("mode") == "memory":
        raise RegistryError(
            f"registry database {url.render_as_string(hide_password=True)!r} is in memory;"
            " the registry needs a file (use sqlite:///path/to/registry.db)"
        )
    if database.startswith("file:"):  # an sqlite URI; leave it to sqlite
        return
    path = Path(database).expanduser()
    try:
        if not path.parent.exists():
            ensure_private_dir(path.parent)  # a new home: owner-only (0700)
    except OSError as exc:
        raise RegistryError(
            f"cannot create the directory of registry database {database!r}: {exc}"
        ) from exc
    try:
        # The registry holds device identities, tokens' uses and events: owner
        # only (0600), whatever the umask. SQLite keeps the mode of an existing
        # file and gives its -wal and -shm files the same, so create it first.
        ensure_private_file(path)
    except OSError as exc:
        raise RegistryError(f"cannot create registry database {database!r}: {exc}") from exc


def _create_engine(url: URL) -> Engine:
    """Create the engine, with SQLite's connection pragmas and BEGIN handling."""
    if url.get_backend_name() != "sqlite":
        # pool_pre_ping: the controller runs for weeks; PostgreSQL restarts.
        return sa.create_engine(url, pool_pre_ping=True)

    _prepare_sqlite(url)
    engine = sa.create_engine(url, connect_args={"check_same_thread": False})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Stop the sqlite3 module from issuing its own BEGIN (it skips SELECTs
        # and DDL); the "begin" hook below issues the right one instead.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        finally:
            cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get(_IMMEDIATE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class Database:
    """An open, migrated registry database and its two session factories.

    Args:
        url: a SQLAlchemy database URL, e.g. ``sqlite:////var/lib/edgefleet/registry.db``
            or ``postgresql+psycopg://user@host/db``.
        migrate: run ``alembic upgrade head`` before use. Turn off only when
            something else manages the schema.

    Raises:
        RegistryError: the URL is invalid or in-memory, the database cannot be
            reached, or its schema is newer than this code.
    """

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        try:
            parsed = sa.make_url(url)
        except ArgumentError as exc:
            raise RegistryError(f"invalid registry database URL: {exc}") from exc
        self._url_text = parsed.render_as_string(hide_password=True)
        try:
            self._engine = _create_engine(parsed)
        except ArgumentError as exc:  # includes an unknown dialect or driver
            raise RegistryError(f"cannot use registry database {self._url_text}: {exc}") from exc
        except ImportError as exc:
            raise RegistryError(
                f"the driver for registry database {self._url_text} is not installed: {exc}"
            ) from exc
        # Same pool and hooks; connections from it take the SQLite write lock up front.
        self._write_engine = self._engine.execution_options(**{_IMMEDIATE: True})
        self._reader = sessionmaker(self._engine, expire_on_commit=False)
        self._writer = sessionmaker(self._write_engine, expire_on_commit=False)
        try:
            with self._write_engine.begin() as connection:
                if migrate:
                    migrations.upgrade(connection)
        except DBAPIError as exc:
            # OperationalError for an unreachable server or locked file, plain
            # DatabaseError for a file that is not a SQLite database at all.
            self._engine.dispose()
            raise RegistryError(
                f"cannot open registry database {self._url_text}: {exc.orig}"
            ) from exc
        except CommandError as exc:
            self._engine.dispose()
            raise RegistryError(
                f"cannot migrate registry database {self._url_text} (is it from a newer"
                f" edgefleet?): {exc}"
            ) from exc

    @property
    def url(self) -> str:
        """The database URL with any password masked, for logs and messages."""
        return self._url_text

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, for health checks and tests; not for queries."""
        return self._engine

    def close(self) -> None:
        """Close all pooled connections; the database must not be used afterwards."""
        self._engine.dispose()

    @contextmanager
    def read(self) -> Iterator[Session]:
        """One read transaction (a plain ``BEGIN``; never blocks the writer on SQLite)."""
        with self._reader() as session, session.begin():
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One write transaction, holding SQLite's write lock from its first statement."""
        with self._writer() as session, session.begin():
            yield session

    def write_retrying(self, work: Callable[[Session], T]) -> T:
        """Run ``work`` in a write transaction, retrying if it lost a create race.

        Two threads (or controllers) may both find a row missing and both
        insert it; the loser gets an ``IntegrityError`` and, on retry, finds
        the row. ``work`` must check for *expected* duplicates itself (and
        raise :class:`DuplicateError`), so that only races reach this loop.
        The race is only possible on PostgreSQL: on SQLite every write
        transaction holds the database's write lock from its first statement.
        """
        for attempt in range(1, _CREATE_RACE_ATTEMPTS + 1):
            try:
                with self.write() as session:
                    return work(session)
            except IntegrityError:
                if attempt == _CREATE_RACE_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover


class HasDatabase(Protocol):
    """What jobs over the whole registry need of it: its :class:`Database`.

    :class:`~edgefleet.controller.registry.store.Registry` provides it; jobs
    typed against this protocol need not import the facade that composes them.
    """

    @property
    def database(self) -> Database:
        """The shared database."""
        ...
