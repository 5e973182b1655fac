"""Per-step cost of the telemetry ingest path, old way against new way in the same run.

- decode: ``json.loads`` alone (the floor), the field readers
  (``Telemetry.from_dict(decode(p))``, the old path) and ``Telemetry.decode``
  (msgspec fast path), on the payloads ``bench/ingest.py`` publishes;
- insert (PostgreSQL): a batch of 500 rows through SQLAlchemy's executemany
  (psycopg pipelines one INSERT per row; the old path) and through
  ``COPY FROM STDIN`` (``registry.telemetry._copy_rows``), alternated.

Best and median of several rounds, in microseconds per message/row; the
ratio is what to read on a shared machine.

    python bench/ingest_steps.py [--pg-url URL] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from _common import DEFAULT_PG_URL, postgres_schema
from ingest import device_ids, stamped, telemetry_payloads


def _per_item(fn: Callable[[], None], items: int, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) / items * 1e6)
    return out


def _line(name: str, samples: list[float], base: list[float] | None = None) -> str:
    best, median = min(samples), statistics.median(samples)
    ratio = f"  ({min(base) / best:.2f}x faster than the old path)" if base else ""
    return f"{name:<34} best {best:7.2f}  median {median:7.2f} us{ratio}"


def decode_step(rounds: int) -> None:
    from edgefleet.protocols.messages import Telemetry, decode

    payloads = [stamped(rest, time.time()) for _, rest in telemetry_payloads(device_ids(2000))]

    def loads() -> None:
        for p in payloads:
            json.loads(p)

    def readers() -> None:
        for p in payloads:
            Telemetry.from_dict(decode(p))

    def fast() -> None:
        for p in payloads:
            Telemetry.decode(p)

    a, b, c = [], [], []
    for _ in range(rounds):  # interleaved, so load changes hit all three
        a += _per_item(loads, len(payloads), 1)
        b += _per_item(readers, len(payloads), 1)
        c += _per_item(fast, len(payloads), 1)
    print("decode, per telemetry message:")
    print(_line("  json.loads only (floor)", a))
    print(_line("  field readers (old)", b))
    print(_line("  Telemetry.decode (msgspec)", c, b))


def insert_step(pg_url: str, rounds: int) -> None:
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from edgefleet.controller.registry import Registry
    from edgefleet.controller.registry import models as m
    from edgefleet.controller.registry import telemetry as t

    ids = device_ids(500)
    now = m.utcnow()
    rows: list[tuple[Any, ...]] = [
        (d, now, 10.0, 100, 1, 1.2, 3.4, 5.6, "1.0.0", 48_000_000, 3.5, None, None) for d in ids
    ]
    with postgres_schema(pg_url) as url:
        registry = Registry(url)
        try:
            for d in ids:
                registry.enroll_device(d)
            table = m.TelemetryRecord.__table__
            old, new = [], []

            def executemany() -> None:
                with registry.engine.begin() as conn:
                    dicts = [dict(zip(t._COLUMNS, r, strict=True)) for r in rows]
                    conn.execute(sa.insert(table), dicts)

            def copy() -> None:
                with Session(registry.engine) as s, s.begin():
                    t._copy_rows(s, rows)

            for _ in range(rounds):
                old += _per_item(executemany, len(rows), 1)
                new += _per_item(copy, len(rows), 1)
        finally:
            registry.close()
    print("insert, PostgreSQL, batches of 500, per row:")
    print(_line("  executemany (old)", old))
    print(_line("  COPY FROM STDIN", new, old))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pg-url", default=os.environ.get("EDGEFLEET_BENCH_PG_URL", DEFAULT_PG_URL))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-pg", action="store_true")
    args = ap.parse_args()
    decode_step(args.rounds)
    if not args.no_pg:
        insert_step(args.pg_url, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
