"""The accuracy metrics and the interleaved latency measurement."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edgefleet.controller.compiler.evaluate import (
    choose_metric,
    compare_outputs,
    measure_latency,
)


def _samples(*arrays: np.ndarray) -> list[list[np.ndarray]]:
    return [[a] for a in arrays]


def test_metric_choice() -> None:
    assert choose_metric(np.zeros((1, 10), np.float32)) == "top1"
    assert choose_metric(np.zeros((1, 1), np.float32)) == "cosine"
    assert choose_metric(np.zeros((1, 3, 8), np.float32)) == "cosine"
    assert choose_metric(np.zeros((5,), np.float32)) == "cosine"
    assert choose_metric(np.zeros((1,), np.int64)) == "exact"


def test_top1_agreement_against_the_tolerance() -> None:
    rng = np.random.default_rng(0)
    ref = [rng.normal(size=(1, 5)).astype(np.float32) for _ in range(100)]
    cand = [r.copy() for r in ref]
    # flip the winner of exactly one sample
    cand[7] = -cand[7]
    acc = compare_outputs(_samples(*ref), _samples(*cand), ["y"], tolerance=0.01)
    assert acc.outputs[0].metric == "top1"
    assert acc.score == pytest.approx(0.99)
    assert acc.passed  # 99 % >= 1 - 0.01
    cand[8] = -cand[8]
    acc = compare_outputs(_samples(*ref), _samples(*cand), ["y"], tolerance=0.01)
    assert acc.score == pytest.approx(0.98)
    assert not acc.passed


def test_cosine_and_relative_error() -> None:
    ref = [np.array([[1.0], [2.0], [3.0]], np.float32)] * 4
    close = [r * 1.001 for r in ref]
    acc = compare_outputs(_samples(*ref), _samples(*close), ["y"], tolerance=0.01)
    out = acc.outputs[0]
    assert out.metric == "cosine"
    assert out.score == pytest.approx(1.0, abs=1e-6)
    assert out.rel_error == pytest.approx(0.001, rel=1e-3)
    orth = [np.array([[3.0], [0.0], [-1.0]], np.float32)] * 4
    assert not compare_outputs(_samples(*ref), _samples(*orth), ["y"], tolerance=0.01).passed


def test_non_finite_candidate_scores_zero() -> None:
    ref = [np.ones((1, 4), np.float32)] * 3
    bad = [np.full((1, 4), np.nan, np.float32)] * 3
    acc = compare_outputs(_samples(*ref), _samples(*bad), ["y"], tolerance=0.5)
    assert acc.score == 0.0
    assert not acc.passed
    acc = compare_outputs(
        _samples(*ref), _samples(*bad), ["y"], tolerance=0.5, metrics={"y": "cosine"}
    )
    assert acc.score == 0.0


def test_exact_metric_and_worst_output_decides() -> None:
    ref = [[np.array([1], np.int64), np.ones((1, 3), np.float32)] for _ in range(4)]
    cand = [[np.array([1 if i else 2], np.int64), np.ones((1, 3), np.float32)] for i in range(4)]
    acc = compare_outputs(ref, cand, ["label", "probs"], tolerance=0.1)
    assert [o.metric for o in acc.outputs] == ["exact", "top1"]
    assert acc.score == pytest.approx(0.75)
    assert not acc.passed
    assert acc.to_dict()["passed"] is False


class _Clock:
    """A fake session recording the order of runs across sessions."""

    def __init__(self, name: str, log: list[str], fail: bool = False) -> None:
        self.name, self.log, self.fail = name, log, fail

    def run(self, names: Any, feed: Any) -> list[Any]:
        if self.fail:
            raise RuntimeError("kernel missing")
        self.log.append(self.name)
        return []


def test_latency_rounds_interleave_every_model() -> None:
    log: list[str] = []
    sessions = {n: _Clock(n, log) for n in ("fp32", "a", "b")}
    stats, errors = measure_latency(sessions, {}, iterations=6, warmup=2)
    assert not errors
    timed = log[6:]  # after 3 x 2 warm-up runs
    rounds = [timed[i : i + 3] for i in range(0, len(timed), 3)]
    assert all(sorted(r) == ["a", "b", "fp32"] for r in rounds)
    assert len({r[0] for r in rounds}) == 3  # the order rotates
    assert set(stats) == {"fp32", "a", "b"}
    assert all(s.runs == 6 for s in stats.values())
    assert all(s.p95_ms >= s.p50_ms >= 0 for s in stats.values())


def test_latency_records_a_session_that_cannot_run() -> None:
    log: list[str] = []
    sessions = {"fp32": _Clock("fp32", log), "bad": _Clock("bad", log, fail=True)}
    stats, errors = measure_latency(sessions, {}, iterations=3, warmup=1)
    assert "bad" not in stats
    assert "kernel missing" in errors["bad"]
    assert stats["fp32"].runs == 3
