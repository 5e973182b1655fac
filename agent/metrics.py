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

**Prometheus.** The same recorder also keeps *cumulative* counts for the
agent's ``GET /metrics`` (:class:`PrometheusExporter`): latency histograms
per request and per sample (the per-sample one weighted by batch size, like
the telemetry percentiles, so a 6,000-row batch adds 6,000 observations in
one step), inference requests, and inference errors by a reason from the
fixed :data:`INFERENCE_ERROR_REASONS`. Telemetry windows and Prometheus
counters are independent: taking a window resets nothing Prometheus sees.
Every label value is bounded - a fixed enum, an error code from the error
tree (capped), a rejection reason (capped at :data:`MAX_REASONS`), or the
single active model - so an agent exposes a fixed number of series.

=================================================  =======  ==================================
metric                                             type     labels
=================================================  =======  ==================================
edgefleet_agent_info                               gauge    version, device_id
edgefleet_agent_model_info                         gauge    model, version, release, variant,
                                                            precision, runtime (active model)
edgefleet_agent_model_loaded                       gauge
edgefleet_agent_inference_requests_total           counter
edgefleet_agent_inference_errors_total             counter  reason
edgefleet_agent_inference_duration_seconds         histo    (per request, model run only)
edgefleet_agent_inference_sample_duration_seconds  histo    (per sample, batch-weighted)
edgefleet_agent_installs_total                     counter
edgefleet_agent_install_failures_total             counter  outcome (failed|refused), code
edgefleet_agent_rejected_messages_total            counter  reason
edgefleet_agent_resident_memory_bytes              gauge
edgefleet_agent_cpu_seconds_total                  counter
edgefleet_agent_uptime_seconds                     gauge
=================================================  =======  ==================================
"""

from __future__ import annotations

import bisect
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from edgefleet.protocols.messages import LatencySummary
from edgefleet.shared.latency import percentiles

__all__ = [
    "INFERENCE_ERROR_REASONS",
    "LATENCY_BUCKETS_S",
    "ActiveModelInfo",
    "HistogramSnapshot",
    "InstallCounter",
    "ProcessSampler",
    "PrometheusExporter",
    "RejectionCounter",
    "ServingMetrics",
    "ServingTotals",
    "WindowStats",
    "weighted_percentiles",
]

# Telemetry.from_dict refuses more than 64 rejection reasons.
MAX_REASONS = 64
OTHER_REASON = "other"

# Histogram upper bounds in seconds: 0.05 ms (a tiny MLP on a fast core) to 2 s
# (a big model on a slow gateway); slower runs land in +Inf.
LATENCY_BUCKETS_S = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
)

# Why an inference request got no answer from the model: the endpoint's error
# codes for refused requests, plus ``inference_failed`` (the runtime raised)
# and ``timeout`` (the client stopped sending its body). Anything else is
# counted as ``other``, so the label can never take an unbounded value.
INFERENCE_ERROR_REASONS = (
    "bad_json",
    "bad_request",
    "bad_input",
    "unauthorized",
    "length_required",
    "too_large",
    "no_model",
    "unknown_model",
    "inference_failed",
    "timeout",
    OTHER_REASON,
)
# Distinct install-failure codes kept (codes come from the error tree, so this
# is a safety net, not a limit anyone should reach).
MAX_INSTALL_CODES = 32


@dataclass(frozen=True)
class HistogramSnapshot:
    """Cumulative bucket counts (one per :data:`LATENCY_BUCKETS_S` bound, then +Inf) and sum."""

    buckets: tuple[int, ...]
    sum_s: float

    @property
    def count(self) -> int:
        """Observations in total (the +Inf bucket)."""
        return self.buckets[-1]


class _Histogram:
    """Weighted bucket counts; the owner holds the lock."""

    def __init__(self) -> None:
        self._counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self._sum = 0.0

    def add(self, seconds: float, weight: int) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (le).
        self._counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += weight
        self._sum += seconds * weight

    def snapshot(self) -> HistogramSnapshot:
        cumulative, running = [], 0
        for n in self._counts:
            running += n
            cumulative.append(running)
        return HistogramSnapshot(tuple(cumulative), self._sum)


@dataclass(frozen=True)
class ServingTotals:
    """What the endpoint served since start, for Prometheus.

    ``requests`` counts every inference request, answered or not; ``errors``
    has one entry per :data:`INFERENCE_ERROR_REASONS` value (zeros included,
    so a rate over it exists before the first error).
    """

    requests: int
    errors: Mapping[str, int]
    per_request: HistogramSnapshot
    per_sample: HistogramSnapshot


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
        # Cumulative, for Prometheus (never reset by take_window).
        self._per_request = _Histogram()
        self._per_sample = _Histogram()
        self._refused = 0
        self._error_reasons = dict.fromkeys(INFERENCE_ERROR_REASONS, 0)

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
        seconds = ms / 1000.0
        with self._lock:
            self._rows += batch
            self._requests += 1
            self._total_requests += 1
            self._per_request.add(seconds, 1)
            if batch:
                self._per_sample.add(seconds / batch, batch)
            if not ok:
                self._errors += 1
                self._total_errors += 1
                self._error_reasons["inference_failed"] += 1
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

    def refuse(self, reason: str) -> None:
        """Count an inference request refused before it reached the model.

        Such requests are no inferences for telemetry (no window count, no
        latency) but are errors for Prometheus, under ``reason`` if it is one
        of :data:`INFERENCE_ERROR_REASONS` and ``other`` if not.
        """
        if reason not in self._error_reasons:
            reason = OTHER_REASON
        with self._lock:
            self._refused += 1
            self._error_reasons[reason] += 1

    def totals(self) -> ServingTotals:
        """Cumulative counts and histograms since start (a consistent snapshot)."""
        with self._lock:
            return ServingTotals(
                requests=self._total_requests + self._refused,
                errors=dict(self._error_reasons),
                per_request=self._per_request.snapshot(),
                per_sample=self._per_sample.snapshot(),
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


class InstallCounter:
    """Installs since start, and failed ones by outcome and error code, thread-safe.

    ``refused`` failures are the ones the agent refused on trust grounds (a
    :class:`~edgefleet.protocols.errors.VerificationError`: bad signature,
    rollback, wrong hardware...), ``failed`` the rest. Codes come from the
    error tree; more than :data:`MAX_INSTALL_CODES` distinct ones are counted
    as ``other``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._installed = 0
        self._failures: dict[tuple[str, str], int] = {}

    def installed(self) -> None:
        """Count one model installed and serving."""
        with self._lock:
            self._installed += 1

    def failed(self, code: str, *, refused: bool) -> None:
        """Count one install that did not happen, with the error's ``code``."""
        outcome = "refused" if refused else "failed"
        with self._lock:
            codes = {c for _, c in self._failures}
            if code not in codes and len(codes) >= MAX_INSTALL_CODES - 1:
                code = OTHER_REASON
            key = (outcome, code)
            self._failures[key] = self._failures.get(key, 0) + 1

    def snapshot(self) -> tuple[int, dict[tuple[str, str], int]]:
        """``(installs, {(outcome, code): failures})`` since start."""
        with self._lock:
            return self._installed, dict(self._failures)


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


