"""A throw-away PostgreSQL schema, so runs sharing one database never see each other."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

__all__ = ["postgres_schema"]


@contextlib.contextmanager
def postgres_schema(base: str, *, prefix: str = "t") -> Iterator[str]:
    """Create a fresh schema on ``base``; yield a URL whose ``search_path`` is it; drop it after.

    Args:
        base: a SQLAlchemy PostgreSQL URL (``postgresql+psycopg://...``).
        prefix: start of the schema name, to tell tests (``t``) from benchmarks.
    """
    import sqlalchemy as sa  # only callers that reach PostgreSQL need it

    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(base)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()
