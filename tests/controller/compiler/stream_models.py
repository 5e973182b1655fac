"""A small stateful model like a streaming voice-activity detector (silero-vad's pattern).

One call is one step of a stream: ``x`` (a frame of features), ``state`` (the
recurrent state the previous step returned) and ``sr`` (the sample rate, a
scalar) go in; ``prob`` (a [1, 1] probability) and ``stateN`` come out. The
update is ``Tanh(gain * (xs @ wx + state @ ws))``, where ``xs`` is the frame
scaled by an ``If`` on the sample rate (silero-vad branches on it too). The
recurrent gain is above 1, so a small error in the state grows from step to
step: what a per-step check never sees.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

F = np.float32


def stateful_vad(features: int = 16, hidden: int = 32, gain: float = 3.0, seed: int = 0) -> bytes:
    """``x[1, features]``, ``state[1, hidden]``, ``sr`` -> ``prob[1, 1]``, ``stateN[1, hidden]``."""
    rng = np.random.default_rng(seed)

    def branch(tag: str, scale: float) -> onnx.GraphProto:
        # Per-rate input scaling, as silero-vad picks its front end by rate;
        # the scale is held in the branch's own Constant node.
        k = numpy_helper.from_array(np.array(scale, F), f"{tag}_k_value")
        return helper.make_graph(
            [
                helper.make_node("Constant", [], [f"{tag}_k"], value=k, name=f"{tag}_k_const"),
                helper.make_node("Mul", ["x", f"{tag}_k"], [f"{tag}_xs"], name=f"{tag}_scale"),
            ],
            tag,
            [],
            [helper.make_tensor_value_info(f"{tag}_xs", TensorProto.FLOAT, [1, features])],
        )

    g = numpy_helper.from_array(np.array(gain, F), "gain_value")
    nodes = [
        helper.make_node("Equal", ["sr", "k16"], ["is16"], name="is16k"),
        helper.make_node(
            "If",
            ["is16"],
            ["xs"],
            then_branch=branch("then", 1.0),
            else_branch=branch("else", 2.0),
            name="rate_switch",
        ),
        helper.make_node("MatMul", ["xs", "wx"], ["a"], name="input_proj"),
        helper.make_node("MatMul", ["state", "ws"], ["b"], name="recurrent"),
        helper.make_node("Add", ["a", "b"], ["c"], name="sum"),
        helper.make_node("Constant", [], ["gain"], value=g, name="gain_const"),
        helper.make_node("Mul", ["c", "gain"], ["d"], name="apply_gain"),
        helper.make_node("Tanh", ["d"], ["stateN"], name="update"),
        helper.make_node("MatMul", ["stateN", "wo"], ["logit"], name="head"),
        helper.make_node("Sigmoid", ["logit"], ["prob"], name="sigmoid"),
    ]
    inits = {
        "wx": rng.normal(0, 0.15 / np.sqrt(features), (features, hidden)).astype(F),
        "ws": rng.normal(0, 1.0 / np.sqrt(hidden), (hidden, hidden)).astype(F),
        "wo": rng.normal(0, 3.0 / np.sqrt(hidden), (hidden, 1)).astype(F),
        "k16": np.array(16000, np.int64),
    }
    graph = helper.make_graph(
        nodes,
        "stateful_vad",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, features]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [1, hidden]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 1]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [1, hidden]),
        ],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def stream_frames(
    streams: int, steps: int, features: int = 16, seed: int = 1
) -> dict[str, npt.NDArray[Any]]:
    """``streams`` streams of ``steps`` frames, one after another along axis 0.

    Frames are a slowly drifting signal (consecutive frames are correlated,
    as audio features are); ``stream:id`` marks which stream a step belongs to.
    """
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(streams):
        level = rng.normal(0, 1, features)
        for _ in range(steps):
            level = 0.8 * level + 0.6 * rng.normal(0, 1, features)
            frames.append(level)
    n = streams * steps
    return {
        "x": np.asarray(frames, F).reshape(n, 1, features),
        "sr": np.full(n, 16000, np.int64),
        "stream:id": np.repeat(np.arange(streams), steps).astype(np.int64),
    }


def recorded_states(model: bytes, data: dict[str, npt.NDArray[Any]]) -> dict[str, Any]:
    """Per-step samples: each step with the state fp32 really had there (no ``stream:id``).

    This is what a user without ``--state`` would validate on: the recorded
    fp32 state at every step, so a candidate never sees its own state.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    ids = data["stream:id"]
    hidden = session.get_inputs()[1].shape[1]
    states = []
    h = np.zeros((1, hidden), F)
    for i in range(len(ids)):
        if i == 0 or ids[i] != ids[i - 1]:
            h = np.zeros((1, hidden), F)
        states.append(h)
        _, h = session.run(None, {"x": data["x"][i], "state": h, "sr": np.asarray(data["sr"][i])})
    return {"x": data["x"], "sr": data["sr"], "state": np.stack(states)}
