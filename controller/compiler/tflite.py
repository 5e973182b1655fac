"""TFLite (LiteRT) sources and recipes.

A profile whose runtime is ``tflite`` compiles a float ``.tflite`` source into
these candidates, all built with litert-quantizer (the LiteRT quantizer, the
successor of the TFLite converter's post-training quantization that needs no
TensorFlow):

* ``fp32``: the source unchanged, the reference every variant is judged by;
* ``int8-dynamic``: int8 weights, activations quantized at run time by the
  kernels (integer compute where LiteRT has hybrid kernels);
* ``int8-static``: int8 weights and activations with ranges calibrated on the
  calibration samples (full-integer model; its int8 inputs and outputs are
  (de)quantized at the agent's boundary, so callers still send float32);
* ``int8-weight-only`` and ``int4-weight-only``: weights stored in 8 or 4
  bits and dequantized before float compute: smaller files, float accuracy,
  rarely faster.

Every candidate then goes through the same gate as an ONNX one: scored
against the fp32 source on the validation samples and timed against it in
interleaved rounds, through :class:`TfliteSession`, which runs models with the
agent's own :class:`~edgefleet.shared.runtime.TfliteBackend` so the compiler
measures exactly what a device will run.

When the quantizer refuses to quantize every supported op (it raises on an op
it cannot handle), the recipe retries with only the weight-heavy core ops
(fully connected, convolutions, batch matmul, embedding lookup) and the
candidate's notes say so; ops left with float weights are listed too.

Variants are verified with ai-edge-litert. Devices should run it too: with
the legacy tflite-runtime 2.14, ``int4-weight-only`` models do not load (no
int4 DEQUANTIZE kernel) and ``int8-dynamic`` models from this quantizer
compute wrong outputs; the bundle smoke test refuses both on such a device.

Converting ONNX to TFLite is not done here: it needs full TensorFlow (via
onnx2tf), which is far too heavy a dependency for the controller.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from edgefleet.controller.compiler.data import Feed
from edgefleet.controller.compiler.errors import RecipeError, SourceModelError
from edgefleet.controller.compiler.profiles import Profile
from edgefleet.controller.compiler.recipe_base import (
    BuildInput,
    Built,
    Recipe,
    SourceRecipe,
    capture_notes,
    dedupe_notes,
)
from edgefleet.controller.compiler.source import SourceModel, first_line
from edgefleet.protocols.errors import ModelLoadError, UnsupportedRuntimeError
from edgefleet.shared.runtime import LoadedModel, TfliteBackend, is_tflite

__all__ = [
    "CORE_OPS",
    "ModelFacts",
    "NormalizedTflite",
    "TfliteQuantRecipe",
    "TfliteSession",
    "TfliteSourceRecipe",
    "asymmetric_conv_weights",
    "inspect_tflite",
    "is_tflite",
    "litert_versions",
    "load_tflite_source",
    "make_tflite_session",
    "normalize_tflite",
    "tflite_recipes",
]

# Weight-heavy ops every quantizer mode supports: the fallback scope.
CORE_OPS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "BATCH_MATMUL", "EMBEDDING_LOOKUP")
_CONV = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "CONV_3D", "TRANSPOSE_CONV"})
_MATMUL = frozenset({"FULLY_CONNECTED", "BATCH_MATMUL"})
_RNN = frozenset(
    {
        "LSTM", "UNIDIRECTIONAL_SEQUENCE_LSTM", "BIDIRECTIONAL_SEQUENCE_LSTM",
        "UNIDIRECTIONAL_SEQUENCE_RNN", "BIDIRECTIONAL_SEQUENCE_RNN", "RNN",
    }
)  # fmt: skip
_FLOAT_TYPES = frozenset({"FLOAT32", "FLOAT16", "FLOAT64"})
_INT_WEIGHT_TYPES = frozenset({"INT8", "INT4", "UINT8", "INT16"})


@dataclass(frozen=True)
class ModelFacts:
    """What the flatbuffer says about a TFLite model, without running it.

    Attributes:
        op_counts: builtin (or custom) op name -> number of uses, all subgraphs.
        float_weight_bytes: bytes of float constant tensors (what quantization shrinks).
        int_weights: number of integer constant tensors of rank >= 2 (quantized
            weights; 0 means nothing was quantized).
        float_weight_ops: op types that still read a float constant of rank >= 2
            (a weight matrix or kernel the quantizer left in float).
        signatures: the model's signature keys.
        fp16_weights: DEQUANTIZE ops reading a stored fp16 constant (a source
            whose weights are fp16, as most MediaPipe models ship).
    """

    op_counts: Mapping[str, int]
    float_weight_bytes: int
    int_weights: int
    float_weight_ops: tuple[str, ...]
    signatures: tuple[str, ...]
    fp16_weights: int = 0


def _enum_names(cls: type) -> dict[int, str]:
    return {v: k for k, v in vars(cls).items() if not k.startswith("_") and isinstance(v, int)}


def inspect_tflite(data: bytes) -> ModelFacts:
    """Read op counts, weight sizes and signatures from a TFLite flatbuffer.

    Uses the flatbuffer schema module ai-edge-litert ships, so it works on
    any model the interpreter accepts without allocating or running it.

    Raises:
        SourceModelError: ``data`` is not a readable TFLite flatbuffer.
    """
    from ai_edge_litert import schema_py_generated as schema

    if not is_tflite(data):
        raise SourceModelError("no TFL3 file identifier")
    ops = _enum_names(schema.BuiltinOperator)
    types = _enum_names(schema.TensorType)
    try:
        model = schema.Model.GetRootAs(data, 0)
        counts: Counter[str] = Counter()
        float_bytes = 0
        int_weights = 0
        float_ops: set[str] = set()
        fp16 = 0
        for si in range(model.SubgraphsLength()):
            graph = model.Subgraphs(si)
            constant: dict[int, tuple[str, int, int]] = {}
            for ti in range(graph.TensorsLength()):
                tensor = graph.Tensors(ti)
                buf = model.Buffers(tensor.Buffer())
                size = max(buf.DataLength(), int(buf.Size()))
                if size:
                    kind = types.get(tensor.Type(), str(tensor.Type()))
                    constant[ti] = (kind, tensor.ShapeLength(), size)
                    if kind in _FLOAT_TYPES:
                        float_bytes += size
                    elif kind in _INT_WEIGHT_TYPES and tensor.ShapeLength() >= 2:
                        int_weights += 1
            for oi in range(graph.OperatorsLength()):
                op = graph.Operators(oi)
                code = model.OperatorCodes(op.OpcodeIndex())
                builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
                name = ops.get(builtin, f"OP_{builtin}")
                if name == "CUSTOM" and code.CustomCode():
                    name = f"CUSTOM:{code.CustomCode().decode('utf-8', 'replace')}"
                counts[name] += 1
                for ti in op.InputsAsNumpy() if op.InputsLength() else ():
                    kind, rank, _ = constant.get(int(ti), ("", 0, 0))
                    if kind in _FLOAT_TYPES and rank >= 2:
                        float_ops.add(name)
                    if name == "DEQUANTIZE" and kind == "FLOAT16":
                        fp16 += 1
        signatures = tuple(
            model.SignatureDefs(i).SignatureKey().decode("utf-8", "replace")
            for i in range(model.SignatureDefsLength())
        )
    except (IndexError, AttributeError, TypeError, UnicodeDecodeError) as exc:
        raise SourceModelError(f"corrupt flatbuffer ({type(exc).__name__})") from None
    return ModelFacts(
        dict(counts), float_bytes, int_weights, tuple(sorted(float_ops)), signatures, fp16
    )


_DEQUANTIZE = 6  # BuiltinOperator.DEQUANTIZE
_FLOAT16 = 1  # TensorType.FLOAT16
_FLOAT32 = 0  # TensorType.FLOAT32
_PLACEHOLDER = 127  # deprecated_builtin_code for ops numbered >= 127


@dataclass(frozen=True)
class NormalizedTflite:
    """A ``.tflite`` source rewritten so litert-quantizer sees it as the interpreter does.

    The ``fp32`` candidate stays the untouched source; only the quantizers get
    these bytes.

    Attributes:
        data: the rewritten flatbuffer.
        opcodes_fixed: operator codes whose ``builtin_code`` was taken from the
            deprecated (schema v3) field. MediaPipe and older TF exports leave
            ``builtin_code`` at 0 (ADD) and keep the op in the deprecated
            int8 field; the interpreter reads the larger of the two, the
            quantizer only ``builtin_code``, so without this it sees every op
            as ADD: weight-only and dynamic find nothing to quantize, and static
            quantizes conv kernels as asymmetric ADD activations, which the
            interpreter then refuses (non-zero CONV_2D weight zero point).
        signature_added: the model had no signature and got ``serving_default``
            over subgraph 0's own inputs and outputs (tensor names), which the
            static calibrator needs; the agent names inputs the same way.
        fp16_weights: fp16 constants behind DEQUANTIZE ops that were turned
            into fp32 constants (the DEQUANTIZE removed), so every mode
            quantizes from the dequantized weights.
    """

    data: bytes
    opcodes_fixed: int = 0
    signature_added: bool = False
    fp16_weights: int = 0

    def notes(self) -> list[str]:
        out = []
        if self.fp16_weights:
            out.append(
                f"source has fp16 weights ({self.fp16_weights} DEQUANTIZE of fp16 constants): "
                "quantized from the dequantized weights; sizes compare with the fp16 file"
            )
        if self.opcodes_fixed:
            out.append(
                f"{self.opcodes_fixed} operator code(s) only in the deprecated schema field; "
                "read as the interpreter does"
            )
        if self.signature_added:
            out.append("no signature: calibrated through the subgraph's own inputs")
        return out


def _buffer_bytes(buf: Any) -> bytes | None:
    data = getattr(buf, "data", None)
    if data is None or len(data) == 0:
        return None
    return bytes(np.asarray(data, dtype=np.uint8).tobytes())


def _drop_tensors(graph: Any, drop: set[int], model: Any, subgraph_index: int) -> None:
    """Remove tensors ``drop`` from ``graph`` and renumber every reference to the rest."""
    keep = [i for i in range(len(graph.tensors)) if i not in drop]
    new_index = {old: new for new, old in enumerate(keep)}

    def remap(indices: Any) -> list[int]:
        return [
            new_index[int(i)] if int(i) >= 0 else int(i)
            for i in (indices if indices is not None else [])
        ]

    graph.tensors = [graph.tensors[i] for i in keep]
    graph.inputs = remap(graph.inputs)
    graph.outputs = remap(graph.outputs)
    for op in graph.operators or []:
        op.inputs = remap(op.inputs)
        op.outputs = remap(op.outputs)
        if op.intermediates is not None and len(op.intermediates):
            op.intermediates = remap(op.intermediates)
    for sig in model.signatureDefs or []:
        if sig.subgraphIndex == subgraph_index:
            for tm in [*(sig.inputs or []), *(sig.outputs or [])]:
                tm.tensorIndex = new_index[int(tm.tensorIndex)]


def _dequantize_fp16(model: Any) -> int:
    """Replace DEQUANTIZE(fp16 constant) by an fp32 constant; returns how many."""
    count = 0
    for si, graph in enumerate(model.subgraphs or []):
        removed_ops: list[int] = []
        sources: set[int] = set()
        for oi, op in enumerate(graph.operators or []):
            code = model.operatorCodes[op.opcodeIndex]
            if max(code.builtinCode, code.deprecatedBuiltinCode) != _DEQUANTIZE:
                continue
            if op.inputs is None or len(op.inputs) != 1 or len(op.outputs) != 1:
                continue
            src = graph.tensors[int(op.inputs[0])]
            raw = _buffer_bytes(model.buffers[src.buffer]) if src.type == _FLOAT16 else None
            if raw is None:
                continue  # a run-time int8 DEQUANTIZE, not a stored fp16 weight
            dst = graph.tensors[int(op.outputs[0])]
            weights = np.frombuffer(raw, dtype=np.float16).astype(np.float32)
            from ai_edge_litert import schema_py_generated as schema

            buf = schema.BufferT()
            buf.data = np.frombuffer(weights.tobytes(), dtype=np.uint8)
            model.buffers.append(buf)
            dst.buffer = len(model.buffers) - 1
            dst.type = _FLOAT32
            removed_ops.append(oi)
            sources.add(int(op.inputs[0]))
            count += 1
        if not removed_ops:
            continue
        gone = set(removed_ops)
        graph.operators = [op for i, op in enumerate(graph.operators) if i not in gone]
        used = {int(i) for op in graph.operators for i in [*op.inputs, *op.outputs] if int(i) >= 0}
        used |= {int(i) for i in [*graph.inputs, *graph.outputs]}
        drop = {t for t in sources if t not in used}
        still = {graph.tensors[t].buffer for t in range(len(graph.tensors)) if t not in drop}
        for t in drop:
            b = graph.tensors[t].buffer
            if b and b not in still:
                model.buffers[b].data = None
        _drop_tensors(graph, drop, model, si)
    return count


def normalize_tflite(data: bytes) -> NormalizedTflite:
    """Rewrite a float ``.tflite`` source into what litert-quantizer can quantize.

    See :class:`NormalizedTflite` for the three rewrites. A model that needs
    none comes back byte-identical.

    Raises:
        SourceModelError: the flatbuffer cannot be read or written back.
    """
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fu

    try:
        model = fu.read_model_from_bytearray(bytearray(data))
    except Exception as exc:  # noqa: BLE001 - flatbuffers raises anything on bad input
        raise SourceModelError(f"corrupt flatbuffer ({type(exc).__name__})") from None
    fixed = 0
    for oc in model.operatorCodes or []:
        builtin = max(int(oc.builtinCode), int(oc.deprecatedBuiltinCode))
        if builtin != oc.builtinCode:
            oc.builtinCode = builtin
            fixed += 1
        oc.deprecatedBuiltinCode = min(builtin, _PLACEHOLDER)
    fp16 = _dequantize_fp16(model)
    added = False
    if not model.signatureDefs and model.subgraphs:
        graph = model.subgraphs[0]

        def tmap(index: int) -> Any:
            tm = schema.TensorMapT()
            tm.name = graph.tensors[index].name
            tm.tensorIndex = int(index)
            return tm

        sig = schema.SignatureDefT()
        sig.signatureKey = "serving_default"
        sig.subgraphIndex = 0
        sig.inputs = [tmap(i) for i in graph.inputs]
        sig.outputs = [tmap(i) for i in graph.outputs]
        model.signatureDefs = [sig]
        added = True
    if not (fixed or fp16 or added):
        return NormalizedTflite(data)
    try:
        out = bytes(fu.convert_object_to_bytearray(model))
    except Exception as exc:  # noqa: BLE001 - as above
        raise SourceModelError(
            f"cannot rewrite the flatbuffer ({type(exc).__name__}: {exc})"
        ) from None
    return NormalizedTflite(out, fixed, added, fp16)


def _classify(counts: Mapping[str, int]) -> str:
    conv = sum(counts.get(o, 0) for o in _CONV)
    mm = sum(counts.get(o, 0) for o in _MATMUL)
    if any(counts.get(o, 0) for o in _RNN):
        return "rnn"
    if conv and conv >= mm:
        return "cnn"
    if mm:
        return "mlp"
    return "cnn" if conv else "other"


def _load(data: bytes, what: str) -> LoadedModel:
    return TfliteBackend(threads=1).load_bytes(data, what)


def load_tflite_source(data: bytes, where: str) -> SourceModel:
    """Inspect and trial-load a float ``.tflite`` source.

    The model is loaded with the agent's TFLite backend: a source the
    interpreter refuses is refused here, because no variant of it could be
    verified.

    Raises:
        SourceModelError: no TFLite runtime is installed, the flatbuffer is
            corrupt, the interpreter refuses it, or it has no inputs.
    """
    import hashlib

    try:
        model = _load(data, where)
    except UnsupportedRuntimeError as exc:
        raise SourceModelError(f"cannot compile {where}: {exc}") from None
    except ModelLoadError as exc:
        raise SourceModelError(str(exc)) from None
    try:
        facts = inspect_tflite(data)
    except SourceModelError as exc:
        raise SourceModelError(f"{where} is not a readable TFLite model: {exc}") from None
    if not model.inputs:
        raise SourceModelError(f"{where} has no inputs")
    return SourceModel(
        data=data,
        proto=onnx.ModelProto(),
        inputs=model.inputs,
        outputs=model.outputs,
        dim_params={s.name: tuple(None for _ in s.shape) for s in model.inputs},
        op_counts=facts.op_counts,
        kind=_classify(facts.op_counts),
        weight_bytes=facts.float_weight_bytes,
        sha256=hashlib.sha256(data).hexdigest(),
        format="tflite",
    )


class TfliteSession:
    """A TFLite model shaped like an onnxruntime session, for the evaluator.

    :func:`~edgefleet.controller.compiler.evaluate.run_samples` and
    :func:`~edgefleet.controller.compiler.evaluate.measure_latency` call
    ``session.run(output_names or None, feed)`` and expect a list of arrays;
    this adapter gives them that over the agent's :class:`TfliteBackend`
    model (input checks, dynamic batch resize and the int8 boundary included).
    """

    def __init__(self, model: LoadedModel) -> None:
        self._model = model
        self._names = [o.name for o in model.outputs]

    def run(self, output_names: Sequence[str] | None, feed: Feed) -> list[np.ndarray]:
        outputs = self._model.run(feed)
        return [outputs[n] for n in (output_names or self._names)]


def make_tflite_session(model: bytes, *, threads: int = 1) -> TfliteSession:
    """Load ``model`` bytes for evaluation (one interpreter thread, like the agent default).

    Raises:
        ModelLoadError / UnsupportedRuntimeError: the interpreter refuses it.
    """
    return TfliteSession(TfliteBackend(threads=threads).load_bytes(model, "candidate"))


def litert_versions() -> dict[str, str]:
    """Versions of the LiteRT packages in use, for the report's host section."""
    out: dict[str, str] = {}
    for dist in ("ai-edge-litert", "litert-quantizer"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def _quiet(notes: list[str]) -> contextlib.AbstractContextManager[None]:
    """Capture litert-quantizer's output into ``notes``.

    It logs through absl (the root logger), warns through ``warnings`` and
    draws tqdm progress bars on stderr; its warning about preserving all
    tensors during calibration is the calibrator's own debug mode, not about
    the model.
    """
    return capture_notes(
        notes, tool="litert", mute_stderr=True, ignore=("experimental_preserve_all_tensors",)
    )


_MODES = {
    # name suffix, description
    "dynamic": "dynamic range: {bits}-bit weights, activations quantized at run time",
    "weight_only": "weight-only: {bits}-bit weights dequantized to float before compute",
    "static": "static: int{bits} weights and activations, ranges from calibration",
}


class TfliteQuantRecipe(Recipe):
    """One litert-quantizer configuration applied to a float ``.tflite`` source.

    Args:
        mode: ``dynamic``, ``weight_only`` or ``static``.
        bits: weight bits, 8 or 4 (static: activations use the same bits, 8 only).
        ops: TFLite op names to quantize; ``None`` means every op the
            quantizer supports for this mode. A named op the quantizer cannot
            handle makes it raise, which triggers the core-op fallback.
    """

    def __init__(self, mode: str, bits: int = 8, *, ops: Sequence[str] | None = None) -> None:
        if mode not in _MODES:
            raise ValueError(f"unknown TFLite quantization mode {mode!r}")
        if bits not in (4, 8) or (mode == "static" and bits != 8):
            raise ValueError(f"{mode} quantization with {bits}-bit weights is not offered")
        self.mode = mode
        self.bits = bits
        self.ops = None if ops is None else tuple(ops)
        self.name = f"int{bits}-{mode.replace('_', '-')}"
        self.precision = f"int{bits}"
        self.description = _MODES[mode].format(bits=bits)
        self.needs_calibration = mode == "static"

    def options(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": self.mode,
            "weight_bits": self.bits,
            "granularity": "channelwise",
            "ops": "all supported" if self.ops is None else list(self.ops),
            "quantizer": "litert-quantizer",
        }
        if self.mode == "static":
            out["activation_bits"] = self.bits
            out["io"] = "int8 in the model, float32 at the agent boundary"
        return out

    def skip_reason(
        self, profile: Profile, source: SourceModel, *, has_calibration: bool = True
    ) -> str | None:
        reason = super().skip_reason(profile, source, has_calibration=has_calibration)
        if reason is not None:
            return reason
        if source.weight_bytes == 0:
            return "model has no float weights to quantize"
        return None

    def _configure(self, quantizer: Any, ops: Sequence[str] | None) -> None:
        from litert_quantizer import qtyping

        names = (
            [qtyping.TFLOperationName.ALL_SUPPORTED]
            if ops is None
            else [qtyping.TFLOperationName(o) for o in ops]
        )
        for op in names:
            if self.mode == "dynamic":
                quantizer.add_dynamic_config(".*", op, self.bits)
            elif self.mode == "weight_only":
                quantizer.add_weight_only_config(".*", op, self.bits)
            else:
                quantizer.add_static_config(".*", op, self.bits, self.bits)

    def _calibration(self, inp: BuildInput, facts: ModelFacts) -> dict[str, list[Feed]] | None:
        """Calibration feeds keyed by the (normalized) model's one signature.

        A signature-less source got ``serving_default`` over subgraph 0's
        inputs from :func:`normalize_tflite`, named like the tensors, which is
        also how the agent's backend names the inputs of such a model.
        """
        if self.mode != "static":
            return None
        if inp.calibration is None:
            raise RecipeError("needs calibration data")
        if len(facts.signatures) != 1:
            raise RecipeError(
                f"static calibration needs exactly one model signature, the model has "
                f"{len(facts.signatures)}"
            )
        return {facts.signatures[0]: list(inp.calibration.feeds())}

    def _quantize(
        self, data: bytes, ops: Sequence[str] | None, calibration: dict[str, list[Feed]] | None
    ) -> bytes:
        from litert_quantizer import quantizer as lq

        q = lq.Quantizer(data)
        self._configure(q, ops)
        qsv = None
        if calibration is not None and q.need_calibration:
            qsv = q.calibrate(calibration, num_threads=1)
        result = q.quantize(qsv, enable_progress_bar=False, enable_progress_report=False)
        if result.quantized_model is None:
            raise RecipeError("the quantizer returned no model")
        return bytes(result.quantized_model)

    def build(self, inp: BuildInput, *, nodes_to_exclude: Sequence[str] = ()) -> Built:
        try:
            import litert_quantizer  # noqa: F401
        except ImportError:
            raise RecipeError(
                "litert-quantizer is not installed; pip install 'edgefleet[tflite-compiler]'"
            ) from None
        normalized = normalize_tflite(inp.source.data)
        source = normalized.data
        facts = inspect_tflite(source)
        calibration = self._calibration(inp, facts)
        notes: list[str] = normalized.notes()
        options = self.options()
        try:
            with _quiet(notes):
                out = self._quantize(source, self.ops, calibration)
        except RecipeError:
            raise
        except Exception as first:  # noqa: BLE001 - the quantizer raises anything
            core = [o for o in CORE_OPS if o in facts.op_counts]
            if not core or (self.ops is not None and set(self.ops) <= set(core)):
                raise RecipeError(f"quantizer failed: {first_line(first)}") from None
            notes.append(
                f"quantizing {'all supported ops' if self.ops is None else ', '.join(self.ops)} "
                f"failed ({first_line(first)}); retried with only {', '.join(core)}, "
                "the rest stays float"
            )
            options["ops"] = core
            try:
                with _quiet(notes):
                    out = self._quantize(source, core, calibration)
            except Exception as second:  # noqa: BLE001 - as above
                raise RecipeError(
                    f"quantizer failed: {first_line(first)}; retry with {', '.join(core)} "
                    f"only also failed: {first_line(second)}"
                ) from None
        try:
            built = inspect_tflite(out)
        except SourceModelError as exc:
            raise RecipeError(f"the quantizer wrote an unreadable model: {exc}") from None
        if built.int_weights == 0:
            raise RecipeError("the quantizer left every weight in float: nothing to gain")
        asymmetric = asymmetric_conv_weights(out)
        if asymmetric:
            raise RecipeError(
                f"the quantizer wrote conv weights with a non-zero zero point "
                f"({', '.join(asymmetric[:3])}), which TFLite kernels refuse"
            )
        if built.float_weight_ops:
            notes.append(f"weights left in float: {', '.join(built.float_weight_ops)}")
        return Built(out, dedupe_notes(notes), options)


def asymmetric_conv_weights(data: bytes) -> list[str]:
    """Names of int8 conv/depthwise/FC weights whose zero point is not 0.

    TFLite's int8 kernels accept only symmetric weights
    (``affine_quantization->zero_point->data[i] != 0`` at load time).
    """
    from ai_edge_litert.tools import flatbuffer_utils as fu

    model = fu.read_model_from_bytearray(bytearray(data))
    ops = _enum_names(_schema().BuiltinOperator)
    bad = []
    for graph in model.subgraphs or []:
        for op in graph.operators or []:
            code = model.operatorCodes[op.opcodeIndex]
            name = ops.get(max(code.builtinCode, code.deprecatedBuiltinCode), "")
            if (
                name not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
                or len(op.inputs) < 2
            ):
                continue
            weight = graph.tensors[int(op.inputs[1])]
            q = weight.quantization
            zp = None if q is None else q.zeroPoint
            if zp is not None and len(zp) and np.any(np.asarray(zp) != 0):
                raw = weight.name
                bad.append(raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw))
    return bad


