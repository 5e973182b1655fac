"""Small ONNX models for the compiler tests, built with onnx.helper.

Each builder returns serialized model bytes; ``*_data`` helpers return
input arrays in the compiler's ``.npz`` layout (samples on axis 0). Weights
come from a seeded generator so every run quantizes the same model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
F = np.float32


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: dict[str, npt.NDArray[Any]],
    name: str,
) -> bytes:
    graph = helper.make_graph(
        nodes,
        name,
        inputs,
        outputs,
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _he(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> npt.NDArray[Any]:
    return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype(F)


def mlp(width: int = 64, features: int = 32, classes: int = 10, seed: int = 0) -> bytes:
    """x[N, features] -> MatMul/Add/Relu -> MatMul/Add/Relu -> MatMul/Add -> logits[N, classes]."""
    rng = np.random.default_rng(seed)
    inits = {
        "w1": _he(rng, (features, width), features),
        "b1": rng.normal(0, 0.05, width).astype(F),
        "w2": _he(rng, (width, width), width),
        "b2": rng.normal(0, 0.05, width).astype(F),
        "w3": _he(rng, (width, classes), width),
        "b3": np.zeros(classes, F),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="fc1_bias"),
        helper.make_node("Relu", ["a1"], ["h1"], name="relu1"),
        helper.make_node("MatMul", ["h1", "w2"], ["m2"], name="fc2"),
        helper.make_node("Add", ["m2", "b2"], ["a2"], name="fc2_bias"),
        helper.make_node("Relu", ["a2"], ["h2"], name="relu2"),
        helper.make_node("MatMul", ["h2", "w3"], ["m3"], name="fc3"),
        helper.make_node("Add", ["m3", "b3"], ["logits"], name="fc3_bias"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        inits,
        "mlp",
    )


def mlp_data(n: int, features: int = 32, seed: int = 1) -> dict[str, npt.NDArray[Any]]:
    return {"x": np.random.default_rng(seed).normal(0, 1, (n, features)).astype(F)}


def cnn(channels: int = 16, classes: int = 10, size: int = 16, seed: int = 0) -> bytes:
    """x[N,3,H,W] -> Conv/Relu -> Conv/Relu -> MaxPool -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    c = channels
    inits = {
        "w1": _he(rng, (c, 3, 3, 3), 27),
        "b1": rng.normal(0, 0.05, c).astype(F),
        "w2": _he(rng, (c, c, 3, 3), 9 * c),
        "b2": rng.normal(0, 0.05, c).astype(F),
        "wf": _he(rng, (classes, c), c),
        "bf": np.zeros(classes, F),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node(
            "MaxPool", ["r2"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"
        ),
        helper.make_node("GlobalAveragePool", ["p"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], transB=1, name="fc"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        inits,
        "cnn",
    )


def cnn_data(n: int, size: int = 16, seed: int = 1) -> dict[str, npt.NDArray[Any]]:
    return {"x": np.random.default_rng(seed).normal(0, 1, (n, 3, size, size)).astype(F)}


def embed_model(vocab: int = 50, dim: int = 16, feats: int = 4, seed: int = 0) -> bytes:
    """Two inputs: token ids (int64, [N, seq]) through an embedding, plus float features.

    ids -> Gather(table) -> ReduceMean over seq -> Concat with feats -> MatMul -> out[N, 3].
    """
    rng = np.random.default_rng(seed)
    inits = {
        "table": rng.normal(0, 1, (vocab, dim)).astype(F),
        "w": _he(rng, (dim + feats, 3), dim + feats),
    }
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
        helper.make_node("ReduceMean", ["emb"], ["pooled"], axes=[1], keepdims=0, name="pool"),
        helper.make_node("Concat", ["pooled", "feats"], ["joined"], axis=1, name="join"),
        helper.make_node("MatMul", ["joined", "w"], ["out"], name="head"),
    ]
    return _model(
        nodes,
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "seq"]),
            helper.make_tensor_value_info("feats", TensorProto.FLOAT, ["N", feats]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3])],
        inits,
        "embed",
    )


def embed_data(
    n: int, seq: int = 6, vocab: int = 50, feats: int = 4, seed: int = 1
) -> dict[str, npt.NDArray[Any]]:
    rng = np.random.default_rng(seed)
    return {
        "ids": rng.integers(0, vocab, (n, seq), dtype=np.int64),
        "feats": rng.normal(0, 1, (n, feats)).astype(F),
    }


def dynamic_regressor(dim: int = 16, seed: int = 0) -> bytes:
    """x[seq, dim] (no batch axis, dynamic seq) -> MatMul -> Tanh -> MatMul -> y[seq, 1].

    The output's last dimension is 1, so the gate uses cosine similarity.
    """
    rng = np.random.default_rng(seed)
    inits = {"w1": _he(rng, (dim, 32), dim), "w2": _he(rng, (32, 1), 32)}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="proj"),
        helper.make_node("Tanh", ["h"], ["t"], name="act"),
        helper.make_node("MatMul", ["t", "w2"], ["y"], name="head"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["seq", 1])],
        inits,
        "dynamic",
    )


def wide_range_mlp(features: int = 16, width: int = 32, seed: int = 0) -> bytes:
    """A regressor whose hidden activation has one channel about 1000x larger than the rest.

    Per-tensor int8 activation scales must cover the outlier channel, which
    rounds the other channels (which carry the output) to a few levels, so
    static int8 misses a tight cosine gate unless the node reading that
    activation stays in float.
    """
    rng = np.random.default_rng(seed)
    w1 = _he(rng, (features, width), features)
    w1[:, 0] *= 1000.0
    w2 = _he(rng, (width, 8), width)
    w2[0, :] /= 1000.0
    inits = {"w1": w1, "w2": w2.astype(F), "w3": _he(rng, (8, 4), 8)}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="wide"),
        helper.make_node("MatMul", ["h", "w2"], ["n"], name="narrow"),
        helper.make_node("MatMul", ["n", "w3"], ["y"], name="head"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        inits,
        "wide",
    )
