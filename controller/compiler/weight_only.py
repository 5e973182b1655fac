"""Weight-only quantization: int8 or int4 weights in the file, float arithmetic on the device.

Static and dynamic int8 make a model smaller *and* change how it computes.
On CPUs without int8 dot-product instructions (AVX2 without VNNI, Arm
without ``asimddp``), and on Conv nets where per-tensor activation ranges
clip, that computation is slower or less accurate than fp32. Weight-only
quantization only changes how the weights are *stored*:

* **int8** (:func:`weight_only_int8`): each large Conv, ConvTranspose,
  MatMul, Gemm or Gather weight becomes a symmetric per-output-channel int8
  initializer and a ``DequantizeLinear`` that produces the original float
  tensor under its original name, so every consumer is unchanged. The file
  is about 4x smaller for weight-dominated models; accuracy is that of
  rounding each weight to 1/254 of its channel's range.

  onnxruntime folds those ``DequantizeLinear`` nodes into float constants
  when the session is created, but only with the session config entry
  ``session.disable_quant_qdq=1``; by default it keeps them for QDQ fusions,
  blocking Conv fusions and layouts (1.65-1.84x slower than fp32 measured on
  real Conv models). The model therefore asks for that entry in its own
  metadata (:data:`~edgefleet.shared.runtime.ONNX_SESSION_CONFIG_KEY`): the
  agent's backend and the compiler's timing both read it, so the variant is
  measured the way the gateway will run it.

* **int4** (:func:`weight_only_int4`): onnxruntime's ``MatMulNBitsQuantizer``
  turns MatMul weights (and, optionally, Gather embedding tables) into
  blockwise 4-bit ``MatMulNBits`` / ``GatherBlockQuantized`` contrib ops.
  The remaining Conv/Gemm weights then get the int8 treatment above.

Weights inside ``If``/``Loop``/``Scan`` subgraphs are reached too (int8):
each graph's own initializers are rewritten in that graph, and a subgraph
that reads an outer-scope weight reads the dequantized tensor by its name.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgefleet.controller.compiler.errors import RecipeError
from edgefleet.shared.runtime import ONNX_SESSION_CONFIG_KEY

__all__ = [
    "FOLD_WEIGHTS_SESSION_CONFIG",
    "INT4_BLOCK_SIZES",
    "WEIGHT_ONLY_OPS",
    "WeightOnlyStats",
    "int4_tooling_missing",
    "weight_only_int4",
    "weight_only_int8",
]

# What a weight-only model asks its session for (see the module docstring).
FOLD_WEIGHTS_SESSION_CONFIG = {"session.disable_quant_qdq": "1"}
# Block sizes the int4 recipes try; each becomes its own measured candidate.
INT4_BLOCK_SIZES = (32, 64, 128)
# A weight is worth storing in int8 when it has at least this many elements
# and this many per channel: below that the fp32 scales eat the gain.
_MIN_ELEMENTS = 256
_MIN_PER_CHANNEL = 4
_INT8_MAX = 127
# Op type -> (weight input index, per-channel axis of that weight).
_WEIGHT_INPUTS: dict[str, tuple[int, int]] = {
    "Conv": (1, 0),
    "ConvTranspose": (1, 1),
    "MatMul": (1, 1),
    "Gemm": (1, 1),
    "Gather": (0, 0),
}
WEIGHT_ONLY_OPS = frozenset(_WEIGHT_INPUTS)


@dataclass(frozen=True)
class WeightOnlyStats:
    """What a weight-only rewrite did, for the candidate's notes."""

    quantized: int
    quantized_bytes: int
    kept_small: int
    in_subgraphs: int

    def note(self, what: str = "int8 per-channel") -> str:
        text = (
            f"{self.quantized} weight tensor(s) ({self.quantized_bytes / 1e6:.2f} MB fp32) "
            f"stored as {what}"
        )
        if self.in_subgraphs:
            text += f", {self.in_subgraphs} of them inside If/Loop/Scan subgraphs"
        if self.kept_small:
            text += f"; {self.kept_small} small tensor(s) kept float (scales would eat the gain)"
        return text


