"""Loading the source model: bad files give clear errors; the op mix decides the kind."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from edgefleet.controller.compiler import SourceModelError, load_source
from edgefleet.controller.errors import ModelError
from edgefleet.protocols.errors import EdgefleetError

from . import models as tm


def test_loads_a_model_and_describes_it() -> None:
    src = load_source(tm.embed_model())
    assert [s.name for s in src.inputs] == ["ids", "feats"]
    assert src.inputs[0].dtype == "int64"
    assert src.inputs[0].shape == (None, None)
    assert src.dim_params["ids"] == ("N", "seq")
    assert src.outputs[0].shape == (None, 3)
    assert src.weight_bytes == (50 * 16 + 20 * 3) * 4
    assert len(src.sha256) == 64


@pytest.mark.parametrize(
    ("model", "kind"),
    [
        (tm.mlp(), "mlp"),
        (tm.cnn(), "cnn"),
        (tm.embed_model(), "mlp"),
        (tm.dynamic_regressor(), "mlp"),
    ],
)
def test_kind_from_op_mix(model: bytes, kind: str) -> None:
    assert load_source(model).kind == kind


def test_attention_pattern_is_a_transformer() -> None:
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["q"], name="q"),
            helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0], name="t"),
            helper.make_node("MatMul", ["q", "xt"], ["s"], name="scores"),
            helper.make_node("Softmax", ["s"], ["p"], name="softmax"),
            helper.make_node("MatMul", ["p", "x"], ["y"], name="ctx"),
        ],
        "att",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor("w", TensorProto.FLOAT, [8, 8], [0.1] * 64)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    assert load_source(model.SerializeToString()).kind == "transformer"


def test_unnamed_nodes_get_unique_names() -> None:
    m = onnx.load_model_from_string(tm.mlp())
    for n in m.graph.node:
        n.name = ""
    src = load_source(m.SerializeToString())
    names = [n.name for n in src.proto.graph.node]
    assert all(names)
    assert len(set(names)) == len(names)
    assert src.data == m.SerializeToString()  # the fp32 candidate is the source as given


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "is empty"),
        (b"\x00\xff\xfe garbage \x01\x02" * 10, "not an ONNX model"),
        (b"hello, this is text and not a model\n", "not an ONNX model"),
    ],
)
def test_corrupt_or_foreign_bytes(tmp_path: Path, payload: bytes, message: str) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(payload)
    with pytest.raises(SourceModelError, match=message) as info:
        load_source(path)
    assert isinstance(info.value, EdgefleetError)
    assert not isinstance(info.value, ModelError)  # the compiler's own branch


def test_truncated_model_is_refused() -> None:
    data = tm.cnn()
    with pytest.raises(SourceModelError, match=r"not an ONNX model|not a valid ONNX model"):
        load_source(data[: len(data) // 2])


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(SourceModelError, match="cannot read"):
        load_source(tmp_path / "nope.onnx")
    with pytest.raises(SourceModelError, match="is a directory"):
        load_source(tmp_path)


def test_invalid_graph_is_refused() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["missing"], ["y"], name="r")],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(SourceModelError, match="not a valid ONNX model"):
        load_source(model.SerializeToString())


def test_model_onnxruntime_cannot_run_is_refused() -> None:
    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example", name="f")],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)],
    )
    model.ir_version = 9
    with pytest.raises(SourceModelError, match="onnxruntime cannot load"):
        load_source(model.SerializeToString())
