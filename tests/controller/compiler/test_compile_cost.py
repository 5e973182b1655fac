"""What keeps a compile's cost bounded: one calibration per method, strided, budgeted timing."""

from __future__ import annotations

from typing import Any

import pytest

from edgefleet.controller.compiler import BUILTIN_PROFILES, compile_model
from edgefleet.controller.compiler.recipes import calibration_stride

from . import models as tm

AVX2 = BUILTIN_PROFILES["x86-avx2"]


@pytest.mark.parametrize(("count", "stride"), [(128, 8), (12, 6), (13, 1), (7, 7), (1, 1), (30, 6)])
def test_calibration_stride_divides_the_sample_count(count: int, stride: int) -> None:
    assert calibration_stride(count) == stride
    assert count % calibration_stride(count) == 0


def test_static_candidates_of_one_method_calibrate_once() -> None:
    result = compile_model(
        tm.cnn(),
        AVX2,
        calibration=tm.cnn_data(12),
        validation=tm.cnn_data(20, seed=7),
        recipes=[
            "fp32",
            "int8-static-pc-minmax",
            "int8-static-pt-minmax",
            "int8-static-pc-entropy",
        ],
        latency_iterations=3,
        latency_warmup=1,
        sensitivity_attempts=0,
    )
    rep = result.report
    first = rep.candidate("int8-static-pc-minmax")
    second = rep.candidate("int8-static-pt-minmax")
    assert first.status != "failed" and second.status != "failed", rep.format_table()
    assert not any("reused" in n for n in first.notes)
    assert any("reused the minmax calibration" in n for n in second.notes)


def test_other_calibrations_are_skipped_once_minmax_passes_the_gate() -> None:
    recipes = ["fp32", "int8-static-pc-minmax", "int8-static-pc-entropy"]
    common: dict[str, Any] = {
        "calibration": tm.cnn_data(12),
        "recipes": recipes,
        "latency_iterations": 3,
        "latency_warmup": 1,
        "sensitivity_attempts": 0,
    }
    rep = compile_model(tm.cnn(), AVX2, validation=tm.cnn_data(20, seed=7), **common).report
    assert rep.candidate("int8-static-pc-minmax").accuracy.passed  # type: ignore[union-attr]
    entropy = rep.candidate("int8-static-pc-entropy")
    assert entropy.status == "skipped"
    assert "already passes the accuracy gate" in (entropy.reason or "")
    # Without validation nothing is known to pass: the entropy candidate is built,
    # and calibrates for itself (its cache is per method).
    unverified = compile_model(tm.cnn(), AVX2, **common).report
    built = unverified.candidate("int8-static-pc-entropy")
    assert built.status != "skipped"
    assert not any("reused" in n for n in built.notes)
