"""The model ``edgefleet demo`` ships: a tiny MLP classifier built with onnx.helper.

It is built in code rather than checked in as a binary so the demo needs no
download and no training, and so the bytes are reproducible: the same
``seed`` and ``scale`` always give the same model file (and so the same
bundle hash). The weights are random; the model only has to run, not to be
right.

Graph::

    features float32 [N, 16]
      -> Gemm(16 -> 32) -> Relu -> Gemm(32 -> 4) -> Softmax
    probabilities float32 [N, 4]
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "CLASSES",
    "FEATURES",
    "HIDDEN",
    "INPUT_NAME",
    "OPSET",
    "OUTPUT_NAME",
    "build_demo_model",
    "demo_inputs",
]

INPUT_NAME = "features"
OUTPUT_NAME = "probabilities"
FEATURES = 16
HIDDEN = 32
CLASSES = 4
OPSET = 17
# IR version 8 is the newest every supported onnxruntime (1.18+) loads;
# opset 17 needs at least IR 8.
_IR_VERSION = 8


def build_demo_model(*, seed: int = 0, scale: float = 1.0) -> bytes:
    """Serialize the demo MLP with weights drawn from ``seed``.

    Args:
        seed: Seed for the weights; different seeds give different "versions"
            of the model for demonstrating updates.
        scale: Multiplies the output layer's weights and bias, i.e. the logits.
            Values above 1 sharpen the class probabilities and below 1 flatten
            them, while the predicted class (argmax) stays the same: a second
            version that visibly differs but agrees on every label.

    Returns:
        The ONNX model bytes (about 3 KB).
    """
    rng = np.random.default_rng(seed)
    # He initialisation keeps the activations in a sane range for random inputs.
    w1 = rng.standard_normal((FEATURES, HIDDEN)) * np.sqrt(2.0 / FEATURES)
    b1 = rng.standard_normal(HIDDEN) * 0.1
    w2 = rng.standard_normal((HIDDEN, CLASSES)) * np.sqrt(2.0 / HIDDEN) * scale
    b2 = rng.standard_normal(CLASSES) * 0.1 * scale
    initializers = [
        numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)
        for name, value in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2))
    ]
    nodes = [
        helper.make_node("Gemm", [INPUT_NAME, "w1", "b1"], ["hidden"], name="dense1"),
        helper.make_node("Relu", ["hidden"], ["hidden_relu"], name="relu1"),
        helper.make_node("Gemm", ["hidden_relu", "w2", "b2"], ["logits"], name="dense2"),
        helper.make_node("Softmax", ["logits"], [OUTPUT_NAME], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "edgefleet_demo_mlp",
        inputs=[helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", FEATURES])],
        outputs=[helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", CLASSES])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=_IR_VERSION,
        producer_name="edgefleet",
        doc_string="edgefleet demo MLP classifier (random weights)",
    )
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString(deterministic=True)
    return data


def demo_inputs(n: int, seed: int = 1) -> dict[str, npt.NDArray[np.float32]]:
    """``n`` random feature rows for the demo model, keyed by input name."""
    rng = np.random.default_rng(seed)
    return {INPUT_NAME: rng.standard_normal((n, FEATURES)).astype(np.float32)}
