"""Latency percentiles: one definition for what the agent reports and the compiler measures.

A p95 the agent sends in telemetry and a p95 the compiler prints for a
variant should mean the same thing, so that an operator can hold one against
the other. Both use the **nearest-rank** method: the p-th percentile of n
samples is the smallest sample with at least p% of the samples at or below
it, i.e. the ``ceil(p/100 * n)``-th smallest (1-based, at least the first).

Nearest rank was chosen over interpolation (numpy's default ``linear``) because
every value it returns is a latency that actually happened, it needs no
numpy on a gateway, and it never invents a value between two runs of a
bimodal distribution. For large n the two agree closely; for a handful of
samples nearest rank is the more conservative (it never reports less than
the interpolated value).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["percentiles"]


def percentiles(samples: Iterable[float], *pcts: float) -> tuple[float, ...]:
    """The nearest-rank percentiles ``pcts`` of ``samples``, in the order asked.

    Args:
        samples: the observations, in any order (sorted once here).
        pcts: percentiles in (0, 100], e.g. ``50, 95, 99``.

    Returns:
        One sample per requested percentile.

    Raises:
        ValueError: ``samples`` is empty or a percentile is outside (0, 100];
            both are caller bugs, never user input.
    """
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("percentiles of no samples")
    out = []
    for pct in pcts:
        if not 0 < pct <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {pct}")
        rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
        out.append(float(ordered[rank - 1]))
    return tuple(out)
