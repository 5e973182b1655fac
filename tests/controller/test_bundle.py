"""Bundle building: archive layout, manifest, recorded smoke outputs, reproducibility."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.controller.bundle import build_bundle, default_sample, inspect_onnx
from edgefleet.controller.demo_model import CLASSES, FEATURES, build_demo_model, demo_inputs
from edgefleet.controller.errors import ModelError
from edgefleet.protocols.bundle import BundleManifest, TensorSpec
from edgefleet.protocols.errors import MessageError

WEIGHTS = np.arange(6, dtype=np.float32).reshape(3, 2) / 10


def small_model(*, log: bool = False) -> bytes:
    """y = x @ W (or log(x) @ W) and z = idx * 2: one float and one int input/output."""
    nodes = []
    x = "x"
    if log:
        nodes.append(helper.make_node("Log", ["x"], ["log_x"]))
        x = "log_x"
    nodes += [
        helper.make_node("MatMul", [x, "w"], ["y"]),
        helper.make_node("Mul", ["idx", "two"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        inputs=[
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("idx", TensorProto.INT64, ["N"]),
        ],
        outputs=[
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("z", TensorProto.INT64, ["N"]),
        ],
        initializer=[
            numpy_helper.from_array(WEIGHTS, "w"),
            numpy_helper.from_array(np.array(2, dtype=np.int64), "two"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    data: bytes = model.SerializeToString()
    return data


def sample() -> dict[str, npt.NDArray[Any]]:
    return {
        "x": np.array([[1, 2, 3], [4, 5, 6], [0.5, 0.25, 2]], dtype=np.float32),
        "idx": np.array([0, 1, 7], dtype=np.int64),
    }


def build(model: bytes | None = None, **overrides: Any) -> tuple[bytes, BundleManifest]:
    kwargs: dict[str, Any] = {
        "name": "small",
        "version": "1.0",
        "release": 2,
        "hardware_class": "generic",
        "precision": "fp32",
        "sample_inputs": sample(),
        **overrides,
    }
    return build_bundle(small_model() if model is None else model, **kwargs)


def members(archive: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
        out = {}
        for info in tar.getmembers():
            assert info.isfile()
            fh = tar.extractfile(info)
            assert fh is not None
            out[info.name] = fh.read()
        return out


def test_inspect_onnx_reports_names_dtypes_and_dynamic_dims() -> None:
    inputs, outputs = inspect_onnx(small_model())
    assert inputs == (
        TensorSpec("x", "float32", (None, 3)),
        TensorSpec("idx", "int64", (None,)),
    )
    assert outputs == (
        TensorSpec("y", "float32", (None, 2)),
        TensorSpec("z", "int64", (None,)),
    )


def test_bundle_has_exactly_the_three_members() -> None:
    archive, _ = build()
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == ["manifest.json", "model.onnx", "sample.npz"]
    assert all(i.isfile() and i.mtime == 0 and i.uid == 0 and i.mode == 0o644 for i in infos)


def test_manifest_decodes_and_pins_the_model() -> None:
    model = small_model()
    archive, manifest = build(model, smoke_atol=1e-3, smoke_rtol=1e-2)
    files = members(archive)
    decoded = BundleManifest.decode(files["manifest.json"])
    assert decoded == manifest
    assert decoded.model_sha256 == hashlib.sha256(model).hexdigest()
    assert files["model.onnx"] == model
    assert (decoded.model, decoded.version, decoded.release) == ("small", "1.0", 2)
    assert (decoded.runtime, decoded.precision, decoded.hardware_class) == (
        "onnxruntime",
        "fp32",
        "generic",
    )
    assert decoded.model_file == "model.onnx"
    assert (decoded.smoke_atol, decoded.smoke_rtol) == (1e-3, 1e-2)
    assert decoded.inputs == inspect_onnx(model)[0]
    assert decoded.outputs == inspect_onnx(model)[1]


def test_sample_holds_inputs_and_onnxruntime_outputs() -> None:
    model = small_model()
    archive, _ = build(model)
    with np.load(io.BytesIO(members(archive)["sample.npz"]), allow_pickle=False) as npz:
        stored = {key: npz[key] for key in npz.files}
    assert set(stored) == {"in.x", "in.idx", "out.y", "out.z"}
    for name, value in sample().items():
        np.testing.assert_array_equal(stored[f"in.{name}"], value)
        assert stored[f"in.{name}"].dtype == value.dtype
    y, z = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, sample())
    np.testing.assert_array_equal(stored["out.y"], y)
    np.testing.assert_array_equal(stored["out.z"], z)
    # and onnxruntime computed what the graph says
    np.testing.assert_allclose(stored["out.y"], sample()["x"] @ WEIGHTS, rtol=1e-6)
    np.testing.assert_array_equal(stored["out.z"], [0, 2, 14])


def test_same_inputs_give_the_same_bytes() -> None:
    first, _ = build()
    second, _ = build()
    assert hashlib.sha256(first).digest() == hashlib.sha256(second).digest()
    changed = sample()
    changed["idx"] = np.array([1, 1, 1], dtype=np.int64)
    third, _ = build(sample_inputs=changed)
    assert third != first
    # nothing time-dependent inside: np.savez would stamp the zip entries with "now"
    with zipfile.ZipFile(io.BytesIO(members(first)["sample.npz"])) as npz:
        assert {info.date_time for info in npz.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert BundleManifest.decode(members(first)["manifest.json"]).created_at == 0.0


@pytest.mark.parametrize(
    "model",
    [b"", b"this is not an onnx model \xff\xfe", b"\x08\x07", small_model()[:40]],
    ids=["empty", "garbage", "no-opset", "truncated"],
)
def test_corrupt_model_bytes_raise_model_error(model: bytes) -> None:
    with pytest.raises(ModelError, match=r"ONNX model|empty"):
        inspect_onnx(model)
    with pytest.raises(ModelError):
        build(model)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"x": sample()["x"]}, r"missing \['idx'\]"),
        ({**sample(), "bogus": np.zeros(3, np.float32)}, r"unexpected \['bogus'\]"),
        ({"x": sample()["x"], "index": sample()["idx"]}, r"missing \['idx'\], unexpected"),
        ({**sample(), "x": sample()["x"].astype(np.float64)}, "float64 but the model expects"),
        ({**sample(), "x": np.zeros((3, 4), np.float32)}, r"shape \[3, 4\]"),
        ({**sample(), "idx": np.zeros((3, 1), np.int64)}, r"shape \[3, 1\]"),
    ],
    ids=["missing", "unexpected", "renamed", "dtype", "static-dim", "rank"],
)
def test_sample_that_does_not_fit_raises_model_error(
    inputs: dict[str, npt.NDArray[Any]], message: str
) -> None:
    with pytest.raises(ModelError, match=message):
        build(sample_inputs=inputs)


def test_non_finite_expected_outputs_are_refused() -> None:
    bad = sample()
    bad["x"] = -bad["x"]  # log of negatives is NaN
    with pytest.raises(ModelError, match="not finite"):
        build(small_model(log=True), sample_inputs=bad)
    build(small_model(log=True))  # positive inputs are fine


def test_invalid_manifest_fields_are_refused() -> None:
    with pytest.raises(MessageError, match="precision"):
        build(precision="fp64")
    with pytest.raises(MessageError, match="release"):
        build(release=0)
    with pytest.raises(ModelError, match="onnxruntime, tflite, not 'tensorrt'"):
        build(runtime="tensorrt")
    with pytest.raises(ModelError, match="not a TFLite model"):
        build(runtime="tflite")  # an ONNX model declared as tflite


def test_default_sample_fits_the_model_and_is_seeded() -> None:
    inputs, _ = inspect_onnx(small_model())
    data = default_sample(inputs, batch=5, seed=3)
    assert data["x"].shape == (5, 3)
    assert data["x"].dtype == np.float32
    assert data["idx"].shape == (5,)
    assert data["idx"].dtype == np.int64
    assert data["idx"].min() >= 0
    assert data["idx"].max() < 4
    again = default_sample(inputs, batch=5, seed=3)
    np.testing.assert_array_equal(data["x"], again["x"])
    assert not np.array_equal(data["x"], default_sample(inputs, batch=5, seed=4)["x"])
    build(sample_inputs=data)  # fits


def test_default_sample_uses_one_for_inner_dynamic_dims() -> None:
    spec = TensorSpec("t", "float16", (None, None, 8))
    assert default_sample([spec], batch=3)["t"].shape == (3, 1, 8)
    with pytest.raises(ModelError, match="sample inputs explicitly"):
        default_sample([TensorSpec("s", "object", (None,))])


# -- the demo model ------------------------------------------------------------------


def test_demo_model_is_small_valid_and_reproducible() -> None:
    model = build_demo_model()
    assert len(model) < 512 * 1024
    assert model == build_demo_model()
    assert model != build_demo_model(seed=1)
    proto = onnx.load_model_from_string(model)
    assert proto.ir_version <= 9
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 17)]
    inputs, outputs = inspect_onnx(model)
    assert inputs == (TensorSpec("features", "float32", (None, FEATURES)),)
    assert outputs == (TensorSpec("probabilities", "float32", (None, CLASSES)),)


def test_demo_model_outputs_probabilities_and_scale_keeps_labels() -> None:
    features = demo_inputs(8)
    assert features["features"].shape == (8, FEATURES)
    assert features["features"].dtype == np.float32
    base = ort.InferenceSession(build_demo_model(), providers=["CPUExecutionProvider"])
    sharp = ort.InferenceSession(build_demo_model(scale=3.0), providers=["CPUExecutionProvider"])
    p = base.run(None, features)[0]
    q = sharp.run(None, features)[0]
    assert p.shape == (8, CLASSES)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(p.argmax(axis=1), q.argmax(axis=1))
    assert q.max(axis=1).mean() > p.max(axis=1).mean()  # sharper


def test_demo_model_bundles() -> None:
    archive, manifest = build_bundle(
        build_demo_model(),
        name="demo-mlp",
        version="1.0",
        release=1,
        hardware_class="generic",
        precision="fp32",
        sample_inputs=demo_inputs(4),
    )
    assert BundleManifest.decode(members(archive)["manifest.json"]) == manifest
