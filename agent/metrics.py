"""Serving latency/error aggregation, rejection counters and process sampling.

The agent publishes one :class:`~edgefleet.protocols.messages.Telemetry`
message per interval. Its request and error counts are per *window* (the
controller sums windows), so :meth:`ServingMetrics.take_window` hands out the
current window and starts a new one in a single locked step: no inference
is counted twice or lost between two windows. Rejection counts are
cumulative since start, as the telemetry schema says.

Latency percentiles use the nearest-rank method over the window's samples
(:func:`edgefleet.shared.latency.percentiles`, the compiler's definition too),
so every reported value is a latency that actually happened. To keep memory
bounded on a busy gateway, a window keeps at most ``max_samples`` latencies
and beyond that a uniform reservoir sample of them; counts stay exact.

**Latency per sample.** A request may carry a batch (the leading dimension
of its inputs). Its latency grows with the batch, so a local client sending
6,000-row batches raises the per-request p95 although the model did nothing
wrong. Each request is therefore also recorded as its latency divided by its
batch size, and the window reports ``samples`` (rows inferred) and
sample-weighted percentiles of that per-sample latency: the p-th percentile
is the per-sample latency that p% of the *samples* served in the window saw
or beat (nearest rank over the cumulative batch weights). A request with an
empty batch counts as a request but adds no sample. The rollout engine judges
health on these when an agent reports them.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgefleet.protocols.messages import LatencySummary
from edgefleet.shared.latency import percentiles

__all__ = [
    "ProcessSampler",
    "RejectionCounter",
    "ServingMetrics",
    "WindowStats",
    "weighted_percentiles",
]

# Telemetry.from_dict refuses more than 64 rejection reasons.
MAX_REASONS = 64
OTHER_REASON = "other"


@dataclass(frozen=True)
class WindowStats:
    """Inference counts and latency percentiles (milliseconds) of one window.

    Percentiles are None when the window saw no requests (the per-sample ones
    also when it saw no samples). ``samples`` counts the rows inferred: the sum
    of the requests' batch sizes.
    """

    requests: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    window_s: float
    samples: int = 0
    sample_p50_ms: float | None = None
    sample_p95_ms: float | None = None
    sample_p99_ms: float | None = None

    @property
    def latency(self) -> LatencySummary | None:
        """The percentiles as the telemetry message's ``latency_ms`` part."""
        if self.p50_ms is None or self.p95_ms is None or self.p99_ms is None:
            return None
        return LatencySummary(p50=self.p50_ms, p95=self.p95_ms, p99=self.p99_ms)

    @property
    def sample_latency(self) -> LatencySummary | None:
        """The per-sample percentiles as the telemetry message's ``sample_latency_ms``."""
        if self.sample_p50_ms is None or self.sample_p95_ms is None or self.sample_p99_ms is None:
            return None
        return LatencySummary(
            p50=self.sample_p50_ms, p95=self.sample_p95_ms, p99=self.sample_p99_ms
        )


def weighted_percentiles(
    observations: Sequence[tuple[float, int]], *pcts: float
) -> tuple[float, ...] | None:
    """Nearest-rank percentiles of values weighted by integer weights.

    The p-th percentile is the smallest value whose cumulative weight (values
    sorted ascending) reaches ``p/100`` of the total weight: with all weights
    1 this is exactly :func:`edgefleet.shared.latency.percentiles`.

    Returns:
        One value per percentile, or None when the total weight is 0.
    """
    ordered = sorted((v, w) for v, w in observations if w > 0)
    total = sum(w for _, w in ordered)
    if total == 0:
        return None
    out = []
    for pct in pcts:
        if not 0 < pct <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {pct}")
        need = max(1, math.ceil(pct / 100.0 * total))
        seen = 0
        for value, weight in ordered:
            seen += weight
            if seen >= need:
                out.append(value)
                break
    return tuple(out)


