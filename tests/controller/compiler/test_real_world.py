"""Models as real exporters write them (issue 13): each test reproduces one public-model pattern.

Every model here runs in plain onnxruntime; the compiler must accept it,
quantize what it can and say what it could not, never refuse it with a
wrong reason or crash with a traceback.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgefleet.controller.compiler import (
    BUILTIN_PROFILES,
    Built,
    CandidateReport,
    CompileError,
    CompileResult,
    Recipe,
    RecipeError,
    SourceModelError,
    compile_model,
)
from edgefleet.controller.compiler.data import load_samples, synthetic_feed
from edgefleet.controller.compiler.evaluate import choose_metric, compare_outputs, run_samples
from edgefleet.controller.compiler.normalize import (
    ensure_opset,
    flatten_gemm_biases,
    lift_constants,
)
from edgefleet.controller.compiler.pipeline import load_source
from edgefleet.controller.compiler.recipe_base import BuildInput
from edgefleet.controller.compiler.recipes import (
    DynamicInt8Recipe,
    StaticInt8Recipe,
    prepare_for_quantization,
)
from edgefleet.controller.compiler.source import make_session

from . import models as tm

AVX2 = BUILTIN_PROFILES["x86-avx2"]
FAST: dict[str, Any] = {"latency_iterations": 3, "latency_warmup": 1, "sensitivity_attempts": 0}
F = np.float32


def _candidate(result: CompileResult, name: str) -> CandidateReport:
    return next(c for c in result.report.candidates if c.name == name)


def _x(n: int, *shape: int, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(0, 1, (n, *shape)).astype(F)}


# -- dynamic dimensions -------------------------------------------------------


def test_a_minus_one_batch_is_a_dynamic_axis() -> None:
    src = load_source(tm.neg1_batch())
    assert src.inputs[0].shape == (None, 16)
    data = _x(24, 16)
    result = compile_model(
        tm.neg1_batch(), AVX2, calibration=data, validation=data, recipes=["fp32"], **FAST
    )
    assert result.report.validation_samples == 24
    assert _candidate(result, "fp32").accuracy is not None


def test_a_minus_one_batch_without_data_is_timed_on_a_batch_of_one() -> None:
    feed = synthetic_feed(load_source(tm.neg1_batch()))
    assert feed["x"].shape == (1, 16)
    result = compile_model(tm.neg1_batch(), AVX2, recipes=["fp32"], **FAST)
    assert result.report.latency_config["input"].startswith("synthetic")


def test_two_question_mark_axes_are_independent() -> None:
    """paddle2onnx writes H and W as the literal name "?": 12 high and 20 wide is fine."""
    src = load_source(tm.two_unknown_axes())
    assert src.inputs[0].shape == (None, 3, None, None)
    data = _x(8, 3, 12, 20)
    samples = load_samples(data, src, role="validation")
    assert samples.feed(0)["x"].shape == (1, 3, 12, 20)
    result = compile_model(
        tm.two_unknown_axes(), AVX2, validation=data, recipes=["fp32", "fp32-opt"], **FAST
    )
    assert _candidate(result, "fp32-opt").status != "failed"


# -- scalar inputs --------------------------------------------------------------


def test_a_scalar_input_is_fed_as_a_zero_dimensional_array() -> None:
    data = {**_x(16, 16), "sr": np.full(16, 16000, np.int64)}
    samples = load_samples(data, load_source(tm.scalar_input()), role="calibration")
    sr = samples.feed(3)["sr"]
    assert isinstance(sr, np.ndarray) and sr.shape == () and sr.dtype == np.int64
    result = compile_model(
        tm.scalar_input(),
        AVX2,
        calibration=data,
        validation=data,
        recipes=["fp32", "int8-dynamic"],
        **FAST,
    )
    dyn = _candidate(result, "int8-dynamic")
    assert dyn.status != "failed", dyn.reason
    assert dyn.accuracy is not None and dyn.accuracy.passed


# -- weights in Constant nodes ----------------------------------------------------


def test_weights_in_constant_nodes_are_quantized_and_converted() -> None:
    source = tm.constant_weights()
    assert not onnx.load_model_from_string(source).graph.initializer
    data = _x(32, 16)
    result = compile_model(
        source, AVX2, validation=data, recipes=["fp32", "fp16", "int8-dynamic"], **FAST
    )
    fp16 = _candidate(result, "fp16")
    assert fp16.status != "skipped", fp16.reason
    assert fp16.size_ratio is not None and fp16.size_ratio < 0.7
    src = load_source(source)
    assert src.lifted_constants == 2
    assert src.weight_bytes == (16 * 32 + 32 * 4) * 4
    assert _candidate(result, "int8-dynamic").status != "failed"
    built = DynamicInt8Recipe(AVX2).build(BuildInput(src, prepare_for_quantization(src)))
    ops = [n.op_type for n in onnx.load_model_from_string(built.model).graph.node]
    assert ops.count("MatMulInteger") == 2 and "MatMul" not in ops
    assert any("Constant node(s) lifted" in n for n in result.report.notes)
    # The fp32 candidate is still the source exactly as given.
    assert _candidate(result, "fp32").sha256 == hashlib.sha256(source).hexdigest()


def test_lifting_reaches_constants_inside_subgraphs() -> None:
    model = onnx.load_model_from_string(tm.stateful_if())
    assert lift_constants(model) == 2
    onnx.checker.check_model(model)
    for node in model.graph.node:
        if node.op_type == "If":
            for attr in node.attribute:
                assert [n.op_type for n in attr.g.node].count("Constant") == 0
                assert len(attr.g.initializer) == 1
    data = tm.stateful_if_data(4)
    feed = {"x": data["x"][0], "state": data["state"][0], "sr": np.asarray(data["sr"][0])}
    want = make_session(tm.stateful_if()).run(None, feed)
    got = make_session(model.SerializeToString()).run(None, feed)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a, b)


# -- old opsets ----------------------------------------------------------------------


def test_opset_11_is_converted_for_per_channel_int8_only() -> None:
    source = tm.opset11_cnn()
    data = _x(16, 3, 16, 16)
    result = compile_model(
        source,
        AVX2,
        calibration=data,
        validation=data,
        recipes=["fp32", "int8-static-pc-minmax", "int8-static-pt-minmax"],
        **FAST,
    )
    pc = _candidate(result, "int8-static-pc-minmax")
    assert pc.status != "failed", pc.reason
    assert any("converted opset 11 -> 13" in n for n in pc.notes)
    assert pc.accuracy is not None and pc.accuracy.passed
    pt = _candidate(result, "int8-static-pt-minmax")
    assert not any("converted opset" in n for n in pt.notes)
    assert _candidate(result, "fp32").sha256 == hashlib.sha256(source).hexdigest()


def test_ensure_opset_leaves_new_models_alone() -> None:
    model = tm.mlp()
    assert ensure_opset(model, 13, "test") == (model, None)
    converted, note = ensure_opset(tm.opset11_cnn(), 13, "test")
    assert note is not None and "11 -> 13" in note
    proto = onnx.load_model_from_string(converted)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 13


# -- stateful model with an If subgraph --------------------------------------------------


def test_stateful_model_with_if_subgraph_and_scalar_rate_compiles() -> None:
    data = tm.stateful_if_data(24)
    result = compile_model(
        tm.stateful_if(),
        AVX2,
        calibration=data,
        validation=data,
        recipes=["fp32", "fp32-opt", "fp16"],
        **FAST,
    )
    assert result.report.validation_samples == 24
    for name in ("fp32-opt", "fp16"):
        c = _candidate(result, name)
        assert c.status != "failed", c.reason


# -- nodes onnxruntime's quantizer fails on ---------------------------------------------------


def test_a_row_shaped_gemm_bias_no_longer_breaks_per_channel_int8() -> None:
    """tf2onnx's [1, N] Gemm bias (magika) is stored as the same [N] bias before quantizing."""
    data = _x(32, 16)
    result = compile_model(
        tm.gemm_row_bias(),
        AVX2,
        calibration=data,
        validation=data,
        recipes=["fp32", "int8-static-pc-minmax"],
        **FAST,
    )
    pc = _candidate(result, "int8-static-pc-minmax")
    assert pc.status != "failed", pc.reason
    assert "quantizer_failed_nodes" not in pc.options


