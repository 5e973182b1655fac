"""Finding the nodes that make a static int8 model inaccurate.

When a static int8 candidate fails the accuracy gate, the usual cause is a
few nodes whose inputs or weights do not survive 8 bits: an activation with a
few huge outliers (the scale that covers them rounds everything else to
zero), or a weight tensor with one extreme channel under per-tensor scales.
Keeping just those nodes in float typically recovers the accuracy at a small
cost in size and speed.

The ranking compares intermediate tensors of the fp32 model and the QDQ model
on the same samples. For each quantized compute node it measures the relative
L2 error of its output against fp32, minus the largest relative error already
present in its activation inputs: the error the node *adds*. Nodes that add
the most are the most sensitive. One pass costs two runs over a few samples,
instead of one quantization per node for quantize-one-node-at-a-time.

Both models run with graph optimisations disabled so every intermediate
tensor exists; in the QDQ graph that simulates int8 arithmetic in float,
which is what the real integer kernels compute up to rounding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from edgefleet.controller.compiler.data import SampleSet
from edgefleet.controller.compiler.source import make_session

__all__ = ["NodeSensitivity", "rank_sensitive_nodes"]

_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})


@dataclass(frozen=True)
class NodeSensitivity:
    """How much error one quantized node adds.

    Attributes:
        node: node name (as in the fp32 model the quantizer started from).
        op_type: the node's op type.
        output_error: relative L2 error of the node's output versus fp32.
        input_error: the largest relative L2 error of its activation inputs.
        added: ``max(output_error - input_error, 0)``: the ranking key.
    """

    node: str
    op_type: str
    output_error: float
    input_error: float
    added: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "op_type": self.op_type,
            "output_error": self.output_error,
            "input_error": self.input_error,
            "added": self.added,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NodeSensitivity:
        return cls(
            node=str(d["node"]),
            op_type=str(d["op_type"]),
            output_error=float(d["output_error"]),
            input_error=float(d["input_error"]),
            added=float(d["added"]),
        )


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    out: set[str] = set()
    for vi in (*g.input, *g.value_info, *g.output):
        if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            out.add(vi.name)
    return out - {i.name for i in g.initializer}


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> bytes:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    for name in names:
        if name not in existing:
            m.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    data: bytes = m.SerializeToString()
    return data


def _relative_errors(
    fp32_model: bytes,
    quant_model: bytes,
    compare: Sequence[tuple[str, str]],
    samples: SampleSet,
    limit: int,
) -> dict[tuple[str, str], float]:
    """Relative L2 error of each (fp32 tensor, quantized tensor) pair over the samples.

    Both models run sample by sample in lockstep and only running sums of
    squares are kept, so memory is one sample's tensors, not every
    sample's (the intermediate tensors of a real 3 MB model over 16 samples
    ran to gigabytes when they were all kept).
    """
    ref_names = sorted({r for r, _ in compare})
    q_names = sorted({q for _, q in compare})
    fp32 = onnx.load_model_from_string(fp32_model)
    quant = onnx.load_model_from_string(quant_model)
    ref_sess = make_session(_with_outputs(fp32, ref_names), optimize=False)
    q_sess = make_session(_with_outputs(quant, q_names), optimize=False)
    ref_sq: dict[tuple[str, str], float] = dict.fromkeys(compare, 0.0)
    diff_sq: dict[tuple[str, str], float] = dict.fromkeys(compare, 0.0)
    broken: set[tuple[str, str]] = set()
    # Every intermediate tensor is a graph output here, so nothing in the
    # arena can be reused within a run; shrinking it after each run keeps
    # two such arenas from sitting next to the next run's (this step peaked
    # PP-OCRv4 rec's compile at 1.5 GB, twice the builds' 0.75 GB).
    import onnxruntime as ort

    shrink = ort.RunOptions()
    shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    for i in range(min(limit, samples.count)):
        feed = samples.feed(i)
        ref = dict(zip(ref_names, ref_sess.run(ref_names, feed, shrink), strict=True))
        got = dict(zip(q_names, q_sess.run(q_names, feed, shrink), strict=True))
        for pair in compare:
            a = np.asarray(ref[pair[0]], dtype=np.float64)
            b = np.asarray(got[pair[1]], dtype=np.float64)
            if a.shape != b.shape:
                broken.add(pair)
                continue
            ref_sq[pair] += float(np.sum(a * a))
            diff_sq[pair] += float(np.sum((a - b) ** 2))
        del ref, got
    out: dict[tuple[str, str], float] = {}
    for pair in compare:
        denom, diff = float(np.sqrt(ref_sq[pair])), float(np.sqrt(diff_sq[pair]))
        if pair in broken:
            out[pair] = float("inf")
        elif denom < 1e-12:
            out[pair] = 0.0 if diff < 1e-12 else float("inf")
        else:
            out[pair] = diff / denom
    return out


def _replaced_nodes(
    fp32: onnx.ModelProto,
    quant: onnx.ModelProto,
    fp32_floats: set[str],
    quantizable: frozenset[str] | set[str] | None,
) -> list[tuple[str, str, str, list[tuple[str, str]]]]:
    """Nodes the quantizer *replaced* rather than wrapped in QDQ: dynamic int8.

    onnxruntime's dynamic quantizer turns a MatMul named ``m`` into
    ``DynamicQuantizeLinear`` + ``MatMulInteger`` (``m_quant``) + scale
    ``Mul`` nodes, so the name ``m`` is gone from the quantized graph (and
    a Gather keeps its name but writes a renamed int8 tensor); but
    the last ``Mul`` writes ``m``'s original output tensor, and the float
    activation it read is still there, under its own name. Comparing those
    two tensors against fp32 measures exactly the error the int8 MatMul adds
    (activation rounding at its run-time scale plus weight rounding), the
    same quantity as for QDQ nodes.
    """
    # A node still there under its name *and* still writing its output is
    # either float or QDQ-wrapped (the caller's loop); one whose output now
    # comes from elsewhere was replaced. Dynamic int8 keeps a Gather's name
    # but makes it read int8 weights into a renamed tensor, which a
    # DequantizeLinear turns back into the original output.
    unchanged = {(n.name, o) for n in quant.graph.node for o in n.output[:1]}
    produced = {o for n in quant.graph.node for o in n.output} | {i.name for i in quant.graph.input}
    inits = {i.name for i in fp32.graph.initializer}
    plan: list[tuple[str, str, str, list[tuple[str, str]]]] = []
    for node in fp32.graph.node:
        if not node.name or not node.output or (node.name, node.output[0]) in unchanged:
            continue
        if quantizable is not None and node.op_type not in quantizable:
            continue
        out = node.output[0]
        if out not in produced or out not in fp32_floats:
            continue
        pairs = [
            (i, i)
            for i in node.input
            if i and i not in inits and i in fp32_floats and i in produced
        ]
        plan.append((node.name, node.op_type, out, pairs))
    return plan


def rank_sensitive_nodes(
    fp32_model: bytes,
    quantized_model: bytes,
    samples: SampleSet,
    *,
    max_samples: int = 16,
    quantizable: frozenset[str] | set[str] | None = None,
) -> list[NodeSensitivity]:
    """Rank the quantized nodes of ``quantized_model`` by the error they add, worst first.

    Works for QDQ models (static int8, weight-only int8: the node keeps its
    name and reads ``DequantizeLinear`` outputs) and for dynamic int8 (the
    node is replaced, its output tensor keeps its name: :func:`_replaced_nodes`).

    Args:
        fp32_model: the (pre-processed) fp32 model the quantizer started from;
            node names must match the quantized model's.
        quantized_model: the QDQ model.
        samples: inputs to compare on (calibration data: no labels needed).
        max_samples: how many samples to run.
        quantizable: op types the recipe quantizes; other nodes are not
            ranked, since keeping them in float would change nothing.

    Returns:
        Every quantized node, most sensitive first: by added error, then by
        output error (relative errors do not simply add up, so a node whose
        output is relatively *less* wrong than its input still ranks by how
        wrong it is).
    """
    fp32 = onnx.load_model_from_string(fp32_model)
    quant = onnx.load_model_from_string(quantized_model)
    fp32_nodes = {n.name: n for n in fp32.graph.node}
    fp32_floats = _float_tensors(fp32)
    producer = {o: n for n in quant.graph.node for o in n.output}
    q_inits = {i.name for i in quant.graph.initializer}

    def source_of(tensor: str) -> str | None:
        """The fp32 tensor a dequantized input stands for: DQ(Q(x)) -> x."""
        dq = producer.get(tensor)
        if dq is None or dq.op_type != "DequantizeLinear":
            return tensor if tensor in fp32_floats else None
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            return None  # a quantized initializer (weight): not an activation
        base = q.input[0]
        return base if base in fp32_floats and base not in q_inits else None

    # (node, op, output tensor, [(quantized input tensor, fp32 tensor)])
    plan: list[tuple[str, str, str, list[tuple[str, str]]]] = []
    plan.extend(_replaced_nodes(fp32, quant, fp32_floats, quantizable))
    for node in quant.graph.node:
        if node.op_type in _QDQ or node.name not in fp32_nodes or not node.output:
            continue
        if quantizable is not None and node.op_type not in quantizable:
            continue
        consumes_qdq = any(
            (p := producer.get(i)) is not None and p.op_type == "DequantizeLinear"
            for i in node.input
        )
        out = node.output[0]
        if not consumes_qdq or out not in fp32_floats:
            continue
        pairs = [(i, base) for i in node.input if i and (base := source_of(i)) is not None]
        plan.append((node.name, node.op_type, out, pairs))
    if not plan:
        return []
    compare = sorted(
        {(out, out) for _, _, out, _ in plan} | {(b, i) for *_, ps in plan for i, b in ps}
    )
    errors = _relative_errors(fp32_model, quantized_model, compare, samples, max_samples)
    ranked: list[NodeSensitivity] = []
    for name, op, out, pairs in plan:
        out_err = errors[(out, out)]
        in_err = max((errors[(b, i)] for i, b in pairs), default=0.0)
        added = max(out_err - in_err, 0.0) if np.isfinite(out_err) else float("inf")
        ranked.append(NodeSensitivity(name, op, out_err, in_err, added))
    ranked.sort(key=lambda s: (-s.added, -s.output_error, s.node))
    return ranked
