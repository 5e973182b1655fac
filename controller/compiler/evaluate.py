"""Measuring candidates: accuracy against the fp32 source, and interleaved latency.

Accuracy rule (the gate)
------------------------
Every candidate runs on the same validation samples as the fp32 source and
each model output gets a score in ``[0, 1]``:

* ``top1`` for classifier-like outputs (2-D, last dimension > 1): the
  fraction of rows whose arg-max equals the source's.
* ``exact`` for integer or boolean outputs (labels, indices): the fraction of
  samples whose output is identical.
* ``threshold:T`` for a single probability per sample (float, last
  dimension 1, every reference value in ``[0, 1]``; ``T`` = 0.5 unless
  overridden): the fraction of values on the same side of ``T`` as the
  source's, i.e. decision agreement. Cosine similarity of one positive
  number is always 1, so it cannot see a variant that flips decisions.
* ``cosine`` otherwise: the cosine similarity of the flattened output and the
  source's, per sample, averaged over samples. A sample with NaN or infinity
  in the candidate's output scores 0; two all-zero outputs score 1. The
  relative L2 error ``||y - y_fp32|| / ||y_fp32||`` over all samples is
  reported alongside for information but does not gate.

A candidate passes when **every** output's score is at least
``1 - tolerance`` (default tolerance 0.01: top-1 agreement >= 99 %, or mean
cosine >= 0.99). The candidate's score is its worst output's score.

Latency rule
------------
All sessions use one intra-op thread. After a warm-up, the timed runs go
round-robin over fp32 and every candidate, rotating the order each round, so
a burst of load from another process on a shared machine hits all models
alike. p50 and p95 are per-model percentiles of the same rounds, by nearest
rank (:mod:`edgefleet.shared.latency`), the definition the agent reports.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.controller.compiler.data import Feed, SampleSet
from edgefleet.shared.latency import percentiles

__all__ = [
    "METRICS",
    "Accuracy",
    "LatencyStats",
    "OutputScore",
    "choose_metric",
    "compare_outputs",
    "measure_latency",
    "parse_metric",
    "run_samples",
]

METRICS = ("top1", "cosine", "exact", "threshold")
# The decision threshold of a probability output when none is given.
DEFAULT_THRESHOLD = 0.5
Outputs = list[list[npt.NDArray[Any]]]
_EPS = 1e-12


@dataclass(frozen=True)
class OutputScore:
    """The score of one model output.

    Attributes:
        name: output name.
        metric: ``top1``, ``cosine``, ``exact`` or ``threshold:T``.
        score: agreement fraction (top1, exact, threshold) or mean cosine similarity.
        worst: the lowest per-sample score (equals ``score`` for top1).
        rel_error: relative L2 error over all samples (float outputs only).
    """

    name: str
    metric: str
    score: float
    worst: float
    rel_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "metric": self.metric,
            "score": self.score,
            "worst": self.worst,
            "rel_error": self.rel_error,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OutputScore:
        rel = d.get("rel_error")
        return cls(
            name=str(d["name"]),
            metric=str(d["metric"]),
            score=float(d["score"]),
            worst=float(d["worst"]),
            rel_error=None if rel is None else float(rel),
        )


@dataclass(frozen=True)
class Accuracy:
    """Scores of all outputs of one candidate, and the threshold they were held to."""

    outputs: tuple[OutputScore, ...]
    threshold: float
    samples: int

    @property
    def score(self) -> float:
        """The worst output's score: what the gate compares with ``threshold``."""
        return min(o.score for o in self.outputs) if self.outputs else 0.0

    @property
    def passed(self) -> bool:
        # The slack absorbs float rounding of 1 - tolerance (0.99 is not exact).
        return self.score >= self.threshold - 1e-9

    @property
    def summary(self) -> str:
        worst = min(self.outputs, key=lambda o: o.score)
        if worst.metric == "cosine":
            return f"cos {worst.score:.5f}"
        kind, threshold = parse_metric(worst.metric)
        label = f"decisions@{threshold:g}" if kind == "threshold" else kind
        return f"{label} {worst.score * 100:.2f}%"

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "passed": self.passed,
            "threshold": self.threshold,
            "samples": self.samples,
            "outputs": [o.to_dict() for o in self.outputs],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Accuracy:
        return cls(
            outputs=tuple(OutputScore.from_dict(o) for o in d["outputs"]),
            threshold=float(d["threshold"]),
            samples=int(d["samples"]),
        )


