"""The model ``edgefleet demo`` ships: a small MLP classifier built with onnx.helper.

It is built in code rather than checked in as a binary so the demo needs no
download and no training, and so the bytes are reproducible: the same
``seed`` and ``scale`` always give the same model file (and so the same
bundle hash). The weights are random; the model only has to run, not to be
right. It is large enough (about 340 KB, matmul-heavy) for quantization to
matter, so the demo's compile report shows a real choice, and small enough to
reach five agents over MQTT in well under a second.

Graph::

    features float32 [N, 64]
      -> MatMul+Add(64 -> 256) -> Relu -> MatMul+Add(256 -> 256) -> Relu
      -> MatMul+Add(256 -> 10) -> Softmax
    probabilities float32 [N, 10]
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
FEATURES = 64
HIDDEN = 256
CLASSES = 10
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
        The ONNX model bytes (about 340 KB).
    """
    rng = np.random.default_rng(seed)
    # He initialisation keeps the activations in a sane range for random inputs.
    shapes = {"1": (FEATURES, HIDDEN), "2": (HIDDEN, HIDDEN), "3": (HIDDEN, CLASSES)}
    initializers = []
    nodes = []
    previous = INPUT_NAME
    for layer, (fan_in, fan_out) in shapes.items():
        last = layer == "3"
        gain = scale if last else 1.0
        weight = rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in) * gain
        bias = rng.standard_normal(fan_out) * 0.1 * gain
        initializers += [
            numpy_helper.from_array(np.asarray(weight, dtype=np.float32), f"w{layer}"),
            numpy_helper.from_array(np.asarray(bias, dtype=np.float32), f"b{layer}"),
        ]
        out = "logits" if last else f"hidden{layer}"
        nodes += [
            helper.make_node(
                "MatMul", [previous, f"w{layer}"], [f"mm{layer}"], name=f"dense{layer}"
            ),
            helper.make_node("Add", [f"mm{layer}", f"b{layer}"], [out], name=f"bias{layer}"),
        ]
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"{out}_relu"], name=f"relu{layer}"))
            out = f"{out}_relu"
        previous = out
    nodes.append(helper.make_node("Softmax", ["logits"], [OUTPUT_NAME], name="softmax", axis=-1))
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
