"""Loading and inspecting the fp32 source model.

Everything the recipes and the accuracy gate need to know about the source is
computed once here: the parsed graph, its inputs and outputs as
:class:`~edgefleet.protocols.bundle.TensorSpec`, the op mix (which decides
static versus dynamic quantization), and whether onnxruntime can run it at
all. A source onnxruntime cannot load is refused up front: every variant is
compared against it, so nothing could be verified.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import external_data_helper, helper

from edgefleet.controller.compiler.errors import SourceModelError
from edgefleet.controller.compiler.normalize import (
    default_opset,
    float_weight_bytes,
    lift_constants,
)
from edgefleet.protocols.bundle import TensorSpec
from edgefleet.shared.runtime import is_tflite

__all__ = [
    "CONV_OPS",
    "MATMUL_OPS",
    "RNN_OPS",
    "SourceModel",
    "first_line",
    "load_onnx_source",
    "make_session",
    "read_source",
]

CONV_OPS = frozenset({"Conv", "ConvTranspose"})
MATMUL_OPS = frozenset({"MatMul", "Gemm"})
RNN_OPS = frozenset({"LSTM", "GRU", "RNN"})
ATTENTION_OPS = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention"})
# dim_param values that name no axis: each such axis is dynamic on its own.
_ANONYMOUS_DIMS = frozenset({"", "?"})


def make_session(model: bytes, *, threads: int = 1, optimize: bool = True) -> Any:
    """An onnxruntime CPU session configured the way the agent runs models.

    One intra-op thread: latency is compared per inference on a shared
    machine, and a gateway rarely gives a model every core. ORT's own
    warnings go to the error level only, so they do not drown the report.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _np_dtype(elem_type: int) -> str:
    try:
        return str(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name)
    except (KeyError, TypeError, ValueError):
        return f"onnx:{elem_type}"


def _spec(vi: onnx.ValueInfoProto) -> tuple[TensorSpec, tuple[str | None, ...]]:
    t = vi.type.tensor_type
    dims: list[int | None] = []
    params: list[str | None] = []
    if t.HasField("shape"):
        for d in t.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
                params.append(None)
            else:
                # Exporters write a dynamic axis as a name, as nothing, as
                # dim_value -1 or 0 (Paddle) or as the literal name "?"
                # (paddle2onnx). Only a real name ties axes together: two "?"
                # axes are two independent axes, as onnxruntime treats them.
                dims.append(None)
                named = d.HasField("dim_param") and d.dim_param not in _ANONYMOUS_DIMS
                params.append(d.dim_param if named else None)
    return TensorSpec(vi.name, _np_dtype(t.elem_type), tuple(dims)), tuple(params)


def _is_attention_matmul(node: onnx.NodeProto, constants: set[str]) -> bool:
    """A MatMul of two activations (no weight operand): the QK^T / AV of attention."""
    return node.op_type == "MatMul" and all(i not in constants for i in node.input)


@dataclass(frozen=True)
class SourceModel:
    """The fp32 source model, parsed and inspected.

    Attributes:
        data: the source bytes exactly as given (the ``fp32`` candidate).
        proto: the parsed model with every node given a unique name (recipes
            and sensitivity analysis refer to nodes by name).
        inputs / outputs: tensor specs; ``None`` in a shape is a dynamic axis.
        dim_params: per input, the symbolic name of each dynamic axis, so the
            data loader can check that inputs sharing ``seq`` agree on it.
        op_counts: node count per op type, subgraphs included.
        kind: ``cnn``, ``transformer``, ``rnn``, ``mlp`` or ``other``: the op
            mix that decides static versus dynamic int8.
        weight_bytes: bytes in float initializers (what quantization shrinks),
            counted after ``Constant``-node weights were lifted, subgraphs included.
        lifted_constants: how many ``Constant`` nodes were turned into
            initializers in ``proto`` (the recipes' input; ``data`` is untouched).
        opset: the default-domain opset of the source.
        format: ``"onnx"``, or ``"tflite"`` for a ``.tflite`` source (see
            :mod:`~edgefleet.controller.compiler.tflite`); a TFLite source
            has an empty ``proto``, its flatbuffer is ``data``.
    """

    data: bytes
    proto: onnx.ModelProto
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dim_params: Mapping[str, tuple[str | None, ...]]
    op_counts: Mapping[str, int]
    kind: str
    weight_bytes: int
    sha256: str = field(default="")
    format: str = "onnx"
    lifted_constants: int = 0
    opset: int = 0

    @property
    def size_bytes(self) -> int:
        return len(self.data)

    @property
    def named_bytes(self) -> bytes:
        """The source with unique node names, serialized (input to the recipes)."""
        data: bytes = self.proto.SerializeToString()
        return data