def run_samples(session: Any, samples: SampleSet, output_names: Sequence[str]) -> Outputs:
    """Run every sample through ``session``; per sample, the outputs in ``output_names`` order."""
    names = list(output_names)
    return [list(session.run(names, feed)) for feed in samples.feeds()]


def parse_metric(metric: str) -> tuple[str, float | None]:
    """Split a metric name into its kind and parameter: ``threshold:0.3`` -> (``threshold``, 0.3).

    ``threshold`` alone means :data:`DEFAULT_THRESHOLD`; the other metrics take
    no parameter.

    Raises:
        ValueError: an unknown metric, or a parameter that is not a finite number.
    """
    kind, sep, arg = metric.partition(":")
    if kind not in METRICS or (sep and kind != "threshold"):
        raise ValueError(f"{metric!r} must be one of {', '.join(METRICS)} or threshold:T")
    if kind != "threshold":
        return kind, None
    if not sep:
        return kind, DEFAULT_THRESHOLD
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"metric {metric!r}: the threshold must be a number") from None
    if not np.isfinite(value):
        raise ValueError(f"metric {metric!r}: the threshold must be finite")
    return kind, value


def _is_probability(samples: Sequence[npt.NDArray[Any]]) -> bool:
    """One float value in [0, 1] per row, on every sample: a sigmoid-style probability."""
    first = samples[0]
    if first.dtype.kind != "f" or first.ndim == 0 or first.shape[-1] != 1:
        return False
    return all(a.size and float(np.min(a)) >= 0.0 and float(np.max(a)) <= 1.0 for a in samples)


def choose_metric(
    reference: npt.NDArray[Any], samples: Sequence[npt.NDArray[Any]] | None = None
) -> str:
    """The metric for an output, from the source's output on the first sample.

    ``samples`` (the source's output on every validation sample) lets a
    probability output be recognised by its values: one number per row,
    always in ``[0, 1]``, is judged by decision agreement at 0.5.
    """
    if reference.dtype.kind in "biu":
        return "exact"
    if reference.ndim == 2 and reference.shape[-1] > 1:
        return "top1"
    if samples is not None and _is_probability(samples):
        return f"threshold:{DEFAULT_THRESHOLD:g}"
    return "cosine"


def _decisions(
    ref: list[npt.NDArray[Any]], cand: list[npt.NDArray[Any]], threshold: float
) -> tuple[float, float]:
    """Fraction of values on the same side of ``threshold`` as the source's (NaN never agrees)."""
    agree = 0
    total = 0
    for r, c in zip(ref, cand, strict=True):
        a = np.asarray(r, dtype=np.float64).ravel()
        b = np.asarray(c, dtype=np.float64).ravel()
        total += a.size
        if a.shape != b.shape:
            continue
        agree += int(np.sum(((a >= threshold) == (b >= threshold)) & np.isfinite(b)))
    score = agree / total if total else 0.0
    return score, score


def _top1(ref: list[npt.NDArray[Any]], cand: list[npt.NDArray[Any]]) -> tuple[float, float]:
    agree = 0
    rows = 0
    for r, c in zip(ref, cand, strict=True):
        r2 = r.reshape(-1, r.shape[-1])
        c2 = np.asarray(c).reshape(-1, r.shape[-1])
        # NaN rows never agree: argmax of NaN is 0, which could match by luck.
        finite = np.all(np.isfinite(c2), axis=1)
        agree += int(np.sum((np.argmax(r2, axis=1) == np.argmax(c2, axis=1)) & finite))
        rows += r2.shape[0]
    score = agree / rows if rows else 0.0
    return score, score


def _cosine(
    ref: list[npt.NDArray[Any]], cand: list[npt.NDArray[Any]]
) -> tuple[float, float, float]:
    scores = []
    diff_sq = 0.0
    ref_sq = 0.0
    for r, c in zip(ref, cand, strict=True):
        a = np.asarray(r, dtype=np.float64).ravel()
        b = np.asarray(c, dtype=np.float64).ravel()
        if a.shape != b.shape or not np.all(np.isfinite(b)):
            scores.append(0.0)
            diff_sq = float("inf")
            continue
        na = float(np.linalg.norm(a))
        nb = float(np.linalg.norm(b))
        if na < _EPS and nb < _EPS:
            scores.append(1.0)
        elif na < _EPS or nb < _EPS:
            scores.append(0.0)
        else:
            scores.append(float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0)))
        diff_sq += float(np.sum((a - b) ** 2))
        ref_sq += na * na
    rel = (
        float(np.sqrt(diff_sq / ref_sq)) if ref_sq > 0 else (0.0 if diff_sq == 0 else float("inf"))
    )
    return float(np.mean(scores)), float(np.min(scores)), rel


