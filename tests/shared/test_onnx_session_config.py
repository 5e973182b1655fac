"""Session config entries an ONNX model asks for in its metadata, read without the onnx package."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from edgefleet.shared.runtime import (
    ONNX_SESSION_CONFIG_KEY,
    get_backend,
    onnx_metadata,
    onnx_session_config,
)


def _model(props: dict[str, str]) -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.doc_string = "x" * 300  # a length-delimited field before the metadata, skipped
    helper.set_model_props(model, props)
    return model.SerializeToString()


def test_metadata_matches_what_onnx_reads() -> None:
    props = {"a": "1", "unicode": "grüße", ONNX_SESSION_CONFIG_KEY: "{}"}
    data = _model(props)
    assert onnx_metadata(data) == {
        p.key: p.value for p in onnx.load_model_from_string(data).metadata_props
    }
    assert onnx_metadata(data) == props


def test_only_allowed_entries_are_applied(caplog: pytest.LogCaptureFixture) -> None:
    asked = {"session.disable_quant_qdq": "1", "session.intra_op_thread_affinities": "1"}
    with caplog.at_level(logging.WARNING):
        config = onnx_session_config(_model({ONNX_SESSION_CONFIG_KEY: json.dumps(asked)}))
    assert config == {"session.disable_quant_qdq": "1"}
    assert "intra_op_thread_affinities" in caplog.text
    bad_value = json.dumps({"session.disable_quant_qdq": "yes"})
    assert onnx_session_config(_model({ONNX_SESSION_CONFIG_KEY: bad_value})) == {}


@pytest.mark.parametrize(
    "data",
    [
        _model({ONNX_SESSION_CONFIG_KEY: "not json"}),
        _model({ONNX_SESSION_CONFIG_KEY: "[1, 2]"}),
        _model({}),
        b"this is not a protobuf",
        _model({ONNX_SESSION_CONFIG_KEY: "{}"})[:-5],
        b"",
    ],
    ids=["not-json", "not-object", "none", "garbage", "truncated", "empty"],
)
def test_malformed_or_missing_requests_give_the_defaults(data: bytes) -> None:
    assert onnx_session_config(data) == {}


def test_backend_applies_the_request_and_refuses_garbage_as_before(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(_model({ONNX_SESSION_CONFIG_KEY: '{"session.disable_quant_qdq": "1"}'}))
    loaded = get_backend("onnxruntime").load(path)
    opts = loaded._session.get_session_options()  # type: ignore[attr-defined]
    assert opts.get_session_config_entry("session.disable_quant_qdq") == "1"
