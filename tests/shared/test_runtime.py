"""Tests for the runtime backend interface, the onnxruntime backend and input coercion.

The model builders here (``affine_model_bytes`` and friends) are also used by
the unpack and serving tests.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgefleet.protocols.bundle import TensorSpec
from edgefleet.protocols.errors import (
    AgentError,
    ConfigError,
    ModelLoadError,
    UnsupportedRuntimeError,
)
from edgefleet.shared import runtime
from edgefleet.shared.runtime import (
    InferenceError,
    InferenceInputError,
    OnnxRuntimeBackend,
    available_runtimes,
    coerce_inputs,
    get_backend,
)

OPSET = 17


def _model(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


def affine_model_bytes(scale: float = 2.0, bias: float = 1.0, features: int = 3) -> bytes:
    """``y = x * scale + bias`` for ``x: float32[batch, features]``."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "scale"], ["scaled"]),
            helper.make_node("Add", ["scaled", "bias"], ["y"]),
        ],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", features])],
        [
            helper.make_tensor("scale", TensorProto.FLOAT, [], [scale]),
            helper.make_tensor("bias", TensorProto.FLOAT, [], [bias]),
        ],
    )
    return _model(graph)


def affine(x: np.ndarray, scale: float = 2.0, bias: float = 1.0) -> np.ndarray:
    """What :func:`affine_model_bytes` computes, in numpy."""
    y: np.ndarray = (x * np.float32(scale) + np.float32(bias)).astype(np.float32)
    return y


def write_affine_model(directory: Path, **kwargs: Any) -> Path:
    path = directory / "model.onnx"
    path.write_bytes(affine_model_bytes(**kwargs))
    return path


def _two_input_model() -> bytes:
    """``y = x * float(k)`` for ``x: float32[batch, 2]``, ``k: int64[1]``."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["x", "kf"], ["y"]),
        ],
        "two_inputs",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2]),
            helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
    )
    return _model(graph)


def _reshape_model() -> bytes:
    """Reshapes ``x: float32[n]`` to ``[2, 2]``: fails inside onnxruntime unless n == 4."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [2, 2])],
    )
    return _model(graph)


def _string_model() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"])],
        "strings",
        [helper.make_tensor_value_info("s", TensorProto.STRING, [1])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, [1])],
    )
    return _model(graph)


def _load(tmp_path: Path, data: bytes, threads: int = 1) -> runtime.LoadedModel:
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    return OnnxRuntimeBackend(threads=threads).load(path)


# --------------------------------------------------------------------------- backend
def test_onnx_backend_runs_model_and_reports_io(tmp_path: Path) -> None:
    model = get_backend("onnxruntime").load(write_affine_model(tmp_path))
    assert model.inputs == (TensorSpec("x", "float32", (None, 3)),)
    assert model.outputs == (TensorSpec("y", "float32", (None, 3)),)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = model.run({"x": x})
    assert set(out) == {"y"}
    np.testing.assert_array_equal(out["y"], affine(x))
    assert out["y"].dtype == np.float32


def test_onnx_backend_session_options_save_cpu(tmp_path: Path) -> None:
    model = _load(tmp_path, affine_model_bytes(), threads=2)
    options = model._session.get_session_options()  # type: ignore[attr-defined]
    assert options.intra_op_num_threads == 2
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert model._session.get_providers() == ["CPUExecutionProvider"]  # type: ignore[attr-defined]


def test_run_validates_names_dtypes_ranks_and_dims(tmp_path: Path) -> None:
    model = _load(tmp_path, _two_input_model())
    x = np.ones((3, 2), np.float32)
    k = np.array([3], np.int64)
    np.testing.assert_array_equal(model.run({"x": x, "k": k})["y"], x * 3)

    cases: list[tuple[dict[str, Any], str]] = [
        ({"x": x}, "missing input(s) 'k'"),
        ({"x": x, "k": k, "z": k}, "unknown input(s) 'z'"),
        ({"x": x.astype(np.float64), "k": k}, "'x' must have dtype float32, got float64"),
        ({"x": x, "k": k.astype(np.int32)}, "'k' must have dtype int64, got int32"),
        ({"x": x.reshape(6), "k": k}, "'x' must have rank 2"),
        ({"x": np.ones((3, 4), np.float32), "k": k}, "'x' must have size 2 on axis 1"),
        ({"x": x.tolist(), "k": k}, "'x' must be a numpy array"),
    ]
    for feeds, message in cases:
        with pytest.raises(InferenceInputError) as info:
            model.run(feeds)
        assert message in str(info.value)


def test_runtime_failure_is_inference_error(tmp_path: Path) -> None:
    model = _load(tmp_path, _reshape_model())
    assert model.run({"x": np.ones(4, np.float32)})["y"].shape == (2, 2)
    with pytest.raises(InferenceError, match="onnxruntime failed"):
        model.run({"x": np.ones(3, np.float32)})


