"""Value bounds shared by the agent and the controller.

Types alone do not make a message safe to store: ``requests = 2**63 - 1``
is an int, yet two such windows overflow a SQL ``SUM``; a negative latency
is a float, yet it poisons every percentile it joins. These are the ranges a
legitimate agent stays in, checked when a message is parsed
(:mod:`edgefleet.protocols.messages`) and relied on by the controller's
aggregate queries.

Why these numbers:

- :data:`MAX_COUNT` is 2**53: the largest integer a float (and JSON in most
  languages) holds exactly, and small enough that 1024 of them still fit in
  a signed 64-bit SQL integer. Aggregates over more rows sum as floats.
- :data:`MAX_LATENCY_MS` is one day: a window's percentile above that is a
  bug or a lie, not a measurement.
- :data:`MAX_WINDOW_S` is one week, :data:`MAX_CPU_PERCENT` 100 % of 1024
  cores.
- :data:`MAX_DETAIL_BYTES` bounds what the controller stores of an event's
  fields it does not know (a newer agent's additions): enough for a
  diagnostic, far below the 256 KiB message limit.
- :data:`KNOWN_REJECTION_REASONS` is the closed set of reasons an agent may
  report in ``Telemetry.rejected``; any other key is folded into
  :data:`OTHER_REASON` on parsing, so a device cannot make the controller
  create a counter per invented reason. Add a reason here when the agent
  starts counting a new one.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "KNOWN_REJECTION_REASONS",
    "MAX_COUNT",
    "MAX_CPU_PERCENT",
    "MAX_DETAIL_BYTES",
    "MAX_GENERATION",
    "MAX_LATENCY_MS",
    "MAX_WINDOW_S",
    "OTHER_REASON",
    "TRUNCATED_KEY",
    "fold_reasons",
]

MAX_COUNT = 2**53
MAX_LATENCY_MS = 24 * 3600 * 1000.0
MAX_WINDOW_S = 7 * 24 * 3600.0
MAX_CPU_PERCENT = 100.0 * 1024
# Generations are stored in 32-bit SQL integers.
MAX_GENERATION = 2**31 - 1
MAX_DETAIL_BYTES = 4096
# The one key an event's unknown fields are replaced by when they exceed
# MAX_DETAIL_BYTES: {"_truncated": {"bytes": <encoded size>, "keys": <count>}}.
TRUNCATED_KEY = "_truncated"

OTHER_REASON = "other"
KNOWN_REJECTION_REASONS: frozenset[str] = frozenset(
    {
        # agent/daemon.py: desired states it could not parse or not for it
        "malformed_desired",
        "wrong_device",
        # agent/fetcher.py: block frames it could not parse
        "malformed_frame",
        OTHER_REASON,
    }
)


def fold_reasons(counts: Mapping[str, int]) -> dict[str, int]:
    """Keep known reasons, sum every other one into :data:`OTHER_REASON`.

    The sum saturates at :data:`MAX_COUNT` so folding cannot leave the range.
    """
    out: dict[str, int] = {}
    for reason, n in counts.items():
        key = reason if reason in KNOWN_REJECTION_REASONS else OTHER_REASON
        out[key] = min(out.get(key, 0) + n, MAX_COUNT)
    return out
