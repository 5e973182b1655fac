"""Normalising an ONNX graph so the quantizers see what onnxruntime runs.

Models exported by real tools differ from the ones the quantizers were
written for, in ways that do not change what the model computes:

* weights held by ``Constant`` nodes instead of initializers (paddle2onnx,
  spox): onnxruntime's quantizers and fp16 converter only touch
  initializers, so such a model looked weightless;
* a default-domain opset below 13, where ``DequantizeLinear`` has no
  ``axis`` and per-channel QDQ cannot be expressed;
* a ``Gemm`` bias stored as ``[1, N]`` (tf2onnx after MatMul+Add fusion),
  which onnxruntime's per-channel QDQ quantizer indexes row-wise and crashes
  on ("The truth value of an array with more than one element is ambiguous").

Each function here rewrites one of these into the equivalent form. None is
applied to the ``fp32`` candidate: that one ships the source bytes as given.
"""

from __future__ import annotations

import heapq

import numpy as np
import onnx
from onnx import numpy_helper

from edgefleet.controller.compiler.errors import RecipeError

__all__ = [
    "DEFAULT_DOMAINS",
    "default_opset",
    "ensure_opset",
    "flatten_gemm_biases",
    "float_weight_bytes",
    "lift_constants",
]

DEFAULT_DOMAINS = ("", "ai.onnx")
# IR 4 is the first version where an initializer need not also be a graph input.
_MIN_IR_FOR_FREE_INITIALIZERS = 4


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    graphs: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(attr.graphs)
    return graphs


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor a ``Constant`` node produces, or ``None`` for forms kept as nodes.

    Sparse and string constants stay nodes: no quantizer wants them and an
    initializer cannot hold a sparse tensor.
    """
    if len(node.attribute) != 1 or len(node.output) != 1:
        return None
    attr = node.attribute[0]
    value: np.ndarray | None = None
    if attr.name == "value":
        tensor = onnx.TensorProto()
        tensor.CopyFrom(attr.t)
        if tensor.data_type == onnx.TensorProto.STRING:
            return None
        tensor.name = node.output[0]
        return tensor
    if attr.name == "value_float":
        value = np.array(attr.f, dtype=np.float32)
    elif attr.name == "value_floats":
        value = np.array(list(attr.floats), dtype=np.float32)
    elif attr.name == "value_int":
        value = np.array(attr.i, dtype=np.int64)
    elif attr.name == "value_ints":
        value = np.array(list(attr.ints), dtype=np.int64)
    if value is None:
        return None
    return numpy_helper.from_array(value, node.output[0])


def lift_constants(model: onnx.ModelProto) -> int:
    """Turn ``Constant`` nodes into initializers of the graph holding them, in place.

    Subgraph constants become that subgraph's initializers (a subgraph may
    also read the outer graph's). A constant that is itself a graph output
    stays a node: an output must be produced by a node or be an input.

    Returns:
        How many constants were lifted.
    """
    model.ir_version = max(model.ir_version, _MIN_IR_FOR_FREE_INITIALIZERS)

    def lift(graph: onnx.GraphProto) -> int:
        count = 0
        outputs = {o.name for o in graph.output}
        kept: list[onnx.NodeProto] = []
        for node in graph.node:
            for sub in _subgraphs(node):
                count += lift(sub)
            if (
                node.op_type == "Constant"
                and node.domain in DEFAULT_DOMAINS
                and node.output
                and node.output[0] not in outputs
            ):
                tensor = _constant_tensor(node)
                if tensor is not None:
                    graph.initializer.append(tensor)
                    count += 1
                    continue
            kept.append(node)
        if count:
            del graph.node[:]
            graph.node.extend(kept)
        return count

    return lift(model.graph)


def float_weight_bytes(graph: onnx.GraphProto, *, subgraphs: bool = True) -> int:
    """Bytes of float initializers in ``graph`` (and its subgraphs): what quantization shrinks."""
    total = sum(
        int(numpy_helper.to_array(i).nbytes)
        for i in graph.initializer
        if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)
    )
    if subgraphs:
        for node in graph.node:
            for sub in _subgraphs(node):
                total += float_weight_bytes(sub)
    return total


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (``ai.onnx``) opset version; 1 when it imports none."""
    versions = [o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    return int(max(versions)) if versions else 1


def ensure_opset(model: bytes, minimum: int, why: str) -> tuple[bytes, str | None]:
    """The model at default-domain opset ``minimum`` or newer, converting it if needed.

    Args:
        model: serialized ONNX model.
        minimum: the lowest opset the caller can work with.
        why: what needs it, for the note and the error.

    Returns:
        The (possibly converted) model, and a note saying it was converted
        (``None`` when it already was new enough).

    Raises:
        RecipeError: ``onnx.version_converter`` cannot convert it.
    """
    proto = onnx.load_model_from_string(model)
    current = default_opset(proto)
    if current >= minimum:
        return model, None
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(proto, minimum)
        onnx.checker.check_model(converted)
    except Exception as exc:  # noqa: BLE001 - the converter raises RuntimeError, ValueError, ...
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise RecipeError(
            f"{why}, but converting opset {current} to {minimum} failed: {text}"
        ) from None
    data: bytes = converted.SerializeToString()
    return data, f"converted opset {current} -> {minimum}: {why}"


def flatten_gemm_biases(model: onnx.ModelProto) -> list[str]:
    """Store ``[1, N]`` ``Gemm`` bias initializers as ``[N]``, in place.

    ``C`` broadcasts to ``[M, N]`` either way, so the result is identical;
    onnxruntime's per-channel QDQ quantizer only copes with the 1-D form.
    Only initializers read by nothing but ``Gemm`` biases are changed.

    Returns:
        Names of the biases reshaped.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    declared = {i.name for i in graph.input}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, k))
    changed: list[str] = []
    for name, uses in readers.items():
        init = inits.get(name)
        if init is None or name in declared or len(init.dims) != 2 or init.dims[0] != 1:
            continue
        if not all(n.op_type == "Gemm" and n.domain in DEFAULT_DOMAINS and k == 2 for n, k in uses):
            continue
        flat = numpy_helper.from_array(numpy_helper.to_array(init).reshape(-1), name)
        init.CopyFrom(flat)
        changed.append(name)
    if changed:
        # A recorded [1, N] shape for the bias would now contradict it.
        kept = [v for v in graph.value_info if v.name not in changed]
        del graph.value_info[:]
        graph.value_info.extend(kept)
    return changed


def _consumed(node: onnx.NodeProto) -> set[str]:
    """Every value ``node`` reads, its subgraphs' outer-scope reads included.

    Names produced inside a subgraph are counted too (an over-approximation):
    no top-level node produces them, so they add no ordering constraint.
    """
    names = {name for name in node.input if name}
    stack = _subgraphs(node)
    while stack:
        graph = stack.pop()
        for inner in graph.node:
            names.update(name for name in inner.input if name)
            stack.extend(_subgraphs(inner))
    return names


def sort_topologically(graph: onnx.GraphProto) -> bool:
    """Order ``graph``'s nodes so each comes after the nodes whose outputs it reads.

    Some converters (onnxruntime's fp16 converter with ``keep_io_types``)
    append the nodes they add after their consumers. onnxruntime sorts for
    itself, but the ONNX checker, and every tool that follows it, refuses such
    a graph. Stable: nodes already in order keep their order. A cycle leaves
    the graph as it is (the checker will name it).

    Returns:
        Whether the order changed.
    """
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    waiting = [0] * len(nodes)  # how many producers each node still waits for
    readers: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        for j in {producer[n] for n in _consumed(node) if n in producer and producer[n] != i}:
            waiting[i] += 1
            readers[j].append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)  # the earliest ready node first: stable
    placed: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        placed.append(i)
        for reader in readers[i]:
            waiting[reader] -= 1
            if waiting[reader] == 0:
                heapq.heappush(ready, reader)
    if len(placed) < len(nodes) or placed == list(range(len(nodes))):
        return False  # in order already, or a cycle (not ours to hide: the checker names it)
    del graph.node[:]
    graph.node.extend(nodes[i] for i in placed)
    return True