def _graphs(graph: onnx.GraphProto, depth: int = 0) -> Iterator[tuple[onnx.GraphProto, int]]:
    yield graph, depth
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g, depth + 1)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g, depth + 1)


def _weight_axes(
    graphs: list[tuple[onnx.GraphProto, int]], exclude: Collection[str]
) -> tuple[dict[str, int], set[str]]:
    """Weight name -> per-channel axis, for every weight input of a supported node.

    Also returns the names used by excluded nodes: those stay float even if
    another node shares them.
    """
    axes: dict[str, int] = {}
    blocked: set[str] = set()
    for graph, _ in graphs:
        for node in graph.node:
            spec = _WEIGHT_INPUTS.get(node.op_type)
            if spec is None or node.domain not in ("", "ai.onnx"):
                continue
            index, axis = spec
            if len(node.input) <= index or not node.input[index]:
                continue
            name = node.input[index]
            if node.name in exclude:
                blocked.add(name)
                continue
            if node.op_type == "Gemm":
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                axis = 0 if trans_b else 1
            axes.setdefault(name, axis)
    return axes, blocked


def _quantize_int8(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8 along ``axis``: (int8 values, float32 scales)."""
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    amax = np.abs(moved).max(axis=1)
    scale = np.where(amax > 0, amax / _INT8_MAX, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -_INT8_MAX, _INT8_MAX).astype(np.int8)
    return q, scale


def _unique(base: str, taken: set[str]) -> str:
    name = base
    i = 1
    while name in taken:
        name = f"{base}_{i}"
        i += 1
    taken.add(name)
    return name


def _all_names(graphs: list[tuple[onnx.GraphProto, int]]) -> set[str]:
    names: set[str] = set()
    for graph, _ in graphs:
        names.update(i.name for i in graph.initializer)
        names.update(v.name for v in graph.input)
        for node in graph.node:
            names.update(node.output)
            names.update(node.input)
    return names


def weight_only_int8(
    model: onnx.ModelProto, *, exclude: Collection[str] = ()
) -> tuple[onnx.ModelProto, WeightOnlyStats]:
    """Store large float weights as per-channel int8 + ``DequantizeLinear`` (in place).

    The model must be at default-domain opset 13 or newer (``DequantizeLinear``
    with ``axis``). Weights that are graph inputs (overridable), not float32,
    not finite, of rank < 2 or too small are left as they are.

    Args:
        model: the model to rewrite; it is modified and returned.
        exclude: node names whose weights stay float.

    Returns:
        The model and what was done.

    Raises:
        RecipeError: nothing was worth quantizing.
    """
    graphs = list(_graphs(model.graph))
    axes, blocked = _weight_axes(graphs, set(exclude))
    graph_inputs = {v.name for v in model.graph.input}
    taken = _all_names(graphs)
    quantized = kept = in_sub = 0
    qbytes = 0
    for graph, depth in graphs:
        keep: list[onnx.TensorProto] = []
        added: list[onnx.TensorProto] = []
        dq_nodes: list[onnx.NodeProto] = []
        for init in graph.initializer:
            axis = axes.get(init.name)
            if (
                axis is None
                or init.name in blocked
                or init.name in graph_inputs
                or init.data_type != onnx.TensorProto.FLOAT
                or init.data_location == onnx.TensorProto.EXTERNAL
                or len(init.dims) < 2
            ):
                keep.append(init)
                continue
            w = numpy_helper.to_array(init)
            channels = w.shape[axis]
            if w.size < _MIN_ELEMENTS or w.size < _MIN_PER_CHANNEL * channels:
                kept += 1
                keep.append(init)
                continue
            if not np.all(np.isfinite(w)):
                keep.append(init)
                continue
            q, scale = _quantize_int8(w, axis)
            q_name = _unique(f"{init.name}_int8", taken)
            s_name = _unique(f"{init.name}_scale", taken)
            added.append(numpy_helper.from_array(q, q_name))
            added.append(numpy_helper.from_array(scale, s_name))
            dq_nodes.append(
                helper.make_node(
                    "DequantizeLinear",
                    [q_name, s_name],
                    [init.name],
                    name=_unique(f"{init.name}_wo_dq", taken),
                    axis=axis,
                )
            )
            quantized += 1
            qbytes += int(w.nbytes)
            in_sub += depth > 0
        if not dq_nodes:
            continue
        del graph.initializer[:]
        graph.initializer.extend([*keep, *added])
        nodes = [*dq_nodes, *graph.node]
        del graph.node[:]
        graph.node.extend(nodes)
    if quantized == 0:
        raise RecipeError(
            "no Conv/ConvTranspose/MatMul/Gemm/Gather weight large enough to store in int8"
        )
    _ask_for_folding(model)
    return model, WeightOnlyStats(quantized, qbytes, kept, in_sub)


def _ask_for_folding(model: onnx.ModelProto) -> None:
    """Record in the model that it must be opened with its DequantizeLinear folded."""
    for prop in model.metadata_props:
        if prop.key == ONNX_SESSION_CONFIG_KEY:
            asked = json.loads(prop.value) if prop.value else {}
            asked.update(FOLD_WEIGHTS_SESSION_CONFIG)
            prop.value = json.dumps(asked, sort_keys=True)
            return
    helper.set_model_props(
        model,
        {
            **{p.key: p.value for p in model.metadata_props},
            ONNX_SESSION_CONFIG_KEY: json.dumps(FOLD_WEIGHTS_SESSION_CONFIG, sort_keys=True),
        },
    )


def int4_tooling_missing() -> str | None:
    """Why onnxruntime's int4 quantizer cannot be used here, or ``None`` if it can."""
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import (  # noqa: F401
            MatMulNBitsQuantizer,
        )
    except ImportError as exc:
        return (
            f"onnxruntime's MatMulNBits quantizer is not importable ({exc}); "
            "install edgefleet[controller] (it needs the onnx-ir package)"
        )
    return None


def weight_only_int4(
    model: onnx.ModelProto, *, block_size: int, gather: bool, exclude: Collection[str] = ()
) -> onnx.ModelProto:
    """MatMul (and Gather) weights as blockwise symmetric int4 via onnxruntime's quantizer.

    Args:
        model: the model; it is not modified (the quantizer mutates its
            input, so it gets a copy).
        block_size: weights per scale along the reduction axis.
        gather: also quantize Gather tables (needs default opset 21: the
            caller converts first).
        exclude: node names kept float.

    Returns:
        A new model with ``MatMulNBits``/``GatherBlockQuantized`` nodes.

    Raises:
        RecipeError: the tooling is missing, or no weight was quantized.
    """
    missing = int4_tooling_missing()
    if missing:
        raise RecipeError(missing)
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    work = onnx.ModelProto()
    work.CopyFrom(model)
    ops = ("MatMul", "Gather") if gather else ("MatMul",)
    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size,
        is_symmetric=True,
        accuracy_level=None,
        quant_format=QuantFormat.QOperator,
        op_types_to_quantize=ops,
        bits=4,
    )
    quantizer = MatMulNBitsQuantizer(work, nodes_to_exclude=list(exclude), algo_config=config)
    # Its logger has its own console handler and reports every skipped node at INFO.
    chatty = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = chatty.level
    chatty.setLevel(logging.WARNING)
    try:
        quantizer.process()
    finally:
        chatty.setLevel(level)
    out: onnx.ModelProto = quantizer.model.model
    new_ops = {n.op_type for n in out.graph.node}
    if not new_ops & {"MatMulNBits", "GatherBlockQuantized"}:
        raise RecipeError(
            "no MatMul with a constant 2-D weight"
            + (" or Gather table" if gather else "")
            + " for int4 (MatMulNBits quantizes only those)"
        )
    return out
