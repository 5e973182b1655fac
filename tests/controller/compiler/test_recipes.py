"""Each recipe builds a model onnxruntime runs, configured for the profile; skips say why."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import pytest

from edgefleet.controller.compiler import (
    BUILTIN_PROFILES,
    BuildInput,
    Recipe,
    RecipeError,
    default_recipes,
    load_samples,
    load_source,
)
from edgefleet.controller.compiler.recipes import (
    DynamicInt8Recipe,
    Float16Recipe,
    OptimizedFp32Recipe,
    StaticInt8Recipe,
    prepare_for_quantization,
)
from edgefleet.controller.compiler.source import make_session

from . import models as tm

VNNI = BUILTIN_PROFILES["x86-vnni"]
AVX2 = BUILTIN_PROFILES["x86-avx2"]


def _input(model: bytes, data: Callable[[int], dict[str, Any]]) -> BuildInput:
    src = load_source(model)
    cal = load_samples(data(8), src, role="calibration")
    return BuildInput(src, prepare_for_quantization(src), None, cal)


def _ops(model: bytes) -> set[str]:
    return {n.op_type for n in onnx.load_model_from_string(model).graph.node}


@pytest.fixture(scope="module")
def mlp_input() -> BuildInput:
    return _input(tm.mlp(), tm.mlp_data)


@pytest.fixture(scope="module")
def cnn_input() -> BuildInput:
    return _input(tm.cnn(), tm.cnn_data)


def _runs_like_source(inp: BuildInput, model: bytes, feed: dict[str, Any]) -> None:
    ref = make_session(inp.source.data).run(None, feed)
    got = make_session(model).run(None, feed)
    assert [g.shape for g in got] == [r.shape for r in ref]
    assert all(g.dtype == r.dtype for g, r in zip(got, ref, strict=True))
    assert all(np.all(np.isfinite(g)) for g in got)


@pytest.mark.parametrize("name", [r.name for r in default_recipes(VNNI)])
def test_every_recipe_builds_a_runnable_model_for_the_mlp(mlp_input: BuildInput, name: str) -> None:
    recipe = next(r for r in default_recipes(VNNI) if r.name == name)
    assert recipe.applies_to(VNNI, mlp_input.source)
    built = recipe.build(mlp_input)
    _runs_like_source(mlp_input, built.model, tm.mlp_data(2, seed=9))
    if recipe.precision == "int8":
        # Weight-only int8 stores weights behind DequantizeLinear only.
        quantized = {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger"}
        if recipe.name == "int8-weight-only":
            quantized = {"DequantizeLinear"}
        assert _ops(built.model) & quantized
    if recipe.precision == "fp16":
        inits = onnx.load_model_from_string(built.model).graph.initializer
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in inits)


def test_static_recipes_quantize_the_cnn(cnn_input: BuildInput) -> None:
    for recipe in default_recipes(VNNI):
        if not isinstance(recipe, StaticInt8Recipe):
            continue
        built = recipe.build(cnn_input)
        _runs_like_source(cnn_input, built.model, tm.cnn_data(1, seed=3))
        assert "QuantizeLinear" in _ops(built.model)
        assert built.options["calibration"] == recipe.method


def test_dynamic_is_skipped_for_conv_nets_and_static_for_transformers() -> None:
    cnn = load_source(tm.cnn())
    dyn = DynamicInt8Recipe(VNNI)
    reason = dyn.skip_reason(VNNI, cnn)
    assert reason is not None
    assert "static quantization for CNNs" in reason
    static = StaticInt8Recipe(VNNI, per_channel=True, method="minmax")
    assert static.applies_to(VNNI, cnn)
    assert "calibration" in (static.skip_reason(VNNI, cnn, has_calibration=False) or "")
    generic = BUILTIN_PROFILES["generic"]
    assert "does not allow int8" in (static.skip_reason(generic, cnn) or "")
    assert "does not allow fp16" in (Float16Recipe().skip_reason(generic, cnn) or "")


def test_profile_without_vnni_gets_reduce_range_and_uint8_activations(
    cnn_input: BuildInput,
) -> None:
    recipe = StaticInt8Recipe(AVX2, per_channel=True, method="minmax")
    assert recipe.options()["reduce_range"] is True
    assert recipe.options()["activation_type"] == "uint8"
    built = recipe.build(cnn_input)
    model = onnx.load_model_from_string(built.model)
    zps = {i.name: i.data_type for i in model.graph.initializer}
    act_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in zps]
    assert act_q
    assert all(zps[n.input[2]] == onnx.TensorProto.UINT8 for n in act_q)
    vnni = StaticInt8Recipe(VNNI, per_channel=True, method="minmax")
    assert vnni.options()["reduce_range"] is False
    assert vnni.options()["activation_type"] == "int8"


def test_optimized_fp32_keeps_outputs(mlp_input: BuildInput) -> None:
    built = OptimizedFp32Recipe().build(mlp_input)
    assert built.options["optimization"] in ("extended", "basic")
    feed = tm.mlp_data(3, seed=4)
    ref = make_session(mlp_input.source.data).run(None, feed)[0]
    got = make_session(built.model).run(None, feed)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_unsupported_op_stays_float_and_the_note_says_so() -> None:
    inp = _input(tm.dynamic_regressor(), lambda n: {"x": np.ones((n, 5, 16), np.float32)})
    built = StaticInt8Recipe(VNNI, per_channel=False, method="minmax").build(inp)
    assert any("stays float: Tanh" in n for n in built.notes)
    assert "Tanh" in _ops(built.model)


def test_quantizer_failure_falls_back_to_core_ops(
    mlp_input: BuildInput, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime.quantization as q

    real = q.quantize_static
    calls: list[Any] = []

    def flaky(*args: Any, **kwargs: Any) -> None:
        calls.append(kwargs.get("op_types_to_quantize"))
        if kwargs.get("op_types_to_quantize") is None:
            raise ValueError("cannot quantize Relu here")
        real(*args, **kwargs)

    monkeypatch.setattr(q, "quantize_static", flaky)
    built = StaticInt8Recipe(VNNI, per_channel=True, method="minmax").build(mlp_input)
    assert calls[0] is None
    assert set(calls[1]) <= {"Conv", "MatMul", "Gemm"}
    assert any("retried with only" in n for n in built.notes)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise ValueError("quantizer exploded")

    monkeypatch.setattr(q, "quantize_static", broken)
    with pytest.raises(RecipeError, match=r"quantizer exploded.*also failed"):
        StaticInt8Recipe(VNNI, per_channel=True, method="minmax").build(mlp_input)


def test_missing_preprocessing_is_a_recipe_error() -> None:
    src = load_source(tm.mlp())
    inp = BuildInput(src, None, "shape inference failed: boom", None)
    with pytest.raises(RecipeError, match="pre-processing failed: shape inference failed"):
        DynamicInt8Recipe(VNNI).build(inp)


def test_recipe_is_an_abstract_interface() -> None:
    with pytest.raises(TypeError):
        Recipe()  # type: ignore[abstract]


def _prob_data(n: int) -> dict[str, Any]:
    return {"x": np.random.default_rng(n).normal(0, 1, (n, 16)).astype(np.float32)}


@pytest.mark.parametrize(
    ("model", "data"),
    [(tm.prob_output, _prob_data), (tm.mlp, tm.mlp_data), (tm.cnn, tm.cnn_data)],
)
def test_fp16_builds_a_graph_the_onnx_checker_accepts(
    model: Callable[[], bytes], data: Callable[[int], dict[str, Any]]
) -> None:
    """The fp16 converter appends its I/O Casts after their readers; the build sorts them.

    A graph out of topological order runs in onnxruntime (it sorts for itself)
    but fails ``onnx.checker``, and with it bundle validation on register.
    """
    built = Float16Recipe().build(_input(model(), data))
    onnx.checker.check_model(onnx.load_model_from_string(built.model), full_check=True)
    assert "Cast" in _ops(built.model)
