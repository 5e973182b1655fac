"""Calibration/validation data loading: layouts, multiple and integer inputs, and every error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgefleet.controller.compiler import DataError, load_samples, load_source
from edgefleet.controller.compiler.data import synthetic_feed
from edgefleet.controller.compiler.source import SourceModel

from . import models as tm


@pytest.fixture(scope="module")
def embed() -> SourceModel:
    return load_source(tm.embed_model())


@pytest.fixture(scope="module")
def cnn() -> SourceModel:
    return load_source(tm.cnn())


def test_npz_with_integer_and_float_inputs(tmp_path: Path, embed: SourceModel) -> None:
    path = tmp_path / "val.npz"
    data = tm.embed_data(5)
    np.savez(path, **data)
    s = load_samples(path, embed, role="validation")
    assert s.count == 5
    feed = s.feed(2)
    # axis 0 of the arrays is the model's batch axis: a batch of one per sample
    assert feed["ids"].shape == (1, 6)
    assert feed["ids"].dtype == np.int64
    np.testing.assert_array_equal(feed["ids"][0], data["ids"][2])
    assert feed["feats"].shape == (1, 4)


def test_extra_sample_axis_form(cnn: SourceModel) -> None:
    x = np.zeros((3, 1, 3, 16, 16), np.float32)  # (samples, *input_shape)
    s = load_samples({"x": x}, cnn, role="calibration")
    assert not s.batched["x"]
    assert s.feed(0)["x"].shape == (1, 3, 16, 16)


def test_dynamic_axes_without_batch_axis() -> None:
    src = load_source(tm.dynamic_regressor())
    s = load_samples({"x": np.ones((4, 9, 16), np.float32)}, src, role="validation")
    assert s.feed(3)["x"].shape == (9, 16)


def test_max_samples_truncates(cnn: SourceModel) -> None:
    s = load_samples(tm.cnn_data(10), cnn, role="calibration", max_samples=4)
    assert (s.count, s.total) == (4, 10)
    assert len(list(s.feeds())) == 4


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"x": np.zeros((2, 3, 16, 16), np.float32)}, "missing array.*'ids'"),
        ({**tm.embed_data(2), "extra": np.zeros(2)}, "'extra' match no model input"),
        ({**tm.embed_data(2), "ids": np.zeros((2, 6), np.int32)}, "dtype int32.*expects int64"),
        ({**tm.embed_data(2), "feats": np.zeros((2, 5), np.float32)}, "axis 1 must be 4"),
        ({**tm.embed_data(2), "feats": np.zeros((2,), np.float32)}, "has 1 dimensions"),
        ({**tm.embed_data(3), "feats": np.zeros((2, 4), np.float32)}, "different sample counts"),
        ({**tm.embed_data(2), "feats": np.full((2, 4), np.nan, np.float32)}, "NaN"),
        ({**tm.embed_data(2), "ids": np.array(["a", "b"])}, "non-numeric"),
        ({**tm.embed_data(2), "ids": np.zeros((0, 6), np.int64)}, "no samples"),
    ],
)
def test_mismatched_data_is_refused_with_the_reason(
    embed: SourceModel, data: dict[str, np.ndarray], message: str
) -> None:
    with pytest.raises(DataError, match=message):
        load_samples(data, embed, role="validation")


def _tiny(shape_a: list[int | str], shape_b: list[int | str]) -> SourceModel:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"], name="add")],
        "g",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, shape_a),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, shape_b),
        ],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, shape_a)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return load_source(model.SerializeToString())


def test_fixed_batch_needs_the_sample_axis() -> None:
    src = _tiny([2, 4], [2, 4])
    ok = {"a": np.zeros((3, 2, 4), np.float32), "b": np.zeros((3, 2, 4), np.float32)}
    assert load_samples(ok, src, role="validation").feed(0)["a"].shape == (2, 4)
    flat = {"a": np.zeros((3, 4), np.float32), "b": np.zeros((3, 4), np.float32)}
    with pytest.raises(DataError, match="fixed batch of 2"):
        load_samples(flat, src, role="validation")


def test_symbolic_axes_must_agree_between_inputs() -> None:
    src = _tiny(["seq", 2], ["seq", 2])
    a = np.zeros((2, 3, 2), np.float32)
    b = np.zeros((2, 5, 2), np.float32)
    with pytest.raises(DataError, match="disagree on dynamic axis 'seq'"):
        load_samples({"a": a, "b": b}, src, role="validation")
    load_samples({"a": a, "b": a}, src, role="validation")


def test_unreadable_files(tmp_path: Path, cnn: SourceModel) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_samples(tmp_path / "missing.npz", cnn, role="validation")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(DataError, match=r"not a \.npz|corrupt"):
        load_samples(bad, cnn, role="validation")
    text = tmp_path / "text.npz"
    text.write_text("hello")
    with pytest.raises(DataError, match="validation file"):
        load_samples(text, cnn, role="validation")
    single = tmp_path / "single.npy"
    np.save(single, np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(DataError, match="single array"):
        load_samples(single, cnn, role="calibration")


def test_synthetic_feed_fits_the_inputs(embed: SourceModel) -> None:
    feed = synthetic_feed(embed)
    assert feed["ids"].dtype == np.int64
    assert feed["ids"].shape == (1, 1)
    assert feed["feats"].shape == (1, 4)
