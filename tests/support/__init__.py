"""Real servers for tests and benchmarks: our own Mosquitto, a fresh PostgreSQL schema.

Plain Python, no pytest: ``bench/`` imports these too (it runs from the
repository), and each caller decides what a missing ``mosquitto`` binary means
(a skip in a local test run, a failure under CI, an exit in a benchmark).
"""

from tests.support.mosquitto import (
    MosquittoProcess,
    find_mosquitto,
    mosquitto_version,
    wait_for_port,
)
from tests.support.postgres import postgres_schema

__all__ = [
    "MosquittoProcess",
    "find_mosquitto",
    "mosquitto_version",
    "postgres_schema",
    "wait_for_port",
]