def test_run_is_safe_from_many_threads(tmp_path: Path) -> None:
    model = _load(tmp_path, affine_model_bytes())
    errors: list[str] = []

    def worker(i: int) -> None:
        x = np.full((4, 3), i, np.float32)
        for _ in range(20):
            if not np.array_equal(model.run({"x": x})["y"], affine(x)):
                errors.append(f"thread {i} got a wrong answer")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"this is not a protobuf", "cannot load m.onnx"), (None, "does not exist")],
)
def test_load_failures_are_model_load_errors(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "m.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        OnnxRuntimeBackend().load(path)


def test_model_with_unservable_types_is_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"input 's' has unsupported type tensor\(string\)"):
        _load(tmp_path, _string_model())


# --------------------------------------------------------------------------- registry
def test_get_backend_names() -> None:
    backend = get_backend("onnxruntime", threads=3)
    assert backend.name == "onnxruntime"
    assert isinstance(backend, OnnxRuntimeBackend)
    assert backend.threads == 3
    with pytest.raises(UnsupportedRuntimeError, match="unknown runtime 'tensorrt'"):
        get_backend("tensorrt")
    with pytest.raises(ConfigError, match="threads"):
        get_backend("onnxruntime", threads=0)


def test_available_runtimes_follow_installed_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    litert = importlib.util.find_spec("ai_edge_litert") is not None
    assert available_runtimes() == ("onnxruntime", "tflite") if litert else ("onnxruntime",)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert available_runtimes() == ()
    with pytest.raises(UnsupportedRuntimeError, match="not installed"):
        get_backend("onnxruntime")


def test_input_error_is_value_error_and_agent_error() -> None:
    err = InferenceInputError("x")
    assert isinstance(err, ValueError)
    assert isinstance(err, AgentError)
    assert err.code == "bad_input"
    assert InferenceError.code == "inference_failed"


# --------------------------------------------------------------------------- coerce_inputs
X = TensorSpec("x", "float32", (None, 3))
K = TensorSpec("k", "int8", (2,))
B = TensorSpec("b", "bool", ())
H = TensorSpec("h", "float16", (None,))


def test_coerce_converts_nested_lists_to_spec_dtype() -> None:
    out = coerce_inputs({"x": [[1, 2.5, 3], [4, 5, 6]], "k": [-128, 127], "b": True}, [X, K, B])
    assert out["x"].dtype == np.float32
    np.testing.assert_array_equal(out["x"], np.array([[1, 2.5, 3], [4, 5, 6]], np.float32))
    assert out["k"].dtype == np.int8
    assert out["k"].tolist() == [-128, 127]
    assert out["b"].dtype == np.bool_
    assert out["b"].shape == ()
    assert out["x"].flags.c_contiguous


def test_coerce_accepts_empty_batch() -> None:
    out = coerce_inputs({"x": [], "h": []}, [TensorSpec("x", "float32", (None,)), H])
    assert out["x"].shape == (0,)
    assert out["x"].dtype == np.float32
    assert out["h"].dtype == np.float16


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"x": [[1, 2, 3], [4, 5]]}, "not a rectangular nested list"),
        ({"x": [1, 2, 3]}, "must have rank 2"),
        ({"x": [[1, 2]]}, "must have size 3 on axis 1"),
        ({"x": [["1", "2", "3"]]}, "must hold numbers (float32), got strings"),
        ({"x": [[True, False, True]]}, "must hold numbers (float32), got booleans"),
        ({"x": [[1, None, 3]]}, "not numbers"),
        ({"x": [[1, float("nan"), 3]]}, "NaN or infinite"),
        ({"x": [[1, float("inf"), 3]]}, "NaN or infinite"),
        ({"x": [[1, 2**70, 3]]}, "not numbers"),
        ({"x": [[1, 2, 3]], "y": [1]}, "unknown input(s) 'y'"),
        ({}, "missing input(s) 'x'"),
    ],
)
def test_coerce_refuses_bad_float_inputs(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(InferenceInputError) as info:
        coerce_inputs(raw, [X])
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([1.0, 2.0], "must hold integers (int8), got floats"),
        ([1, 300], "outside the int8 range [-128, 127]"),
        ([-129, 0], "outside the int8 range"),
        ([True, False], "must hold integers (int8), got booleans"),
    ],
)
def test_coerce_refuses_bad_integer_inputs(value: list[Any], message: str) -> None:
    with pytest.raises(InferenceInputError) as info:
        coerce_inputs({"k": value}, [K])
    assert message in str(info.value)


def test_coerce_refuses_numbers_for_bool_and_overflowing_float16() -> None:
    with pytest.raises(InferenceInputError, match="must hold booleans"):
        coerce_inputs({"b": 1}, [B])
    with pytest.raises(InferenceInputError, match="too large for float16"):
        coerce_inputs({"h": [1e6]}, [H])


def test_coerce_refuses_non_mapping() -> None:
    with pytest.raises(InferenceInputError, match="must be an object"):
        coerce_inputs([[1, 2, 3]], [X])  # type: ignore[arg-type]


def test_coerced_inputs_run_on_real_model(tmp_path: Path) -> None:
    model = _load(tmp_path, _two_input_model())
    feeds = coerce_inputs({"x": [[1, 2]], "k": [4]}, model.inputs)
    assert model.run(feeds)["y"].tolist() == [[4.0, 8.0]]