def test_flatten_gemm_biases_keeps_the_output() -> None:
    model = onnx.load_model_from_string(tm.gemm_row_bias())
    assert flatten_gemm_biases(model) == ["c1"]
    feed = _x(1, 16)
    want = make_session(tm.gemm_row_bias()).run(None, feed)[0]
    got = make_session(model.SerializeToString()).run(None, feed)[0]
    np.testing.assert_array_equal(want, got)


def test_a_node_the_quantizer_fails_on_stays_float_and_is_reported() -> None:
    data = _x(32, 2, 16)
    result = compile_model(
        tm.gemm_full_bias(),
        AVX2,
        calibration=data,
        validation=data,
        recipes=["fp32", "int8-static-pc-minmax"],
        **FAST,
    )
    pc = _candidate(result, "int8-static-pc-minmax")
    assert pc.status != "failed", pc.reason
    assert pc.options["quantizer_failed_nodes"] == ["fc1"]
    assert any("failed on node 'fc1' (Gemm)" in n and "stays float" in n for n in pc.notes)
    # fc2 was still quantized: the candidate is not the float model.
    src = load_source(tm.gemm_full_bias())
    inp = BuildInput(src, prepare_for_quantization(src), None, load_samples(data, src, role="c"))
    built = StaticInt8Recipe(AVX2, per_channel=True, method="minmax").build(inp)
    graph = onnx.load_model_from_string(built.model).graph
    dq_weights = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    gemm_weights = {n.name: n.input[1] for n in graph.node if n.op_type == "Gemm"}
    assert gemm_weights["fc1"] not in dq_weights
    assert gemm_weights["fc2"] in dq_weights


# -- a single probability per sample ----------------------------------------------------------