def _exact(ref: list[npt.NDArray[Any]], cand: list[npt.NDArray[Any]]) -> tuple[float, float]:
    same = sum(
        1 for r, c in zip(ref, cand, strict=True) if r.shape == c.shape and np.array_equal(r, c)
    )
    score = same / len(ref) if ref else 0.0
    return score, score


def compare_outputs(
    reference: Outputs,
    candidate: Outputs,
    output_names: Sequence[str],
    *,
    tolerance: float,
    metrics: Mapping[str, str] | None = None,
) -> Accuracy:
    """Score a candidate's outputs against the source's (see the module docstring).

    Args:
        reference: the source's outputs, per sample.
        candidate: the candidate's outputs on the same samples.
        output_names: names in the order of the per-sample lists.
        tolerance: the gate passes at ``score >= 1 - tolerance``.
        metrics: override the metric of named outputs (``top1``/``cosine``/``exact``/
            ``threshold:T``), e.g. ``cosine`` for a 2-D embedding output that is
            not a classifier.
    """
    overrides = metrics or {}
    scores: list[OutputScore] = []
    for k, name in enumerate(output_names):
        ref = [sample[k] for sample in reference]
        cand = [sample[k] for sample in candidate]
        metric = overrides.get(name) or choose_metric(ref[0], ref)
        kind, threshold = parse_metric(metric)
        rel: float | None
        if kind == "threshold" and threshold is not None:
            score, worst = _decisions(ref, cand, threshold)
            rel = _cosine(ref, cand)[2]
        elif metric == "top1":
            score, worst = _top1(ref, cand)
            rel = None
            if ref[0].dtype.kind == "f":
                rel = _cosine(ref, cand)[2]
        elif metric == "exact":
            score, worst = _exact(ref, cand)
            rel = None
        else:
            score, worst, rel = _cosine(ref, cand)
        scores.append(OutputScore(name, metric, score, worst, rel))
    return Accuracy(tuple(scores), threshold=1.0 - tolerance, samples=len(reference))


@dataclass(frozen=True)
class LatencyStats:
    """Per-inference latency of one model over the interleaved rounds, milliseconds."""

    p50_ms: float
    p95_ms: float
    runs: int

    def to_dict(self) -> dict[str, Any]:
        return {"p50_ms": self.p50_ms, "p95_ms": self.p95_ms, "runs": self.runs}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LatencyStats:
        return cls(float(d["p50_ms"]), float(d["p95_ms"]), int(d["runs"]))


def measure_latency(
    sessions: Mapping[str, Any],
    feed: Feed,
    *,
    iterations: int = 50,
    warmup: int = 5,
) -> tuple[dict[str, LatencyStats], dict[str, str]]:
    """Time every session on ``feed``, interleaved round-robin.

    Args:
        sessions: name to onnxruntime session (include the fp32 baseline).
        feed: one input feed (a batch of one).
        iterations: timed rounds; each round runs every session once.
        warmup: untimed runs per session first (allocations, lazy init).

    Returns:
        Stats per session name, and an error message per session that failed
        to run (those are dropped from the rounds).
    """
    errors: dict[str, str] = {}
    live: list[str] = []
    for name, sess in sessions.items():
        try:
            for _ in range(max(warmup, 1)):
                sess.run(None, feed)
            live.append(name)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises RuntimeError subclasses
            errors[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
    times: dict[str, list[int]] = {name: [] for name in live}
    n = len(live)
    for r in range(max(iterations, 1)):
        order = live[r % n :] + live[: r % n] if n else []
        for name in order:
            sess = sessions[name]
            t0 = time.perf_counter_ns()
            sess.run(None, feed)
            times[name].append(time.perf_counter_ns() - t0)
    stats: dict[str, LatencyStats] = {}
    for name, t in times.items():
        p50_ns, p95_ns = percentiles(t, 50, 95)  # nearest rank, as the agent reports
        stats[name] = LatencyStats(p50_ms=p50_ns / 1e6, p95_ms=p95_ns / 1e6, runs=len(t))
    return stats, errors
