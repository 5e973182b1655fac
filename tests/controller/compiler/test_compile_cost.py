"""What keeps a compile's cost bounded: one calibration per method, strided, budgeted timing."""

from __future__ import annotations

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
    other = rep.candidate("int8-static-pc-entropy")
    assert first.status != "failed" and second.status != "failed", rep.format_table()
    assert not any("reused" in n for n in first.notes)
    assert any("reused the minmax calibration" in n for n in second.notes)
    # Another method calibrates for itself.
    assert not any("reused" in n for n in other.notes)