class _ShiftedBias(Recipe):
    """A variant whose logits are 0.1 too high: the cosine of one positive value cannot see it."""

    name = "shifted-bias"
    precision = "int8"

    def build(self, inp: BuildInput, *, nodes_to_exclude: Sequence[str] = ()) -> Built:
        model = onnx.load_model_from_string(inp.source.data)
        for init in model.graph.initializer:
            if init.name == "b":
                init.CopyFrom(numpy_helper.from_array(np.full(1, 0.1, F), "b"))
        return Built(model.SerializeToString())


def test_a_probability_output_is_judged_by_decision_agreement() -> None:
    data = _x(200, 16)
    result = compile_model(
        tm.prob_output(), AVX2, validation=data, recipes=["fp32", _ShiftedBias()], **FAST
    )
    fp32 = _candidate(result, "fp32")
    assert fp32.accuracy is not None and fp32.accuracy.outputs[0].metric == "threshold:0.5"
    assert fp32.accuracy.score == 1.0
    shifted = _candidate(result, "shifted-bias")
    assert shifted.accuracy is not None
    assert shifted.accuracy.outputs[0].metric == "threshold:0.5"
    assert 0.5 < shifted.accuracy.score < 0.99
    assert shifted.status == "rejected"
    assert shifted.reason is not None and "decision agreement at 0.5" in shifted.reason
    # Cosine, the old metric, scores the same outputs as perfect.
    src = load_source(tm.prob_output())
    samples = load_samples(data, src, role="validation")
    ref = run_samples(make_session(src.data), samples, ["p"])
    cand = run_samples(
        make_session(_ShiftedBias().build(BuildInput(src, None)).model), samples, ["p"]
    )
    cosine = compare_outputs(ref, cand, ["p"], tolerance=0.01, metrics={"p": "cosine"})
    assert cosine.passed


def test_the_decision_threshold_can_be_chosen_and_is_checked() -> None:
    data = _x(50, 16)
    result = compile_model(
        tm.prob_output(),
        AVX2,
        validation=data,
        recipes=["fp32"],
        metrics={"p": "threshold:0.3"},
        **FAST,
    )
    acc = _candidate(result, "fp32").accuracy
    assert acc is not None and acc.outputs[0].metric == "threshold:0.3"
    with pytest.raises(CompileError, match="threshold must be a number"):
        compile_model(tm.prob_output(), AVX2, metrics={"p": "threshold:high"}, **FAST)


def test_an_unbounded_single_value_output_keeps_cosine() -> None:
    """A regression output (Tanh @ w can leave [0, 1]) is not a probability."""
    ref = [np.array([[0.2]], F), np.array([[1.7]], F)]
    assert choose_metric(ref[0], ref) == "cosine"
    probs = [np.array([[0.2]], F), np.array([[0.9]], F)]
    assert choose_metric(probs[0], probs) == "threshold:0.5"


def test_a_model_that_cannot_run_on_made_up_input_asks_for_data() -> None:
    """Without data, a dynamic axis of 1 may be too small (a 3x3 unpadded Conv): say why."""
    model = onnx.load_model_from_string(tm.two_unknown_axes())
    for node in model.graph.node:
        if node.op_type == "Conv":
            del node.attribute[:]
    with pytest.raises(SourceModelError, match="pass --validation data with real shapes"):
        compile_model(model.SerializeToString(), AVX2, recipes=["fp32"], **FAST)


def _branch_data(n: int) -> dict[str, Any]:
    rng = np.random.default_rng(n)
    return {"x": rng.normal(0, 1, (n, 8)).astype(np.float32), "sr": np.full(n, 16000, np.int64)}


def test_weights_the_quantizer_cannot_reach_are_named_as_the_reason() -> None:
    """silero_vad.onnx keeps its weights in If branches: "nothing to gain" was not the reason.

    onnxruntime's static quantizer rewrites the top-level graph only.
    """
    src = load_source(tm.weights_in_branches())
    assert src.weight_bytes == 2 * 8 * 16 * 4
    inp = BuildInput(
        src, prepare_for_quantization(src), None, load_samples(_branch_data(8), src, role="c")
    )
    with pytest.raises(RecipeError, match="inside If/Loop/Scan subgraphs"):
        StaticInt8Recipe(AVX2, per_channel=False, method="minmax").build(inp)


def test_dynamic_int8_reaches_the_weights_inside_if_branches() -> None:
    """Dynamic int8 quantizes subgraph bodies too (``EnableSubgraph``): silero's layout."""
    src = load_source(tm.weights_in_branches())
    built = DynamicInt8Recipe(AVX2).build(BuildInput(src, prepare_for_quantization(src)))
    graph = onnx.load_model_from_string(built.model).graph
    branch_ops = {
        inner.op_type
        for node in graph.node
        if node.op_type == "If"
        for attr in node.attribute
        for inner in attr.g.node
    }
    assert "MatMulInteger" in branch_ops and "MatMul" not in branch_ops
    feed = {k: v[:3] for k, v in _branch_data(3).items()}
    feed["sr"] = np.array(16000, np.int64)
    want = make_session(src.data).run(None, feed)[0]
    got = make_session(built.model).run(None, feed)[0]
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()
    assert not any("If" in note for note in built.notes), built.notes
