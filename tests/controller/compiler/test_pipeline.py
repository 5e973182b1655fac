"""compile_model end to end on small models: real quantization, gate, retries, refusals."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgefleet.controller.compiler import (
    BUILTIN_PROFILES,
    BuildInput,
    Built,
    CompileError,
    CompileReport,
    CompileResult,
    DataError,
    NoVariantError,
    Recipe,
    RecipeError,
    SourceModelError,
    ToleranceError,
    compile_model,
)
from edgefleet.controller.compiler.sensitivity import rank_sensitive_nodes
from edgefleet.controller.compiler.source import make_session

from . import models as tm

VNNI = BUILTIN_PROFILES["x86-vnni"]
FAST: dict[str, Any] = {"latency_iterations": 3, "latency_warmup": 1}


def _check_invariants(result: CompileResult) -> None:
    """What must hold for every compile: the gate and the latency rule are never bypassed."""
    rep = result.report
    assert result.chosen
    assert rep.chosen[0] == result.best.name
    for c in rep.candidates:
        if c.status in ("chosen", "eligible"):
            assert c.accuracy is None or c.accuracy.passed
            if rep.profile.objective == "latency":
                assert c.latency_ratio is not None
                assert c.latency_ratio <= 1.0
        if c.accuracy is not None and not c.accuracy.passed:
            assert c.status == "rejected"
    for v in result.chosen:
        assert v.metrics.status in ("chosen", "eligible")
        assert v.sha256 == v.metrics.sha256
        assert v.profile == rep.profile.name


def test_mlp_compiles_and_auto_picks_a_passing_not_slower_candidate() -> None:
    result = compile_model(
        tm.mlp(), VNNI, calibration=tm.mlp_data(16), validation=tm.mlp_data(40, seed=7), **FAST
    )
    _check_invariants(result)
    rep = result.report
    names = {c.name for c in rep.candidates}
    assert {"fp32", "fp32-opt", "fp16", "int8-dynamic", "int8-static-pc-minmax"} <= names
    built = [c for c in rep.candidates if c.status != "skipped"]
    assert all(c.status != "failed" for c in built), [c.reason for c in built]
    int8 = [c for c in built if c.precision == "int8"]
    assert int8
    assert all(c.size_ratio is not None and c.size_ratio < 0.7 for c in int8)
    assert all(c.latency is not None for c in built)
    assert rep.baseline_latency is not None
    assert rep.latency_config["interleaved"]
    assert rep.verified
    assert rep.validation_samples == 40
    # the chosen model really runs and matches fp32 on a fresh input
    x = tm.mlp_data(1, seed=99)
    ref = make_session(tm.mlp()).run(None, x)[0]
    got = make_session(result.best.model).run(None, x)[0]
    assert np.argmax(ref) == np.argmax(got)
    assert CompileReport.from_dict(rep.to_dict()) == rep


def test_cnn_gets_static_int8_and_no_dynamic() -> None:
    result = compile_model(
        tm.cnn(), VNNI, calibration=tm.cnn_data(8), validation=tm.cnn_data(20, seed=3), **FAST
    )
    _check_invariants(result)
    rep = result.report
    assert rep.source["kind"] == "cnn"
    assert rep.candidate("int8-dynamic").status == "skipped"
    static = rep.candidate("int8-static-pc-minmax")
    assert static.status != "failed"
    assert static.accuracy is not None


def test_multi_input_model_with_int64_ids() -> None:
    result = compile_model(
        tm.embed_model(),
        VNNI,
        calibration=tm.embed_data(16),
        validation=tm.embed_data(30, seed=4),
        metrics={"out": "cosine"},
        **FAST,
    )
    _check_invariants(result)
    dyn = result.report.candidate("int8-dynamic")
    assert dyn.status != "failed"
    assert dyn.accuracy is not None
    assert dyn.accuracy.outputs[0].metric == "cosine"


def test_dynamic_axes_without_a_batch_axis() -> None:
    data = {"x": np.random.default_rng(0).normal(size=(12, 7, 16)).astype(np.float32)}
    result = compile_model(tm.dynamic_regressor(), VNNI, calibration=data, validation=data, **FAST)
    _check_invariants(result)
    c = result.report.candidate("int8-static-pc-minmax")
    assert c.accuracy is not None
    assert c.accuracy.outputs[0].metric == "cosine"
    assert any("Tanh" in n for n in c.notes)


class _Shortcut(Recipe):
    """A 'variant' that is tiny and fast because it is wrong: one small random MatMul."""

    name = "int8-shortcut"
    precision = "int8"
    description = "wrong on purpose"

    def build(self, inp: BuildInput, *, nodes_to_exclude: Sequence[str] = ()) -> Built:
        w = np.random.default_rng(1).normal(size=(32, 10)).astype(np.float32)
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["logits"], name="mm")],
            "shortcut",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
            [onnx.numpy_helper.from_array(w, "w")],
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 9
        return Built(m.SerializeToString())


class _Exploding(Recipe):
    name = "exploding"
    precision = "int8"

    def build(self, inp: BuildInput, *, nodes_to_exclude: Sequence[str] = ()) -> Built:
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : quantizer blew up")


class _Unloadable(Recipe):
    name = "unloadable"
    precision = "fp32"

    def build(self, inp: BuildInput, *, nodes_to_exclude: Sequence[str] = ()) -> Built:
        m = onnx.load_model_from_string(inp.source.data)
        m.graph.node[0].op_type = "NoSuchOp"
        return Built(m.SerializeToString())


def test_a_wrong_but_fast_candidate_fails_the_gate_and_is_not_chosen() -> None:
    result = compile_model(
        tm.mlp(),
        VNNI,
        validation=tm.mlp_data(40, seed=7),
        recipes=["fp32", _Shortcut()],
        **FAST,
    )
    shortcut = result.report.candidate("int8-shortcut")
    assert shortcut.status == "rejected"
    assert "accuracy gate" in shortcut.reason
    assert shortcut.size_ratio is not None
    assert shortcut.size_ratio < 0.2
    assert result.best.name == "fp32"
    assert all(v.name != "int8-shortcut" for v in result.chosen)


def test_recipe_failures_are_recorded_and_compilation_continues() -> None:
    result = compile_model(
        tm.mlp(),
        VNNI,
        validation=tm.mlp_data(20, seed=7),
        recipes=["fp32", _Exploding(), _Unloadable(), "int8-dynamic"],
        **FAST,
    )
    rep = result.report
    boom = rep.candidate("exploding")
    assert boom.status == "failed"
    assert "quantizer blew up" in boom.reason
    assert "RuntimeError" in boom.reason
    bad = rep.candidate("unloadable")
    assert bad.status == "failed"
    assert "onnxruntime cannot load it" in bad.reason
    assert rep.candidate("int8-dynamic").status in ("chosen", "eligible", "rejected")
    _check_invariants(result)
    assert "failed" in rep.format_table()


def test_shape_inference_failure_fails_only_the_recipes_needing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise onnx.shape_inference.InferenceError("[ShapeInferenceError] rank mismatch")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", broken)
    result = compile_model(tm.mlp(), VNNI, validation=tm.mlp_data(10, seed=7), **FAST)
    rep = result.report
    for name in ("fp32-opt", "fp16", "int8-dynamic"):
        c = rep.candidate(name)
        assert c.status == "failed"
        assert "shape inference failed" in c.reason
    assert result.best.name == "fp32"
    assert any("pre-processing failed" in n for n in rep.notes)


def test_without_validation_accuracy_is_unverified() -> None:
    result = compile_model(tm.mlp(), VNNI, calibration=tm.mlp_data(8), **FAST)
    rep = result.report
    assert not rep.verified
    assert rep.validation_samples == 0
    assert all(c.accuracy is None for c in rep.candidates)
    assert not result.best.verified
    assert "UNVERIFIED" in result.best.metrics.reason
    assert "UNVERIFIED" in rep.format_table()
    assert rep.latency_config["input"] == "calibration sample 0"
    # with no data at all, latency still runs on a synthetic input and static int8 is skipped
    bare = compile_model(tm.mlp(), VNNI, **FAST).report
    assert bare.latency_config["input"].startswith("synthetic")
    assert "calibration" in bare.candidate("int8-static-pc-minmax").reason


def test_sensitive_nodes_are_excluded_and_retried_when_static_int8_fails() -> None:
    x = {"x": np.random.default_rng(3).normal(size=(24, 16)).astype(np.float32)}
    val = {"x": np.random.default_rng(4).normal(size=(24, 16)).astype(np.float32)}
    result = compile_model(
        tm.wide_range_mlp(),
        VNNI,
        calibration=x,
        validation=val,
        metrics={"y": "cosine"},
        recipes=["fp32", "int8-static-pc-minmax", "int8-static-pt-minmax"],
        **FAST,
    )
    rep = result.report
    for name in ("int8-static-pc-minmax", "int8-static-pt-minmax"):
        assert rep.candidate(name).status == "rejected"
    retry = next(c for c in rep.candidates if c.name.endswith("+exclude"))
    assert retry.excluded_nodes
    assert set(retry.excluded_nodes) <= {"wide", "narrow", "head"}
    assert 1 <= len(retry.attempts) <= 3
    assert retry.attempts[-1].passed
    assert retry.accuracy is not None
    assert retry.accuracy.passed
    assert retry.attempts[0].sensitive, "the ranking behind the first exclusion is recorded"
    assert retry.options["nodes_to_exclude"] == list(retry.excluded_nodes)
    assert "kept in float" in rep.format_table()
    _check_invariants(result)
    # with retries disabled nothing is excluded
    again = compile_model(
        tm.wide_range_mlp(),
        VNNI,
        calibration=x,
        validation=val,
        metrics={"y": "cosine"},
        recipes=["fp32", "int8-static-pc-minmax"],
        sensitivity_attempts=0,
        **FAST,
    )
    assert not any(c.name.endswith("+exclude") for c in again.report.candidates)


def test_sensitivity_ranking_blames_the_node_reading_the_wide_activation() -> None:
    from edgefleet.controller.compiler import load_samples, load_source
    from edgefleet.controller.compiler.recipes import StaticInt8Recipe, prepare_for_quantization

    src = load_source(tm.wide_range_mlp())
    cal = load_samples(
        {"x": np.random.default_rng(3).normal(size=(16, 16)).astype(np.float32)},
        src,
        role="calibration",
    )
    prepared = prepare_for_quantization(src)
    recipe = StaticInt8Recipe(VNNI, per_channel=False, method="minmax")
    quant = recipe.build(BuildInput(src, prepared, None, cal)).model
    ranking = rank_sensitive_nodes(prepared, quant, cal, quantizable=recipe.quantizable_ops())
    assert ranking[0].node == "narrow"
    assert ranking[0].added > 0.5 > ranking[-1].added


def test_unmeetable_tolerance_names_the_closest_candidates() -> None:
    int8_only = dataclasses.replace(VNNI, name="int8-only", precisions=("int8",))
    val = {"x": np.random.default_rng(4).normal(size=(16, 16)).astype(np.float32)}
    with pytest.raises(ToleranceError, match=r"no candidate meets tolerance 0.*closest: ") as info:
        compile_model(
            tm.wide_range_mlp(),
            int8_only,
            calibration=val,
            validation=val,
            tolerance=0.0,
            metrics={"y": "cosine"},
            sensitivity_attempts=0,
            **FAST,
        )
    err = info.value
    assert 1 <= len(err.closest) <= 3
    scores = [s for _, s in err.closest]
    assert scores == sorted(scores, reverse=True)
    assert err.report is not None
    assert not err.report.chosen
    assert err.closest[0][0] in str(err)


def test_nothing_fits_the_budget_is_a_no_variant_error() -> None:
    tiny = dataclasses.replace(VNNI, name="tiny", max_bundle_bytes=100)
    with pytest.raises(NoVariantError, match="max_bundle_bytes") as info:
        compile_model(tm.mlp(), tiny, validation=tm.mlp_data(10), recipes=["fp32"], **FAST)
    assert not isinstance(info.value, ToleranceError)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"tolerance": 1.5}, CompileError, "tolerance must be"),
        ({"tolerance": float("nan")}, CompileError, "tolerance must be"),
        ({"recipes": ["int3-magic"]}, CompileError, "unknown recipe 'int3-magic'"),
        ({"metrics": {"nope": "top1"}}, CompileError, "unknown output"),
        ({"metrics": {"logits": "f1"}}, CompileError, "must be one of"),
        ({"validation": {"x": np.zeros((2, 31), np.float32)}}, DataError, "axis 1 must be 32"),
        ({"calibration": {"y": np.zeros((2, 32), np.float32)}}, DataError, "missing array"),
    ],
)
def test_bad_jobs_are_refused_before_any_work(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        compile_model(tm.mlp(), VNNI, **{**FAST, **kwargs})


def test_bad_sources_and_runtimes(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n not a model")
    with pytest.raises(SourceModelError, match="not an ONNX model"):
        compile_model(junk, VNNI, **FAST)
    tflite = dataclasses.replace(VNNI, name="micro", runtime="tflite")
    with pytest.raises(CompileError, match="targets tflite"):
        compile_model(tm.mlp(), tflite, **FAST)


def test_recipe_error_is_a_compile_error() -> None:
    assert issubclass(RecipeError, CompileError)
    assert issubclass(ToleranceError, NoVariantError)


def test_dynamic_int8_keeps_the_matmul_reading_outlier_activations_in_float() -> None:
    """Plain dynamic int8 fails the gate on an encoder block; the fallback names ``ffn_out``."""
    result = compile_model(
        tm.outlier_encoder(),
        VNNI,
        calibration=tm.outlier_encoder_data(16, seed=1),
        validation=tm.outlier_encoder_data(24, seed=2),
        metrics={"y": "cosine"},
        recipes=["fp32", "int8-dynamic"],
        **FAST,
    )
    rep = result.report
    plain = rep.candidate("int8-dynamic")
    assert plain.accuracy is not None
    assert not plain.accuracy.passed
    retry = rep.candidate("int8-dynamic+exclude")
    assert retry.excluded_nodes == ("ffn_out",)
    assert retry.accuracy is not None
    assert retry.accuracy.passed
    assert retry.options["nodes_to_exclude"] == ["ffn_out"]
    first = retry.attempts[0]
    assert first.passed
    assert first.sensitive[0].node == "ffn_out"
    assert first.sensitive[0].added > 10 * first.sensitive[1].added
    table = rep.format_table()
    assert "newly kept float: ffn_out (MatMul, adds" in table
    # The retry is a real int8 model: every other weight MatMul is still quantized.
    from edgefleet.controller.compiler import load_source
    from edgefleet.controller.compiler.recipes import DynamicInt8Recipe, prepare_for_quantization

    src = load_source(tm.outlier_encoder())
    rebuilt = DynamicInt8Recipe(VNNI).build(
        BuildInput(src, prepare_for_quantization(src), None, None),
        nodes_to_exclude=retry.excluded_nodes,
    )
    graph = onnx.load_model_from_string(rebuilt.model).graph
    integer = {n.name for n in graph.node if n.op_type == "MatMulInteger"}
    kept = ("attn_q", "attn_k", "attn_v", "attn_out", "ffn_in", "head")
    assert integer == {f"{n}_quant" for n in kept}
    assert "ffn_out" in {n.name for n in graph.node if n.op_type == "MatMul"}
    _check_invariants(result)


def test_dynamic_sensitivity_ranking_blames_the_replaced_node() -> None:
    """Dynamic int8 renames the MatMuls it replaces; the ranking still finds them by output."""
    from edgefleet.controller.compiler import load_samples, load_source
    from edgefleet.controller.compiler.recipes import DynamicInt8Recipe, prepare_for_quantization

    src = load_source(tm.outlier_encoder())
    cal = load_samples(tm.outlier_encoder_data(16, seed=1), src, role="calibration")
    prepared = prepare_for_quantization(src)
    recipe = DynamicInt8Recipe(VNNI)
    quant = recipe.build(BuildInput(src, prepared, None, None)).model
    ranking = rank_sensitive_nodes(prepared, quant, cal, quantizable=recipe.quantizable_ops())
    assert {s.node for s in ranking} == {
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_out",
        "ffn_in",
        "ffn_out",
        "head",
    }
    assert ranking[0].node == "ffn_out"
    assert ranking[0].op_type == "MatMul"


def test_dynamic_fallback_stops_before_half_of_the_int8_nodes_are_float() -> None:
    """The speed-up of dynamic int8 is its MatMuls: the retries keep at most half of them float."""
    x = {"x": np.random.default_rng(3).normal(size=(24, 16)).astype(np.float32)}
    val = {"x": np.random.default_rng(4).normal(size=(24, 16)).astype(np.float32)}
    rep = compile_model(
        tm.wide_range_mlp(),
        VNNI,
        calibration=x,
        validation=val,
        metrics={"y": "cosine"},
        recipes=["fp32", "int8-dynamic"],
        **FAST,
    ).report
    retry = rep.candidate("int8-dynamic+exclude")
    # three weight MatMuls: at most one may fall back
    assert len(retry.excluded_nodes) == 1
    assert len(retry.attempts) == 1
    assert retry.accuracy is not None
    assert not retry.accuracy.passed
    assert any("stopped after keeping 1 of 3 quantizable nodes" in n for n in rep.notes)


def test_per_channel_dynamic_int8_is_a_default_recipe_built_only_when_per_tensor_fails() -> None:
    """Per-channel dynamic int8 only changes accuracy: skipped once per-tensor passes."""
    passing = compile_model(
        tm.mlp(),
        VNNI,
        validation=tm.mlp_data(24, seed=7),
        metrics={"logits": "cosine"},
        recipes=["fp32", "int8-dynamic", "int8-dynamic-pc"],
        **FAST,
    ).report
    assert passing.candidate("int8-dynamic").accuracy is not None
    assert passing.candidate("int8-dynamic").accuracy.passed
    pc = passing.candidate("int8-dynamic-pc")
    assert pc.status == "skipped"
    assert "int8-dynamic already passes" in pc.reason
    assert not any(c.name.endswith("+exclude") for c in passing.candidates)
    # when per-tensor fails, per-channel is built (and the fallback retries the closer one)
    failing = compile_model(
        tm.outlier_encoder(),
        VNNI,
        calibration=tm.outlier_encoder_data(16, seed=1),
        validation=tm.outlier_encoder_data(24, seed=2),
        metrics={"y": "cosine"},
        **FAST,
    ).report
    built = failing.candidate("int8-dynamic-pc")
    assert built.status != "skipped"
    assert built.options["per_channel"] is True
    assert built.accuracy is not None
    fallback = [
        c
        for c in failing.candidates
        if c.name.startswith("int8-dynamic") and c.name.endswith("+exclude")
    ]
    assert len(fallback) == 1
    assert fallback[0].excluded_nodes == ("ffn_out",)


def test_validation_runs_in_batches_when_every_axis_0_is_a_dynamic_batch() -> None:
    """Batched scoring gives the same verdicts as one sample per call, and says so."""
    val = tm.mlp_data(24, seed=7)
    rep = compile_model(
        tm.mlp(), VNNI, validation=val, recipes=["fp32", "fp32-opt", "int8-dynamic"], **FAST
    ).report
    assert any("validation runs 8 samples per call" in n for n in rep.notes)
    assert rep.candidate("fp32-opt").score == pytest.approx(1.0)
    # the same candidates scored one by one (a batch-of-one profile of the data) agree
    from edgefleet.controller.compiler import load_samples, load_source
    from edgefleet.controller.compiler.evaluate import run_samples

    src = load_source(tm.mlp())
    samples = load_samples(val, src, role="validation")
    sess = make_session(tm.mlp())
    one = run_samples(sess, samples, ["logits"])
    many = run_samples(sess, samples, ["logits"], batch=5)
    assert len(one) == len(many) == 24
    for a, b in zip(one, many, strict=True):
        assert a[0].shape == b[0].shape == (1, 10)
        np.testing.assert_allclose(a[0], b[0], rtol=1e-4, atol=1e-5)


def test_a_model_mixing_the_batch_is_scored_one_sample_per_call() -> None:
    rep = compile_model(
        tm.batch_mixing(),
        VNNI,
        validation={"x": np.random.default_rng(5).normal(size=(16, 8)).astype(np.float32)},
        metrics={"y": "cosine"},
        recipes=["fp32", "fp32-opt"],
        **FAST,
    ).report
    assert any("batched outputs differ" in n or "batch differ" in n for n in rep.notes)
    assert not any("samples per call (every input" in n for n in rep.notes)
    opt = rep.candidate("fp32-opt")
    assert opt.accuracy is not None
    assert opt.accuracy.passed
    assert opt.score == pytest.approx(1.0, abs=1e-5)


def test_batched_run_refuses_an_output_without_a_batch_axis() -> None:
    from edgefleet.controller.compiler import load_samples, load_source
    from edgefleet.controller.compiler.evaluate import run_samples

    # ReduceMean over axis 0 without keepdims: one row for the whole batch
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    node = helper.make_node("ReduceMean", ["x"], ["y"], axes=[0], keepdims=0)
    graph = helper.make_graph([node], "pool_batch", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    data = model.SerializeToString()
    src = load_source(data)
    samples = load_samples({"x": np.ones((6, 4), np.float32)}, src, role="validation")
    with pytest.raises(ValueError, match="axis 0 is not the batch axis"):
        run_samples(make_session(data), samples, ["y"], batch=3)