@dataclass(frozen=True)
class ActiveModelInfo:
    """The model being served, as ``edgefleet_agent_model_info`` labels.

    ``variant`` is the hardware class (profile) the bundle was built for;
    fields the server cannot know (a bare :class:`InferenceServer` has no
    bundle manifest) are empty strings.
    """

    model: str
    version: str
    release: int
    variant: str = ""
    precision: str = ""
    runtime: str = ""


class PrometheusExporter:
    """The agent's metrics in the Prometheus text format, read at scrape time.

    A private :class:`~prometheus_client.CollectorRegistry` (never the global
    one: two agents in one process, as tests and the fleet benches run them,
    must not share or collide). Every value is read from the recorders when
    Prometheus scrapes, so nothing is counted twice.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self,
        serving: ServingMetrics,
        *,
        model: Callable[[], ActiveModelInfo | None],
        rejections: RejectionCounter | None = None,
        installs: InstallCounter | None = None,
        labels: Mapping[str, str] | None = None,
        sampler: ProcessSampler | None = None,
        clock: Callable[[], float] = time.monotonic,
        process_time: Callable[[], float] = time.process_time,
    ) -> None:
        """Set up the exporter.

        Args:
            model: the active model's labels, or None when nothing is served.
            labels: ``edgefleet_agent_info`` labels (version, device_id): one
                series per agent.
        """
        self._serving = serving
        self._model = model
        self._rejections = rejections
        self._installs = installs
        self._labels = dict(labels or {})
        self._sampler = sampler or ProcessSampler()
        self._clock = clock
        self._process_time = process_time
        self._started = clock()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_AgentCollector(self))

    def active_model(self) -> ActiveModelInfo | None:
        """The served model as the exporter describes it (runtime, variant...)."""
        return self._model()

    def render(self) -> bytes:
        """The current metrics as a ``/metrics`` response body."""
        return bytes(generate_latest(self.registry))

    def families(self) -> Iterator[Metric]:
        """The metric families, built from the recorders' current values."""
        info = GaugeMetricFamily(
            "edgefleet_agent_info", "The agent's version.", labels=sorted(self._labels)
        )
        info.add_metric([self._labels[k] for k in sorted(self._labels)], 1)
        yield info

        active = self._model()
        model_info = GaugeMetricFamily(
            "edgefleet_agent_model_info",
            "The model being served (absent when none is).",
            labels=["model", "version", "release", "variant", "precision", "runtime"],
        )
        if active is not None:
            model_info.add_metric(
                [
                    active.model,
                    active.version,
                    str(active.release),
                    active.variant,
                    active.precision,
                    active.runtime,
                ],
                1,
            )
        yield model_info
        yield GaugeMetricFamily(
            "edgefleet_agent_model_loaded",
            "1 while a model is served, 0 before the first one is loaded.",
            value=0 if active is None else 1,
        )

        totals = self._serving.totals()
        yield CounterMetricFamily(
            "edgefleet_agent_inference_requests",
            "Inference requests received, whatever their outcome.",
            value=totals.requests,
        )
        errors = CounterMetricFamily(
            "edgefleet_agent_inference_errors",
            "Inference requests that got no result, by reason (a fixed set).",
            labels=["reason"],
        )
        for reason in INFERENCE_ERROR_REASONS:
            errors.add_metric([reason], totals.errors.get(reason, 0))
        yield errors
        yield _histogram(
            "edgefleet_agent_inference_duration_seconds",
            "Model run time per inference request (without HTTP and decoding).",
            totals.per_request,
        )
        yield _histogram(
            "edgefleet_agent_inference_sample_duration_seconds",
            "Model run time per sample: each request adds its batch size of observations "
            "of its latency divided by its batch size.",
            totals.per_sample,
        )

        if self._installs is not None:
            installed, failures = self._installs.snapshot()
            yield CounterMetricFamily(
                "edgefleet_agent_installs",
                "Models installed and switched to since start.",
                value=installed,
            )
            failed = CounterMetricFamily(
                "edgefleet_agent_install_failures",
                "Installs that did not happen, by outcome (refused on trust grounds, or "
                "failed) and error code.",
                labels=["outcome", "code"],
            )
            for (outcome, code), n in sorted(failures.items()):
                failed.add_metric([outcome, code], n)
            yield failed
        if self._rejections is not None:
            rejected = CounterMetricFamily(
                "edgefleet_agent_rejected_messages",
                "Messages from the broker the agent dropped, by reason.",
                labels=["reason"],
            )
            for reason, n in sorted(self._rejections.snapshot().items()):
                rejected.add_metric([reason], n)
            yield rejected

        yield GaugeMetricFamily(
            "edgefleet_agent_resident_memory_bytes",
            "The agent process's resident set size.",
            value=self._sampler.rss_bytes(),
        )
        yield CounterMetricFamily(
            "edgefleet_agent_cpu_seconds",
            "CPU time (user and system, all threads) the agent process used since start.",
            value=self._process_time(),
        )
        yield GaugeMetricFamily(
            "edgefleet_agent_uptime_seconds",
            "Seconds since the agent's metrics started (process start, near enough).",
            value=max(0.0, self._clock() - self._started),
        )


def _histogram(name: str, documentation: str, snap: HistogramSnapshot) -> HistogramMetricFamily:
    bounds = [*(repr(float(b)) for b in LATENCY_BUCKETS_S), "+Inf"]
    return HistogramMetricFamily(
        name,
        documentation,
        buckets=list(zip(bounds, snap.buckets, strict=True)),
        sum_value=snap.sum_s,
    )


class _AgentCollector(Collector):
    """Adapts :meth:`PrometheusExporter.families` to prometheus_client's registry."""

    def __init__(self, exporter: PrometheusExporter) -> None:
        self._exporter = exporter

    def collect(self) -> Iterator[Metric]:
        return self._exporter.families()
