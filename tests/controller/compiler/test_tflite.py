"""The TFLite side of the compiler: source loading, litert-quantizer recipes, gate and report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from edgefleet.controller.compiler import (
    BUILTIN_PROFILES,
    BuildInput,
    CompileError,
    CompileReport,
    DataError,
    ProfileError,
    RecipeError,
    SourceModelError,
    compile_model,
    load_samples,
    load_source,
)
from edgefleet.controller.compiler.cli import compile_command
from edgefleet.controller.compiler.profiles import Profile
from edgefleet.controller.compiler.tflite import (
    TfliteQuantRecipe,
    inspect_tflite,
    make_tflite_session,
)
from tests.tflite_fixture import FIXTURE, quadrant_images, require_litert, require_quantizer

from . import models as tm

LITERT = BUILTIN_PROFILES["arm64-litert"]
FAST: dict[str, Any] = {"latency_iterations": 5, "latency_warmup": 1}
QUANTIZED = ("int8-dynamic", "int8-static", "int8-weight-only", "int4-weight-only")


@pytest.fixture(autouse=True)
def _litert() -> None:
    require_litert()


def _data(count: int, seed: int) -> dict[str, np.ndarray]:
    return {"image": quadrant_images(count, seed=seed)[0]}


def test_tflite_source_is_detected_and_inspected() -> None:
    src = load_source(FIXTURE)
    assert src.format == "tflite"
    assert [(s.name, s.dtype, s.shape) for s in src.inputs] == [
        ("image", "float32", (None, 8, 8, 1))
    ]
    assert [(s.name, s.shape) for s in src.outputs] == [("probs", (None, 4))]
    assert src.op_counts == {
        "CONV_2D": 1,
        "MAX_POOL_2D": 1,
        "RESHAPE": 1,
        "FULLY_CONNECTED": 2,
        "SOFTMAX": 1,
    }
    # conv 4x3x3x1 + 4, dense 64x16 + 16, dense 16x4 + 4 float32 weights.
    assert src.weight_bytes == 4 * (36 + 4 + 1024 + 16 + 64 + 4)
    assert src.size_bytes == len(FIXTURE.read_bytes())
    assert load_source(FIXTURE.read_bytes()).sha256 == src.sha256


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda d: d[: len(d) // 2], "tflite cannot load"),
        (lambda d: d[:8] + bytes(range(256)) * 4, "tflite cannot load"),
        (lambda d: b"\x00\x00\x00\x00TFL3", "tflite cannot load"),
        (lambda d: b"\x89PNG\r\n\x1a\n" + d[8:], "not an ONNX model"),
    ],
)
def test_corrupt_or_foreign_files_are_source_errors(mangle: Any, message: str) -> None:
    with pytest.raises(SourceModelError, match=message):
        load_source(mangle(FIXTURE.read_bytes()))


def test_source_format_must_match_the_profile_runtime() -> None:
    with pytest.raises(CompileError, match="converting ONNX to TFLite needs full TensorFlow"):
        compile_model(tm.mlp(), LITERT, **FAST)
    with pytest.raises(CompileError, match="targets onnxruntime, but the source is a TFLite"):
        compile_model(FIXTURE, BUILTIN_PROFILES["x86-vnni"], **FAST)


def test_int4_is_accepted_for_onnxruntime_profiles_too() -> None:
    # int4 weight-only exists for ONNX as well (MatMulNBits); int2 exists for neither.
    prof = dataclasses.replace(BUILTIN_PROFILES["x86-vnni"], precisions=("fp32", "int4"))
    assert prof.precisions == ("fp32", "int4")
    with pytest.raises(ProfileError, match="int2"):
        dataclasses.replace(BUILTIN_PROFILES["x86-vnni"], precisions=("fp32", "int2"))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"image": np.zeros((4, 8, 8, 1), np.float64)}, "dtype float64"),
        ({"image": np.zeros((4, 8, 8, 3), np.float32)}, "axis 3 must be 1"),
        ({"pixels": np.zeros((4, 8, 8, 1), np.float32)}, "missing array"),
        ({"image": np.full((4, 8, 8, 1), np.nan, np.float32)}, "NaN"),
    ],
)
def test_data_that_does_not_fit_is_refused(data: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(DataError, match=message):
        compile_model(FIXTURE, LITERT, validation=data, **FAST)


def test_session_adapter_matches_the_onnxruntime_calling_convention() -> None:
    session = make_tflite_session(FIXTURE.read_bytes())
    samples = load_samples(_data(3, seed=1), load_source(FIXTURE), role="validation")
    by_name = session.run(["probs"], samples.feed(0))
    default = session.run(None, samples.feed(0))
    assert len(by_name) == len(default) == 1
    assert by_name[0].shape == (1, 4)
    np.testing.assert_array_equal(by_name[0], default[0])


def test_compile_builds_gates_and_times_every_tflite_candidate() -> None:
    require_quantizer()
    result = compile_model(
        FIXTURE,
        LITERT,
        calibration=_data(32, seed=11),
        validation=_data(100, seed=12),
        latency_iterations=20,
        latency_warmup=2,
    )
    report = result.report
    by_name = {c.name: c for c in report.candidates}
    assert list(by_name) == ["fp32", *QUANTIZED]
    for name in QUANTIZED:
        c = by_name[name]
        assert c.status in ("chosen", "eligible", "rejected"), (name, c.status, c.reason)
        assert c.accuracy is not None and c.accuracy.passed, (name, c.accuracy)
        assert c.size_ratio is not None and c.size_ratio < 0.8, (name, c.size_ratio)
        assert c.latency is not None and c.latency.runs == 20
        assert c.sha256 and c.options["quantizer"] == "litert-quantizer"
    assert by_name["int4-weight-only"].precision == "int4"
    assert by_name["int4-weight-only"].size_bytes < by_name["int8-weight-only"].size_bytes
    assert by_name["int8-static"].options["activation_bits"] == 8
    # Nothing slower than fp32 or failing the gate is chosen (latency objective).
    for variant in result.chosen:
        assert variant.metrics.accuracy is not None and variant.metrics.accuracy.passed
        assert (variant.metrics.latency_ratio or 1.0) <= 1.0
        assert variant.model[4:8] == b"TFL3"
    assert report.latency_config["runtime"] == "tflite"
    assert report.host["ai-edge-litert"]
    assert report.source["op_counts"]["CONV_2D"] == 1
    # Every chosen variant runs on the agent's backend with the source's I/O.
    for variant in result.chosen:
        session = make_tflite_session(variant.model)
        probs = session.run(None, {"image": quadrant_images(2, seed=3)[0]})[0]
        assert probs.shape == (2, 4)
    # The report round-trips like an ONNX one.
    again = CompileReport.from_dict(json.loads(report.to_json()))
    assert [c.name for c in again.candidates] == [c.name for c in report.candidates]
    assert "int4-weight-only" in report.format_table()


def test_size_objective_picks_the_smallest_passing_variant() -> None:
    require_quantizer()
    small = dataclasses.replace(LITERT, name="litert-size", objective="size")
    result = compile_model(
        FIXTURE, small, calibration=_data(16, seed=1), validation=_data(50, seed=2), **FAST
    )
    # The smallest that passes the gate and runs within 1.1x fp32 latency.
    fit = [
        c
        for c in result.report.candidates
        if c.accuracy is not None
        and c.accuracy.passed
        and c.latency_ratio is not None
        and c.latency_ratio <= 1.1
    ]
    assert result.best.name == min(fit, key=lambda c: (c.size_bytes or 0, c.name)).name
    sizes = [v.metrics.size_bytes or 0 for v in result.chosen]
    assert sizes == sorted(sizes)
    for c in result.report.candidates:
        if c.latency_ratio is not None and c.latency_ratio > 1.1 and c.status == "rejected":
            assert c.accuracy is None or not c.accuracy.passed or "1.1x" in (c.reason or "")


def test_without_calibration_static_int8_is_skipped_with_the_reason() -> None:
    require_quantizer()
    report = compile_model(FIXTURE, LITERT, validation=_data(20, seed=2), **FAST).report
    static = report.candidate("int8-static")
    assert static.status == "skipped"
    assert "calibration" in (static.reason or "")


def test_profile_precisions_limit_the_tflite_recipes() -> None:
    require_quantizer()
    int8_only = Profile(
        name="litert-int8",
        runtime="tflite",
        arch="any",
        cpu_features=frozenset(),
        precisions=("fp32", "int8"),
        max_bundle_bytes=None,
        objective="latency",
    )
    report = compile_model(FIXTURE, int8_only, **FAST).report
    assert report.candidate("int4-weight-only").status == "skipped"
    assert report.verified is False


def test_an_op_the_recipe_cannot_quantize_falls_back_to_core_ops_and_says_so() -> None:
    require_quantizer()
    src = load_source(FIXTURE)
    # SOFTMAX has no integer-compute dynamic kernel: the quantizer raises for it.
    recipe = TfliteQuantRecipe("dynamic", 8, ops=["SOFTMAX", "FULLY_CONNECTED"])
    built = recipe.build(BuildInput(src, None))
    assert any("retried with only FULLY_CONNECTED, CONV_2D" in n for n in built.notes), built.notes
    assert built.options["ops"] == ["FULLY_CONNECTED", "CONV_2D"]
    facts = inspect_tflite(built.model)
    assert facts.int_weights >= 3
    assert facts.float_weight_ops == ()
    only_softmax = TfliteQuantRecipe("dynamic", 8, ops=["SOFTMAX"]).build(BuildInput(src, None))
    assert any(n.startswith("quantizing SOFTMAX failed") for n in only_softmax.notes)


class _MatchesNothing(TfliteQuantRecipe):
    """A configuration whose layer regex matches no tensor: the quantizer changes nothing."""

    def _configure(self, quantizer: Any, ops: Any) -> None:
        from litert_quantizer import qtyping

        quantizer.add_weight_only_config(
            "^no-such-layer$", qtyping.TFLOperationName.ALL_SUPPORTED, 8
        )


def test_a_recipe_that_quantizes_nothing_fails_with_the_reason() -> None:
    require_quantizer()
    with pytest.raises(RecipeError, match="left every weight in float"):
        _MatchesNothing("weight_only", 8).build(BuildInput(load_source(FIXTURE), None))


def test_weight_only_int8_keeps_float_compute_and_reports_float_leftovers() -> None:
    require_quantizer()
    src = load_source(FIXTURE)
    only_fc = TfliteQuantRecipe("weight_only", 8, ops=["FULLY_CONNECTED"]).build(
        BuildInput(src, None)
    )
    facts = inspect_tflite(only_fc.model)
    assert facts.op_counts.get("DEQUANTIZE", 0) >= 2
    assert facts.float_weight_ops == ("CONV_2D",)
    assert "weights left in float: CONV_2D" in only_fc.notes


def test_an_already_quantized_source_has_nothing_left_to_quantize(tmp_path: Path) -> None:
    require_quantizer()
    src = load_source(FIXTURE)
    samples = load_samples(_data(16, seed=4), src, role="calibration")
    static = TfliteQuantRecipe("static", 8).build(BuildInput(src, None, calibration=samples))
    quantized = tmp_path / "int8.tflite"
    quantized.write_bytes(static.model)
    report = compile_model(quantized, LITERT, calibration=_data(8, seed=5), **FAST).report
    assert report.source["weight_bytes"] == 0
    for name in QUANTIZED:
        assert report.candidate(name).status == "skipped"
        assert "no float weights" in (report.candidate(name).reason or "")
    assert report.chosen == ("fp32",)


def test_cli_writes_tflite_variants(tmp_path: Path) -> None:
    require_quantizer()
    np.savez(tmp_path / "val.npz", **_data(20, seed=8))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        compile_command,
        [
            str(FIXTURE),
            "--profile",
            "arm64-litert",
            "--validation",
            str(tmp_path / "val.npz"),
            "--latency-runs",
            "5",
            "--output-dir",
            str(out),
            "--all-eligible",
        ],
    )
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in out.iterdir())
    assert "report.json" in written
    models = [n for n in written if n != "report.json"]
    assert models and all(n.startswith("arm64-litert.") and n.endswith(".tflite") for n in models)