def _classify(graph: onnx.GraphProto, counts: Counter[str]) -> str:
    """The op-mix kind; the first matching rule wins."""
    constants = {i.name for i in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    conv = sum(counts[o] for o in CONV_OPS)
    mm = sum(counts[o] for o in MATMUL_OPS)
    attention = bool(counts["Softmax"]) and any(
        _is_attention_matmul(n, constants) for n in graph.node
    )
    rules = (
        ("rnn", any(counts[o] for o in RNN_OPS)),
        ("transformer", any(counts[o] for o in ATTENTION_OPS)),
        ("cnn", bool(conv) and conv >= mm),
        ("transformer", attention),
        ("mlp", bool(mm)),
        ("cnn", bool(conv)),
    )
    return next((kind for kind, hit in rules if hit), "other")


def _count_ops(graph: onnx.GraphProto, counts: Counter[str]) -> None:
    for node in graph.node:
        counts[node.op_type] += 1
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _count_ops(attr.g, counts)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _count_ops(g, counts)


def _name_nodes(graph: onnx.GraphProto) -> None:
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            base = f"{node.op_type}_{i}"
            name = base
            k = 0
            while name in seen:
                k += 1
                name = f"{base}_{k}"
            node.name = name
        seen.add(node.name)


def read_source(source: Path | str | bytes) -> tuple[bytes, str]:
    """The source's bytes and how to name it in messages.

    Raises:
        SourceModelError: the file cannot be read, is a directory or is empty.
    """
    if isinstance(source, bytes | bytearray):
        data, where = bytes(source), "source model"
    else:
        path = Path(source)
        where = f"source model {path}"
        try:
            data = path.read_bytes()
        except IsADirectoryError:
            raise SourceModelError(f"{where} is a directory, not a model file") from None
        except OSError as exc:
            raise SourceModelError(f"cannot read {where}: {exc.strerror or exc}") from None
        if data and not is_tflite(data):
            data = _embed_external_data(data, path, where)
    if not data:
        raise SourceModelError(f"{where} is empty")
    return data, where


def _external_tensors(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    from onnx.external_data_helper import _get_all_tensors  # subgraphs' tensors too

    return [t for t in _get_all_tensors(proto) if t.data_location == onnx.TensorProto.EXTERNAL]


def _embed_external_data(data: bytes, path: Path, where: str) -> bytes:
    """An ONNX file whose weights sit in external data files, with the weights read in.

    Exporters write models over a size limit (and some under it) as a small
    ``.onnx`` plus data files beside it. The compiler works on one
    self-contained model: the fp32 candidate, every variant and the bundle
    then carry the weights. A data file must lie inside the model's
    directory (a ``location`` of ``../../etc/x`` is refused), as onnx
    itself requires. Anything that is not ONNX is returned unchanged for the
    parser to report.

    Raises:
        SourceModelError: a data file is missing, unreadable, outside the
            model's directory, or the embedded model would exceed protobuf's 2 GB.
    """
    try:
        proto = onnx.load_model_from_string(data)
    except Exception:  # noqa: BLE001 - not ONNX: _parse says so
        return data
    external = _external_tensors(proto)
    if not external:
        return data
    base = path.resolve().parent
    for t in external:
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if not location or not target.is_relative_to(base):
            raise SourceModelError(
                f"{where}: weight {t.name!r} points to external data {location!r} outside the "
                "model's directory"
            )
        if not target.is_file():
            raise SourceModelError(
                f"{where}: weight {t.name!r} is stored in external data file {location!r}, "
                f"which is missing from {base}"
            )
    try:
        external_data_helper.load_external_data_for_model(proto, str(base))
        full: bytes = proto.SerializeToString()
    except (OSError, ValueError) as exc:
        raise SourceModelError(
            f"{where}: cannot read its external data: {first_line(exc)}"
        ) from None
    return full


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and friends
        raise SourceModelError(f"{where} is not an ONNX model ({type(exc).__name__})") from None
    if not proto.graph.node or not proto.opset_import or proto.ir_version <= 0:
        # Random bytes sometimes decode as a protobuf message with no graph.
        raise SourceModelError(f"{where} is not an ONNX model (no graph, opset or IR version)")
    if _external_tensors(proto):
        raise SourceModelError(
            f"{where} keeps weights in external data files; give the path of the .onnx file "
            "so they are read from its directory"
        )
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise SourceModelError(f"{where} is not a valid ONNX model: {first_line(exc)}") from None
    return proto


def _io(
    proto: onnx.ModelProto, where: str
) -> tuple[list[TensorSpec], list[TensorSpec], dict[str, tuple[str | None, ...]]]:
    init_names = {i.name for i in proto.graph.initializer}
    inputs: list[TensorSpec] = []
    dim_params: dict[str, tuple[str | None, ...]] = {}
    for vi in proto.graph.input:
        if vi.name in init_names:
            continue
        spec, params = _spec(vi)
        inputs.append(spec)
        dim_params[vi.name] = params
    if not inputs:
        raise SourceModelError(f"{where} has no inputs")
    outputs = [_spec(vi)[0] for vi in proto.graph.output]
    bad = [s for s in (*inputs, *outputs) if s.dtype.startswith("onnx:")]
    if bad:
        raise SourceModelError(
            f"{where}: tensor {bad[0].name!r} has an element type numpy cannot hold "
            f"({bad[0].dtype})"
        )
    return inputs, outputs, dim_params


def load_onnx_source(data: bytes, where: str) -> SourceModel:
    """Parse, check and trial-load an ONNX source model.

    :func:`~edgefleet.controller.compiler.pipeline.load_source` reads the file
    and sends TFLite sources to
    :func:`~edgefleet.controller.compiler.tflite.load_tflite_source` instead.

    Raises:
        SourceModelError: ``data`` is not an ONNX model, fails the ONNX
            checker, stores weights externally, has no inputs, or onnxruntime
            cannot load it.
    """
    proto = _parse(data, where)
    inputs, outputs, dim_params = _io(proto, where)
    try:
        make_session(data)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises bare RuntimeError subclasses
        raise SourceModelError(f"onnxruntime cannot load {where}: {first_line(exc)}") from None
    named = onnx.ModelProto()
    named.CopyFrom(proto)
    # Weights in Constant nodes are invisible to the quantizers and the fp16
    # converter, which only rewrite initializers; lifting them changes nothing
    # the model computes.
    lifted = lift_constants(named)
    _name_nodes(named.graph)
    counts: Counter[str] = Counter()
    _count_ops(named.graph, counts)
    return SourceModel(
        data=data,
        proto=named,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        dim_params=dim_params,
        op_counts=dict(counts),
        kind=_classify(named.graph, counts),
        weight_bytes=float_weight_bytes(named.graph),
        sha256=hashlib.sha256(data).hexdigest(),
        lifted_constants=lifted,
        opset=default_opset(proto),
    )


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."
