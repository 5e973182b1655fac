"""Weight-only int8/int4 recipes and the ``size``/``latency`` objectives, on small real models.

Latency is never asserted against a clock here (that lives in
bench/weight_only.py); what is asserted is the structure that decides it:
with the session option the model asks for, onnxruntime's optimised graph
has no ``DequantizeLinear`` left, i.e. it runs the fp32 kernels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.controller.compiler import BUILTIN_PROFILES, compile_model
from edgefleet.controller.compiler.data import load_samples
from edgefleet.controller.compiler.evaluate import LatencyStats
from edgefleet.controller.compiler.pipeline import apply_objective, load_source, make_onnx_session
from edgefleet.controller.compiler.recipe_base import BuildInput
from edgefleet.controller.compiler.recipes import (
    Int4WeightOnlyRecipe,
    WeightOnlyInt8Recipe,
    prepare_for_quantization,
)
from edgefleet.controller.compiler.report import CandidateReport
from edgefleet.controller.compiler.weight_only import int4_tooling_missing
from edgefleet.shared.runtime import ONNX_SESSION_CONFIG_KEY, get_backend

from . import models as tm

AVX2 = BUILTIN_PROFILES["x86-avx2"]
SIZE = dataclasses.replace(AVX2, name="x86-avx2-size", objective="size")
FAST: dict[str, Any] = {"latency_iterations": 5, "latency_warmup": 1}
F = np.float32
FOLD = "session.disable_quant_qdq"


def _finish(graph: onnx.GraphProto, opset: int = 17) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def wide_mlp(features: int = 128, width: int = 256, classes: int = 16, seed: int = 0) -> bytes:
    """A weight-dominated MLP: 3 MatMul+Add layers, ~200 KB of fp32 weights."""
    rng = np.random.default_rng(seed)
    dims = [features, width, width, classes]
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x = "x"
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        w = rng.normal(0, np.sqrt(2 / a), (a, b)).astype(F)
        inits += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(rng.normal(0, 0.05, b).astype(F), f"b{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"fc{i}"),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"fc{i}_bias"),
        ]
        x = f"a{i}"
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"h{i}"], name=f"relu{i}"))
            x = f"h{i}"
    nodes.append(helper.make_node("Identity", [x], ["logits"], name="out"))
    graph = helper.make_graph(
        nodes,
        "wide_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        inits,
    )
    return _finish(graph)


def mlp_data(n: int, features: int = 128, seed: int = 1) -> dict[str, npt.NDArray[Any]]:
    return {"x": np.random.default_rng(seed).normal(0, 1, (n, features)).astype(F)}


def conv_net(channels: int = 48, classes: int = 10, seed: int = 0) -> bytes:
    """Conv/BatchNorm/Relu x3 (3x3 kernels) -> GlobalAveragePool -> Gemm: a Conv-dominated net."""
    rng = np.random.default_rng(seed)
    c = channels
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    x, cin = "x", 3
    for i in range(3):
        w = rng.normal(0, np.sqrt(2 / (9 * cin)), (c, cin, 3, 3)).astype(F)
        inits.append(numpy_helper.from_array(w, f"cw{i}"))
        for part, val in (
            ("scale", rng.uniform(0.5, 1.5, c)),
            ("bias", rng.normal(0, 0.1, c)),
            ("mean", rng.normal(0, 0.1, c)),
            ("var", rng.uniform(0.5, 1.5, c)),
        ):
            inits.append(numpy_helper.from_array(val.astype(F), f"bn{i}_{part}"))
        nodes += [
            helper.make_node("Conv", [x, f"cw{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"),
            helper.make_node(
                "BatchNormalization",
                [f"c{i}", f"bn{i}_scale", f"bn{i}_bias", f"bn{i}_mean", f"bn{i}_var"],
                [f"n{i}"],
                name=f"bn{i}",
            ),
            helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        x, cin = f"r{i}", c
    inits += [
        numpy_helper.from_array(rng.normal(0, np.sqrt(1 / c), (classes, c)).astype(F), "fw"),
        numpy_helper.from_array(np.zeros(classes, F), "fb"),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        inits,
    )
    return _finish(graph)


def conv_data(n: int, seed: int = 1) -> dict[str, npt.NDArray[Any]]:
    return {"x": np.random.default_rng(seed).normal(0, 1, (n, 3, 16, 16)).astype(F)}


def embed_mlp(vocab: int = 512, dim: int = 64, seed: int = 0) -> bytes:
    """ids[N, 8] -> Gather(table) -> ReduceMean -> MatMul: an embedding table plus a MatMul."""
    rng = np.random.default_rng(seed)
    table = rng.normal(0, 1, (vocab, dim)).astype(F)
    w = rng.normal(0, np.sqrt(1 / dim), (dim, dim)).astype(F)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
            helper.make_node("ReduceMean", ["e", "axes"], ["m"], keepdims=0, name="pool"),
            helper.make_node("MatMul", ["m", "w"], ["y"], name="proj"),
        ],
        "embed_mlp",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dim])],
        [
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array([1], np.int64), "axes"),
        ],
    )
    return _finish(graph, opset=18)


def confident(model: bytes, data: dict[str, npt.NDArray[Any]], n: int) -> dict[str, Any]:
    """The first ``n`` samples whose fp32 top-1 decision has a clear margin.

    A trained classifier's decisions have margins; random weights give many
    near-ties (top-2 logits within 1% of the logit spread) that flip under any
    rounding at all, int8 or fp16. Agreement is judged on the rest.
    """
    logits = make_onnx_session(model).run(None, data)[0]
    top2 = np.sort(logits, axis=1)[:, -2:]
    margin = (top2[:, 1] - top2[:, 0]) / logits.std(axis=1)
    keep = np.flatnonzero(margin > 0.1)[:n]
    assert len(keep) == n, f"only {len(keep)} confident samples"
    return {k: v[keep] for k, v in data.items()}


def _build(recipe: Any, model: bytes) -> bytes:
    src = load_source(model)
    built = recipe.build(BuildInput(src, prepare_for_quantization(src)))
    data: bytes = built.model
    return data


def _dq_left_after_load(model: bytes, config: dict[str, str]) -> int:
    """DequantizeLinear nodes in the graph onnxruntime actually runs (its optimised model)."""
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        for k, v in config.items():
            so.add_session_config_entry(k, v)
        ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        opt = onnx.load(str(Path(tmp) / "opt.onnx"))
    return sum(n.op_type == "DequantizeLinear" for n in opt.graph.node)


# --------------------------------------------------------------------------- int8 weight-only
@pytest.mark.parametrize(
    ("model", "data"),
    [(wide_mlp(), mlp_data), (conv_net(), conv_data)],
    ids=["mlp", "conv"],
)
def test_weight_only_int8_is_3_5x_smaller_and_agrees_999(model: bytes, data: Any) -> None:
    # Decisions: top-1 agreement on samples with a clear fp32 decision.
    result = compile_model(
        model,
        SIZE,
        validation=confident(model, data(2500, seed=7), 1000),
        tolerance=0.001,
        recipes=["fp32", "int8-weight-only"],
        **FAST,
    )
    wo = result.report.candidate("int8-weight-only")
    assert wo.size_ratio is not None and 1 / wo.size_ratio >= 3.5, wo.size_ratio
    assert wo.accuracy is not None and wo.accuracy.passed
    assert wo.score is not None and wo.score >= 0.999
    # Values: cosine of the raw logits on every sample, near-ties included.
    cos = compile_model(
        model,
        SIZE,
        validation=data(500, seed=8),
        tolerance=0.001,
        recipes=["fp32", "int8-weight-only"],
        metrics={"logits": "cosine"},
        **FAST,
    ).report.candidate("int8-weight-only")
    assert cos.score is not None and cos.score >= 0.999, cos.score
    assert wo.options["session_config"] == {FOLD: "1"}


def test_weight_only_model_asks_to_be_folded_and_both_sides_honour_it(tmp_path: Path) -> None:
    wo = _build(WeightOnlyInt8Recipe(), conv_net())
    meta = {p.key: p.value for p in onnx.load_model_from_string(wo).metadata_props}
    assert json.loads(meta[ONNX_SESSION_CONFIG_KEY]) == {FOLD: "1"}
    # The compiler times it with the option ...
    session = make_onnx_session(wo)
    assert session.get_session_options().get_session_config_entry(FOLD) == "1"
    # ... and the agent's backend opens it with the option.
    path = tmp_path / "model.onnx"
    path.write_bytes(wo)
    loaded = get_backend("onnxruntime").load(path)
    opts = loaded._session.get_session_options()  # type: ignore[attr-defined]
    assert opts.get_session_config_entry(FOLD) == "1"
    x = conv_data(2)["x"]
    np.testing.assert_allclose(
        loaded.run({"x": x})["logits"], session.run(None, {"x": x})[0], rtol=1e-5, atol=1e-5
    )
    # The fp32 source asks for nothing: it keeps onnxruntime's defaults.
    src_path = tmp_path / "src.onnx"
    src_path.write_bytes(conv_net())
    src = get_backend("onnxruntime").load(src_path)
    src_opts = src._session.get_session_options()  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="does not have configuration"):
        src_opts.get_session_config_entry(FOLD)


def test_with_the_option_onnxruntime_runs_float_kernels_without_dequantize() -> None:
    wo = _build(WeightOnlyInt8Recipe(), conv_net())
    # Default options keep one DequantizeLinear per weight (the slow graph) ...
    assert _dq_left_after_load(wo, {}) >= 3
    # ... the option the model asks for folds them all into float constants.
    assert _dq_left_after_load(wo, {FOLD: "1"}) == 0


def test_weight_only_reaches_weights_inside_if_branches() -> None:
    model = tm.weights_in_branches(features=32, width=64)
    wo = _build(WeightOnlyInt8Recipe(), model)
    proto = onnx.load_model_from_string(wo)
    branch_dq = [
        n
        for node in proto.graph.node
        if node.op_type == "If"
        for attr in node.attribute
        for n in attr.g.node
        if n.op_type == "DequantizeLinear"
    ]
    assert len(branch_dq) == 2
    x = np.random.default_rng(0).normal(0, 1, (4, 32)).astype(F)
    for sr in (16000, 8000):
        feed = {"x": x, "sr": np.array(sr, np.int64)}
        ref = make_onnx_session(model).run(None, feed)[0]
        got = make_onnx_session(wo).run(None, feed)[0]
        assert not np.array_equal(ref, got)  # really quantized
        np.testing.assert_allclose(got, ref, atol=0.05 * float(np.abs(ref).max()))


def test_weight_only_converts_opset_11_and_keeps_the_source_for_fp32() -> None:
    src = tm.opset11_cnn(channels=32)
    result = compile_model(
        src,
        SIZE,
        validation=tm.cnn_data(64, seed=3),
        recipes=["fp32", "int8-weight-only"],
        **FAST,
    )
    wo = result.report.candidate("int8-weight-only")
    assert wo.accuracy is not None and wo.accuracy.passed, wo.reason
    assert any("opset 11" in n for n in wo.notes)
    fp32 = next(v for v in result.chosen if v.name == "fp32")
    assert fp32.model == src


def test_excluded_nodes_keep_their_weights_float() -> None:
    src = load_source(conv_net())
    prepared = prepare_for_quantization(src)
    conv_names = [
        n.name for n in onnx.load_model_from_string(prepared).graph.node if n.op_type == "Conv"
    ]
    built = WeightOnlyInt8Recipe().build(
        BuildInput(src, prepared), nodes_to_exclude=[conv_names[0]]
    )
    proto = onnx.load_model_from_string(built.model)
    dq_outputs = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    first = next(n for n in proto.graph.node if n.name == conv_names[0])
    assert first.input[1] not in dq_outputs
    assert len(dq_outputs) == len(conv_names)  # the other convs + the Gemm


def test_nothing_large_enough_fails_with_a_reason() -> None:
    result = compile_model(
        tm.mlp(width=4, features=4, classes=2),
        SIZE,
        validation=tm.mlp_data(8, features=4),
        recipes=["fp32", "int8-weight-only"],
        **FAST,
    )
    wo = result.report.candidate("int8-weight-only")
    assert wo.status == "failed"
    assert "large enough" in (wo.reason or "")


# --------------------------------------------------------------------------- objectives
def test_size_objective_picks_weight_only_on_a_conv_net() -> None:
    result = compile_model(
        conv_net(),
        SIZE,
        validation=confident(conv_net(), conv_data(500, seed=7), 200),
        tolerance=0.001,
        recipes=["fp32", "fp32-opt", "fp16", "int8-weight-only"],
        latency_iterations=30,
        latency_warmup=2,
    )
    rep = result.report
    wo = rep.candidate("int8-weight-only")
    assert wo.accuracy is not None and wo.accuracy.passed, rep.format_table()
    # The smallest of all that pass the gate ...
    assert all((wo.size_bytes or 0) < (c.size_bytes or 0) for c in rep.candidates if c is not wo)
    assert wo.latency_ratio is not None
    if wo.latency_ratio <= 1.1:
        # ... so chosen, unless the (noisy, shared-machine) timing put it over 1.1x.
        assert result.best.name == "int8-weight-only", rep.format_table()
        assert any(n.startswith("objective size") and "int8-weight-only" in n for n in rep.notes)
        assert wo.reason is not None and wo.reason.startswith("best by size")
    else:
        assert wo.status == "rejected" and "1.1x fp32 latency" in (wo.reason or "")
    for c in rep.candidates:
        if c.status in ("chosen", "eligible"):
            assert c.latency_ratio is not None and c.latency_ratio <= 1.1


def test_latency_objective_never_picks_a_slower_variant() -> None:
    result = compile_model(
        conv_net(),
        AVX2,
        calibration=conv_data(16),
        validation=conv_data(100, seed=7),
        **FAST,
    )
    rep = result.report
    assert rep.profile.objective == "latency"
    assert any(n.startswith("objective latency") for n in rep.notes)
    for c in rep.candidates:
        if c.status in ("chosen", "eligible"):
            assert c.latency_ratio is not None and c.latency_ratio <= 1.0


def _cand(name: str, size: int, ratio: float, *, passed: bool = True) -> CandidateReport:
    from edgefleet.controller.compiler.evaluate import Accuracy, OutputScore

    score = 1.0 if passed else 0.5
    acc = Accuracy(outputs=(OutputScore("y", "cosine", score, score),), threshold=0.99, samples=10)
    return CandidateReport(
        name=name,
        recipe=name,
        precision="int8",
        status="measured",
        size_bytes=size,
        size_ratio=size / 1000,
        accuracy=acc,
        latency=LatencyStats(p50_ms=ratio, p95_ms=ratio, runs=5),
        latency_ratio=ratio,
    )


def test_size_objective_rejects_what_is_over_1_1x_fp32_with_the_reason() -> None:
    cands = [
        _cand("fp32", 1000, 1.0),
        _cand("tiny-slow", 100, 1.3),
        _cand("small-ok", 300, 1.08),
        _cand("tiny-wrong", 50, 2.0, passed=False),
    ]
    out, note = apply_objective(cands, SIZE)
    by = {c.name: c for c in out}
    assert by["tiny-slow"].status == "rejected"
    assert "1.1x fp32 latency" in (by["tiny-slow"].reason or "")
    assert by["small-ok"].status == "measured"
    # A candidate failing the gate keeps that reason: the cap does not hide it.
    assert by["tiny-wrong"].status == "measured"
    assert "1.1" in note
    same, latency_note = apply_objective(cands, AVX2)
    assert same == cands
    assert "never slower than fp32" in latency_note


# --------------------------------------------------------------------------- int4
needs_int4 = pytest.mark.skipif(
    int4_tooling_missing() is not None, reason=str(int4_tooling_missing())
)


@needs_int4
def test_int4_quantizes_matmul_and_gather_smaller_than_int8() -> None:
    model = embed_mlp()
    wo8 = _build(WeightOnlyInt8Recipe(), model)
    int4 = _build(Int4WeightOnlyRecipe(32), model)
    ops = {n.op_type for n in onnx.load_model_from_string(int4).graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops
    assert len(int4) < 0.7 * len(wo8)
    assert len(model) / len(int4) >= 5
    ids = np.random.default_rng(0).integers(0, 512, (4, 8)).astype(np.int64)
    ref = make_onnx_session(model).run(None, {"ids": ids})[0]
    got = make_onnx_session(int4).run(None, {"ids": ids})[0]
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() > 0.98


@needs_int4
def test_int4_block_sizes_are_separate_measured_candidates() -> None:
    result = compile_model(
        wide_mlp(),
        SIZE,
        validation=mlp_data(100, seed=7),
        tolerance=0.5,
        recipes=["fp32", "int4-weight-only-b32", "int4-weight-only-b128"],
        **FAST,
    )
    b32 = result.report.candidate("int4-weight-only-b32")
    b128 = result.report.candidate("int4-weight-only-b128")
    assert b32.size_bytes is not None and b128.size_bytes is not None
    assert b128.size_bytes < b32.size_bytes
    assert b32.options["block_size"] == 32 and b128.options["block_size"] == 128
    assert b32.latency_ratio is not None and b128.latency_ratio is not None


def test_int4_skips_models_without_matmul_or_gather_with_a_reason() -> None:
    src = load_source(conv_net())
    reason = Int4WeightOnlyRecipe(32).skip_reason(SIZE, src)
    assert reason is not None and "MatMul" in reason


def test_validation_loader_still_takes_these_models() -> None:
    # The test models themselves are valid compiler inputs (guards the builders).
    for model, data in ((wide_mlp(), mlp_data(2)), (conv_net(), conv_data(2))):
        assert load_samples(data, load_source(model), role="validation").count == 2


# --------------------------------------------------------------------------- sensitivity
def outlier_mlp(features: int = 64, width: int = 128, seed: int = 0) -> bytes:
    """An MLP whose first weight has one huge row, read by an input that is always tiny.

    Per-channel int8 scales every column of ``w0`` by that outlier, which
    rounds the column's ordinary weights to zero: ``fc0`` is ruined in int8,
    the rest is fine. The fp32 model hardly feels the outlier.
    """
    rng = np.random.default_rng(seed)
    w0 = rng.normal(0, np.sqrt(2 / features), (features, width)).astype(F)
    w0[0, :] = 60.0
    w1 = rng.normal(0, np.sqrt(2 / width), (width, 10)).astype(F)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w0"], ["m0"], name="fc0"),
            helper.make_node("Relu", ["m0"], ["h0"], name="relu0"),
            helper.make_node("MatMul", ["h0", "w1"], ["logits"], name="fc1"),
        ],
        "outlier_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w1, "w1")],
    )
    return _finish(graph)


def outlier_data(n: int, features: int = 64, seed: int = 1) -> dict[str, npt.NDArray[Any]]:
    x = np.random.default_rng(seed).normal(0, 1, (n, features)).astype(F)
    x[:, 0] *= 1e-4
    return {"x": x}


def test_failing_weight_only_is_retried_with_its_most_sensitive_weights_float() -> None:
    result = compile_model(
        outlier_mlp(),
        SIZE,
        calibration=outlier_data(16),
        validation=outlier_data(200, seed=7),
        recipes=["fp32", "int8-weight-only"],
        metrics={"logits": "cosine"},
        tolerance=0.001,
        **FAST,
    )
    rep = result.report
    first = rep.candidate("int8-weight-only")
    assert first.accuracy is not None and not first.accuracy.passed, rep.format_table()
    retry = rep.candidate("int8-weight-only+exclude")
    assert retry.accuracy is not None and retry.accuracy.passed, rep.format_table()
    assert retry.excluded_nodes == ("fc0",)
    assert retry.size_bytes is not None and first.size_bytes is not None
    assert retry.size_bytes > first.size_bytes  # w0 stays fp32: the honest cost


def spread_outlier_model(branches: int = 8, features: int = 64, seed: int = 0) -> bytes:
    """Eight MatMul branches that all int8 ruins (outlier rows), plus a Conv path that is fine.

    Keeping nodes float one by one (1, 2, then 4 more) still leaves a ruined
    branch; keeping the MatMul op type float fixes it and the Conv/Gemm
    weights stay int8.
    """
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    outs = []
    for i in range(branches):
        w = rng.normal(0, np.sqrt(2 / features), (features, 10)).astype(F)
        w[0, :] = 60.0
        inits.append(numpy_helper.from_array(w, f"bw{i}"))
        nodes.append(helper.make_node("MatMul", ["x", f"bw{i}"], [f"bo{i}"], name=f"branch{i}"))
        outs.append(f"bo{i}")
    inits += [
        numpy_helper.from_array(rng.normal(0, 0.3, (32, 3, 3, 3)).astype(F), "cw"),
        numpy_helper.from_array(rng.normal(0, 0.2, (10, 32)).astype(F), "gw"),
    ]
    nodes += [
        helper.make_node("Conv", ["img", "cw"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "gw"], ["head"], transB=1, name="head"),
        helper.make_node("Sum", [*outs, "head"], ["logits"], name="sum"),
    ]
    graph = helper.make_graph(
        nodes,
        "spread_outliers",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features]),
            helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 3, 8, 8]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    return _finish(graph)


def spread_data(n: int, seed: int = 1) -> dict[str, npt.NDArray[Any]]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, 64)).astype(F)
    x[:, 0] *= 1e-4
    return {"x": x, "img": rng.normal(0, 1, (n, 3, 8, 8)).astype(F)}


def test_per_op_type_fallback_after_per_node_attempts_run_out() -> None:
    result = compile_model(
        spread_outlier_model(),
        SIZE,
        calibration=spread_data(16),
        validation=spread_data(100, seed=7),
        recipes=["fp32", "int8-weight-only"],
        metrics={"logits": "cosine"},
        tolerance=0.001,
        sensitivity_attempts=3,
        **FAST,
    )
    rep = result.report
    retry = rep.candidate("int8-weight-only+exclude")
    attempts = retry.attempts
    # Three per-node attempts (1, 3, 7 nodes) fail: one ruined branch is always left.
    assert [len(a.excluded_nodes) for a in attempts[:3]] == [1, 3, 7]
    assert not any(a.passed for a in attempts[:3])
    # Then the op type: every MatMul stays float, and that passes.
    last = attempts[-1]
    assert last.passed, rep.format_table()
    assert {f"branch{i}" for i in range(8)} <= set(last.excluded_nodes)
    assert retry.accuracy is not None and retry.accuracy.passed
    rebuilt = retry_model(spread_outlier_model(), last.excluded_nodes)
    assert hashlib.sha256(rebuilt).hexdigest() == retry.sha256  # the same model
    proto = onnx.load_model_from_string(rebuilt)
    dq_out = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    assert {"cw", "gw"} <= dq_out  # the Conv and Gemm weights are still int8


def retry_model(model: bytes, exclude: Sequence[str]) -> bytes:
    """The weight-only model with ``exclude`` kept float, rebuilt outside the compile."""
    src = load_source(model)
    inp = BuildInput(src, prepare_for_quantization(src))
    data: bytes = WeightOnlyInt8Recipe().build(inp, nodes_to_exclude=exclude).model
    return data