class ServingMetrics:
    """Thread-safe latency and outcome recorder for the inference endpoint."""

    def __init__(
        self,
        max_samples: int = 10_000,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if max_samples < 1:
            raise ValueError("max_samples must be at least 1")
        self._max = max_samples
        self._clock = clock
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        # One entry per kept request: (latency ms, per-sample latency ms, batch).
        self._samples: list[tuple[float, float, int]] = []
        self._rows = 0
        self._requests = 0
        self._errors = 0
        self._total_requests = 0
        self._total_errors = 0
        self._window_start = clock()

    def record(self, latency_s: float, ok: bool, batch: int = 1) -> None:
        """Count one inference of ``batch`` samples that took ``latency_s`` seconds.

        Args:
            latency_s: the model run's duration.
            ok: whether it succeeded.
            batch: samples in the request (leading dimension of its inputs);
                negative values are treated as 0.
        """
        ms = max(0.0, latency_s) * 1000.0
        batch = max(0, batch)
        entry = (ms, ms / batch if batch else 0.0, batch)
        with self._lock:
            self._rows += batch
            self._requests += 1
            self._total_requests += 1
            if not ok:
                self._errors += 1
                self._total_errors += 1
            if len(self._samples) < self._max:
                self._samples.append(entry)
            else:
                # Algorithm R: every latency of the window has the same
                # chance max/requests of being in the sample (weighting by
                # batch afterwards keeps the per-sample estimate unbiased).
                slot = self._rng.randrange(self._requests)
                if slot < self._max:
                    self._samples[slot] = entry

    def take_window(self) -> WindowStats:
        """Return the current window's stats and start a new window."""
        with self._lock:
            samples, requests, errors = self._samples, self._requests, self._errors
            rows = self._rows
            now = self._clock()
            window_s = max(0.0, now - self._window_start)
            self._samples, self._requests, self._errors, self._rows = [], 0, 0, 0
            self._window_start = now
        if not samples:
            return WindowStats(requests, errors, None, None, None, window_s, samples=rows)
        p50, p95, p99 = percentiles((ms for ms, _, _ in samples), 50, 95, 99)
        per_sample = weighted_percentiles([(ps, b) for _, ps, b in samples], 50, 95, 99)
        s50, s95, s99 = per_sample if per_sample is not None else (None, None, None)
        return WindowStats(
            requests=requests,
            errors=errors,
            p50_ms=p50,
            p95_ms=p95,
            p99_ms=p99,
            window_s=window_s,
            samples=rows,
            sample_p50_ms=s50,
            sample_p95_ms=s95,
            sample_p99_ms=s99,
        )

    @property
    def total_requests(self) -> int:
        """Inferences recorded since start, across all windows."""
        with self._lock:
            return self._total_requests

    @property
    def total_errors(self) -> int:
        """Failed inferences recorded since start, across all windows."""
        with self._lock:
            return self._total_errors


class RejectionCounter:
    """Cumulative counts of dropped messages by reason, thread-safe.

    At most :data:`MAX_REASONS` distinct reasons are kept (the telemetry
    schema's limit); further new reasons are counted under ``"other"``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def count(self, reason: str) -> None:
        """Add one rejection for ``reason``."""
        with self._lock:
            if reason not in self._counts and len(self._counts) >= MAX_REASONS - 1:
                reason = OTHER_REASON
            self._counts[reason] = self._counts.get(reason, 0) + 1

    def snapshot(self) -> dict[str, int]:
        """A copy of the counts since start."""
        with self._lock:
            return dict(self._counts)


class ProcessSampler:
    """Samples this process's resident memory and CPU use for telemetry."""

    def __init__(
        self,
        *,
        statm_path: Path = Path("/proc/self/statm"),
        process_time: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._statm = statm_path
        self._process_time = process_time
        self._clock = clock
        self._last_cpu = process_time()
        self._last_wall = clock()

    def rss_bytes(self) -> int:
        """Current resident set size in bytes.

        Reads ``/proc/self/statm`` (Linux, current RSS). Elsewhere falls back
        to ``getrusage``, which reports the *peak* RSS; 0 when neither works.
        """
        try:
            fields = self._statm.read_text().split()
            return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            pass
        try:
            import resource
        except ImportError:  # pragma: no cover - Windows
            return 0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # Linux reports KiB, macOS bytes.
        return int(peak) if os.uname().sysname == "Darwin" else int(peak) * 1024

    def cpu_percent(self) -> float:
        """CPU use since the previous call (or construction), in percent of one core.

        Can exceed 100 when several threads compute at once, like ``top``.
        """
        cpu, wall = self._process_time(), self._clock()
        d_cpu, d_wall = cpu - self._last_cpu, wall - self._last_wall
        self._last_cpu, self._last_wall = cpu, wall
        if d_wall <= 0:
            return 0.0
        return max(0.0, d_cpu / d_wall * 100.0)
