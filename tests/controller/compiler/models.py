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


# --- Real-world export patterns (issue 13): each reproduces one way public
# models differ from the ones the compiler was first built with. ---


def _graph_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: dict[str, npt.NDArray[Any]],
    name: str,
    *,
    opset: int = OPSET,
    ir_version: int = 9,
) -> bytes:
    graph = helper.make_graph(
        nodes, name, inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def neg1_batch(features: int = 16, classes: int = 4, seed: int = 0) -> bytes:
    """x[-1, features] -> MatMul -> Softmax -> y[-1, classes]: batch as dim_value -1 (Paddle)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"),
        helper.make_node("Softmax", ["m"], ["y"], axis=-1, name="softmax"),
    ]
    return _graph_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, classes])],
        {"w": _he(rng, (features, classes), features)},
        "neg1_batch",
    )


def two_unknown_axes(channels: int = 8, seed: int = 0) -> bytes:
    """x[N, 3, "?", "?"] -> Conv -> Relu -> GlobalAveragePool -> Flatten -> y[N, channels].

    Height and width are both the literal dim_param "?", as paddle2onnx writes
    them: two independent axes, not one shared one.
    """
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["y"], name="flatten"),
    ]
    return _graph_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "?", "?"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels])],
        {"w": _he(rng, (channels, 3, 3, 3), 27), "b": rng.normal(0, 0.05, channels).astype(F)},
        "two_unknown_axes",
    )


def scalar_input(features: int = 16, seed: int = 0) -> bytes:
    """Inputs x[N, features] and a rank-0 int64 ``sr`` (a sample rate, as silero's)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"),
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Div", ["srf", "k"], ["gain"], name="gain"),
        helper.make_node("Mul", ["m", "gain"], ["y"], name="scale"),
    ]
    return _graph_model(
        nodes,
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        {"w": _he(rng, (features, 4), features), "k": np.array(16000.0, F)},
        "scalar_input",
    )


def constant_weights(features: int = 16, width: int = 32, seed: int = 0) -> bytes:
    """The mlp shape with every weight in a ``Constant`` node and no initializer at all."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(_he(rng, (features, width), features), "w1_value")
    w2 = numpy_helper.from_array(_he(rng, (width, 4), width), "w2_value")
    nodes = [
        helper.make_node("Constant", [], ["w1"], value=w1, name="w1_const"),
        helper.make_node("Constant", [], ["w2"], value=w2, name="w2_const"),
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    return _graph_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        {},
        "constant_weights",
    )


def opset11_cnn(channels: int = 16, classes: int = 10, size: int = 16, seed: int = 0) -> bytes:
    """Two biased Convs + GlobalAveragePool at opset 11 (no ``axis`` on DequantizeLinear yet)."""
    rng = np.random.default_rng(seed)
    c = channels
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["y"], name="flatten"),
    ]
    inits = {
        "w1": _he(rng, (c, 3, 3, 3), 27),
        "b1": rng.normal(0, 0.05, c).astype(F),
        "w2": _he(rng, (classes, c, 3, 3), 9 * c),
        "b2": rng.normal(0, 0.05, classes).astype(F),
    }
    return _graph_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])],
        inits,
        "opset11_cnn",
        opset=11,
        ir_version=6,
    )


def stateful_if(features: int = 8, hidden: int = 16, seed: int = 0) -> bytes:
    """A silero-like recurrent step: ``state`` in, ``stateN`` out, the update inside an ``If``.

    ``If(sr == 16000)`` picks a branch computing
    ``Tanh((x @ wx + state @ ws) * k)``; the branches read the outer
    initializers ``wx``/``ws`` and hold their own ``k`` in a ``Constant``
    node. ``prob = Sigmoid(stateN @ wo)`` is a [1, 1] probability.
    """
    rng = np.random.default_rng(seed)

    def branch(tag: str, scale: float) -> onnx.GraphProto:
        k = numpy_helper.from_array(np.array(scale, F), f"{tag}_k_value")
        return helper.make_graph(
            [
                helper.make_node("Constant", [], [f"{tag}_k"], value=k, name=f"{tag}_k_const"),
                helper.make_node("MatMul", ["x", "wx"], [f"{tag}_a"], name=f"{tag}_in"),
                helper.make_node("MatMul", ["state", "ws"], [f"{tag}_b"], name=f"{tag}_rec"),
                helper.make_node("Add", [f"{tag}_a", f"{tag}_b"], [f"{tag}_c"], name=f"{tag}_sum"),
                helper.make_node("Mul", [f"{tag}_c", f"{tag}_k"], [f"{tag}_d"], name=f"{tag}_gain"),
                helper.make_node("Tanh", [f"{tag}_d"], [f"{tag}_out"], name=f"{tag}_act"),
            ],
            tag,
            [],
            [helper.make_tensor_value_info(f"{tag}_out", TensorProto.FLOAT, [1, hidden])],
        )

    nodes = [
        helper.make_node("Equal", ["sr", "k16"], ["is16"], name="is16k"),
        helper.make_node(
            "If",
            ["is16"],
            ["stateN"],
            then_branch=branch("then", 1.0),
            else_branch=branch("else", 0.5),
            name="rate_switch",
        ),
        helper.make_node("MatMul", ["stateN", "wo"], ["logit"], name="head"),
        helper.make_node("Sigmoid", ["logit"], ["prob"], name="sigmoid"),
    ]
    inits = {
        "wx": _he(rng, (features, hidden), features),
        "ws": (0.3 * _he(rng, (hidden, hidden), hidden)).astype(F),
        "wo": _he(rng, (hidden, 1), hidden),
        "k16": np.array(16000, np.int64),
    }
    return _graph_model(
        nodes,
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, features]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [1, hidden]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 1]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [1, hidden]),
        ],
        inits,
        "stateful_if",
    )


def stateful_if_data(
    n: int, features: int = 8, hidden: int = 16, seed: int = 1
) -> dict[str, npt.NDArray[Any]]:
    """Per-step samples: (samples, 1, features), a zero state each, sr as (samples,)."""
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(0, 1, (n, 1, features)).astype(F),
        "state": np.zeros((n, 1, hidden), F),
        "sr": np.full(n, 16000, np.int64),
    }


def prob_output(features: int = 16, seed: int = 0) -> bytes:
    """x[N, features] -> MatMul -> Add -> Sigmoid -> p[N, 1]: one probability per sample.

    Small weights keep many probabilities near 0.5, where a small error flips
    the decision.
    """
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["l"], name="fc"),
        helper.make_node("Add", ["l", "b"], ["lb"], name="bias"),
        helper.make_node("Sigmoid", ["lb"], ["p"], name="sigmoid"),
    ]
    return _graph_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 1])],
        {"w": rng.normal(0, 0.1, (features, 1)).astype(F), "b": np.zeros(1, F)},
        "prob_output",
    )


def gemm_row_bias(features: int = 16, width: int = 32, seed: int = 0) -> bytes:
    """Gemm with a [1, N] bias (tf2onnx after MatMul+Add fusion) -> Relu -> Gemm -> y[N, 4].

    onnxruntime's per-channel QDQ quantizer crashes on the 2-D bias ("The
    truth value of an array with more than one element is ambiguous").
    """
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "c1"], ["g"], name="fc1"),
        helper.make_node("Relu", ["g"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "c2"], ["y"], name="fc2"),
    ]
    inits = {
        "w1": _he(rng, (features, width), features),
        "c1": rng.normal(0, 0.05, (1, width)).astype(F),
        "w2": _he(rng, (width, 4), width),
        "c2": rng.normal(0, 0.05, 4).astype(F),
    }
    return _graph_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        inits,
        "gemm_row_bias",
    )


def gemm_full_bias(batch: int = 2, features: int = 16, width: int = 32, seed: int = 0) -> bytes:
    """Like :func:`gemm_row_bias` but the first bias is a full [batch, N] matrix (fixed batch).

    That bias cannot be flattened to [N], so the quantizer still fails on
    ``fc1``: the node it cannot handle must stay float while the rest is
    quantized.
    """
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "c1"], ["g"], name="fc1"),
        helper.make_node("Relu", ["g"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "c2"], ["y"], name="fc2"),
    ]
    inits = {
        "w1": _he(rng, (features, width), features),
        "c1": rng.normal(0, 0.05, (batch, width)).astype(F),
        "w2": _he(rng, (width, 4), width),
        "c2": rng.normal(0, 0.05, 4).astype(F),
    }
    return _graph_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])],
        inits,
        "gemm_full_bias",
    )


def weights_in_branches(features: int = 8, width: int = 16, seed: int = 0) -> bytes:
    """All weights inside ``If`` branches, in ``Constant`` nodes (silero_vad.onnx's layout).

    ``If(sr == 16000)``: each branch computes ``x @ w`` with its own ``w``.
    """
    rng = np.random.default_rng(seed)

    def branch(tag: str) -> onnx.GraphProto:
        w = numpy_helper.from_array(_he(rng, (features, width), features), f"{tag}_w_value")
        return helper.make_graph(
            [
                helper.make_node("Constant", [], [f"{tag}_w"], value=w, name=f"{tag}_w_const"),
                helper.make_node("MatMul", ["x", f"{tag}_w"], [f"{tag}_y"], name=f"{tag}_fc"),
            ],
            tag,
            [],
            [helper.make_tensor_value_info(f"{tag}_y", TensorProto.FLOAT, ["N", width])],
        )

    nodes = [
        helper.make_node("Equal", ["sr", "k16"], ["is16"], name="is16k"),
        helper.make_node(
            "If", ["is16"], ["y"], then_branch=branch("then"), else_branch=branch("else"), name="sw"
        ),
    ]
    return _graph_model(
        nodes,
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        {"k16": np.array(16000, np.int64)},
        "weights_in_branches",
    )


def outlier_encoder(tokens: int = 8, dim: int = 16, hidden: int = 32, seed: int = 0) -> bytes:
    """A transformer-style block whose FFN output projection reads outlier activations.

    Self-attention (q/k/v/o MatMuls, a Softmax over q.k^T), then an FFN
    ``Relu(h @ w1 + b1) @ w2`` and a head. ``b1`` lifts one hidden channel to
    about 1000 while the rest stay near 1 (the outlier features real encoders
    grow after GELU), and ``w2`` barely reads that channel, so the output is
    carried by the small channels. Dynamic int8 quantizes the activation
    per tensor at run time: the scale that covers the outlier rounds the
    small channels to a few levels, so ``ffn_out`` alone ruins the output
    while every other int8 MatMul is harmless.
    """
    rng = np.random.default_rng(seed)
    b1 = rng.normal(0, 0.05, hidden).astype(F)
    b1[0] = 1000.0
    w2 = _he(rng, (hidden, dim), hidden)
    w2[0, :] /= 1000.0
    inits = {
        "wq": _he(rng, (dim, dim), dim),
        "wk": _he(rng, (dim, dim), dim),
        "wv": _he(rng, (dim, dim), dim),
        "wo": _he(rng, (dim, dim), dim),
        "w1": _he(rng, (dim, hidden), dim),
        "b1": b1,
        "w2": w2,
        "wh": _he(rng, (dim, 4), dim),
        "scale": np.array(1.0 / np.sqrt(dim), F),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="attn_q"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="attn_k"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="attn_v"),
        helper.make_node("Transpose", ["k"], ["kt"], name="attn_kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["qk"], name="attn_scores"),
        helper.make_node("Mul", ["qk", "scale"], ["qks"], name="attn_scale"),
        helper.make_node("Softmax", ["qks"], ["p"], name="attn_softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["ctx"], name="attn_ctx"),
        helper.make_node("MatMul", ["ctx", "wo"], ["o"], name="attn_out"),
        helper.make_node("Add", ["x", "o"], ["h"], name="residual"),
        helper.make_node("MatMul", ["h", "w1"], ["f1"], name="ffn_in"),
        helper.make_node("Add", ["f1", "b1"], ["f1b"], name="ffn_bias"),
        helper.make_node("Relu", ["f1b"], ["f"], name="ffn_relu"),
        helper.make_node("MatMul", ["f", "w2"], ["g"], name="ffn_out"),
        helper.make_node("MatMul", ["g", "wh"], ["y"], name="head"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", tokens, dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", tokens, 4])],
        inits,
        "outlier_encoder",
    )


def outlier_encoder_data(
    n: int, tokens: int = 8, dim: int = 16, seed: int = 1
) -> dict[str, npt.NDArray[Any]]:
    return {"x": np.random.default_rng(seed).normal(size=(n, tokens, dim)).astype(F)}


def batch_mixing(features: int = 8, seed: int = 0) -> bytes:
    """A model whose output for one row depends on the other rows of the batch.

    ``h = x @ w; y = h + (h - mean(h, axis=0))``: with one sample per call
    the centred term is zero and ``y = h``; in a batch it is not. Scoring
    such a model in batches would compare different computations, so the
    compiler must notice and run it one sample per call.
    """
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
        helper.make_node("ReduceMean", ["h"], ["m"], name="batch_mean", axes=[0], keepdims=1),
        helper.make_node("Sub", ["h", "m"], ["c"], name="centre"),
        helper.make_node("Add", ["c", "h"], ["y"], name="mix"),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", features])],
        {"w": _he(rng, (features, features), features)},
        "batch_mixing",
    )