def _schema() -> Any:
    from ai_edge_litert import schema_py_generated as schema

    return schema


class TfliteSourceRecipe(SourceRecipe):
    """The ``.tflite`` source unchanged; says when its weights are stored in fp16."""

    def build(self, inp: BuildInput, *, nodes_to_exclude: Sequence[str] = ()) -> Built:
        facts = inspect_tflite(inp.source.data)
        notes: tuple[str, ...] = ()
        if facts.fp16_weights:
            notes = (
                f"source precision: fp16 weights ({facts.fp16_weights} DEQUANTIZE of fp16 "
                "constants), shipped as given",
            )
        return Built(inp.source.data, notes)


def tflite_recipes(profile: Profile) -> list[Recipe]:
    """Every TFLite recipe; ``skip_reason`` then narrows them to the profile's precisions.

    litert-quantizer has no reduced-range (7-bit) option like onnxruntime's,
    so the profile's CPU features do not change how a recipe quantizes; the
    interleaved latency measurement decides what pays off.
    """
    del profile  # same recipes for every TFLite device class, see above
    return [
        TfliteSourceRecipe(),
        TfliteQuantRecipe("dynamic", 8),
        TfliteQuantRecipe("static", 8),
        TfliteQuantRecipe("weight_only", 8),
        TfliteQuantRecipe("weight_only", 4),
    ]
