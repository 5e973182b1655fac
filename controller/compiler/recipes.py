"""Recipes: each turns the fp32 source into one candidate variant.

A recipe is a small object with a ``name``, a ``precision``, a check of
whether it makes sense for a profile and model (:meth:`Recipe.skip_reason`,
:meth:`Recipe.applies_to`) and a :meth:`Recipe.build` that returns the
candidate's bytes. Recipes do not judge their output: the pipeline measures
every candidate and refuses the ones that are wrong or slow.

Which int8 recipes apply follows onnxruntime's guidance, decided by the
model's op mix (:attr:`SourceModel.kind`):

* conv nets: **static** QDQ quantization. Dynamic quantization computes
  activation scales at run time, which costs more than it saves on
  convolutions (and onnxruntime has no int8-weight ``ConvInteger`` kernel).
* transformers and RNNs: **dynamic** quantization. Their activation ranges
  vary a lot from input to input, so calibrated static ranges clip.
* plain MLPs and anything else with MatMul/Gemm: both are tried and measured.

Targets without int8 dot-product instructions (no VNNI on x86, no ``asimddp``
on Arm) get 7-bit weights (``reduce_range``) and unsigned activations: their
u8s8 kernels sum pairs of products in 16 bits, which saturates with full
8-bit ranges.

Every onnxruntime call runs on temporary files and its Python warnings and
log warnings are captured into the candidate's notes rather than printed
(:func:`~edgefleet.controller.compiler.recipe_base.capture_notes`). The
:class:`Recipe` interface and the unchanged-source recipe, which the TFLite
recipes share, live in :mod:`~edgefleet.controller.compiler.recipe_base`.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from edgefleet.controller.compiler.data import Feed
from edgefleet.controller.compiler.errors import RecipeError
from edgefleet.controller.compiler.normalize import (
    ensure_opset,
    flatten_gemm_biases,
    float_weight_bytes,
    sort_topologically,
)
from edgefleet.controller.compiler.profiles import BUILTIN_PROFILES, Profile
from edgefleet.controller.compiler.recipe_base import (
    BuildInput,
    Built,
    Recipe,
    SourceRecipe,
    capture_notes,
    dedupe_notes,
)
from edgefleet.controller.compiler.source import (
    CONV_OPS,
    MATMUL_OPS,
    SourceModel,
    first_line,
)
from edgefleet.controller.compiler.tflite import tflite_recipes
from edgefleet.controller.compiler.weight_only import (
    FOLD_WEIGHTS_SESSION_CONFIG,
    INT4_BLOCK_SIZES,
    WEIGHT_ONLY_OPS,
    int4_tooling_missing,
    weight_only_int4,
    weight_only_int8,
)

__all__ = [
    "DYNAMIC_OP_TYPES",
    "DynamicInt8Recipe",
    "Float16Recipe",
    "Int4WeightOnlyRecipe",
    "OptimizedFp32Recipe",
    "StaticInt8Recipe",
    "WeightOnlyInt8Recipe",
    "default_recipes",
    "prepare_for_quantization",
    "recipe_names",
]

# Ops dynamic quantization handles with a real integer kernel on CPU. Conv is
# left out on purpose: it would become ConvInteger with int8 weights, which
# onnxruntime's CPU provider cannot run.
DYNAMIC_OP_TYPES = ("MatMul", "Attention", "LSTM", "Gather", "EmbedLayerNormalization")
# What a quantizer retry falls back to when it chokes on the full op set.
_CORE_OP_TYPES = ("Conv", "MatMul", "Gemm")
# How many nodes onnxruntime's quantizer may fail on, one after another, each
# then kept in float, before the recipe gives up on quantizing node by node.
_MAX_FAILED_NODES = 4
# DequantizeLinear gained the ``axis`` attribute (per-channel scales) in opset 13.
_PER_CHANNEL_OPSET = 13
# The int4 tensor type (GatherBlockQuantized's tables) exists from opset 21.
_INT4_GATHER_OPSET = 21
# Ops that are only data movement or shape plumbing: being left in float
# costs nothing worth telling the user about.
_PLUMBING = frozenset(
    {
        "Shape", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity",
        "Constant", "ConstantOfShape", "Cast", "Concat", "Slice", "Gather", "Split",
        "Expand", "Range", "Tile", "Dropout",
        # Control flow: no arithmetic of its own (dynamic int8 reaches its bodies).
        "If", "Loop", "Scan",
    }
)  # fmt: skip
_QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
        "ConvInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeMatMul",
        "DynamicQuantizeLSTM", "QAttention", "QEmbedLayerNormalization", "QGemm",
    }
)  # fmt: skip


def _ort_optimize(model: bytes, level: str, path: Path) -> bytes:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[level]
    so.optimized_model_filepath = str(path)
    so.log_severity_level = 3
    # Constant sharing renames initializers, which would make node-level
    # comparisons against the source harder and buys nothing offline.
    ort.InferenceSession(
        model, so, providers=["CPUExecutionProvider"], disabled_optimizers=["ConstantSharing"]
    )
    return path.read_bytes()


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise RecipeError(f"shape inference failed: {first_line(exc)}") from None


def prepare_for_quantization(source: SourceModel) -> bytes:
    """Shape inference, basic graph optimisation, shape inference again.

    This is what onnxruntime's ``quant_pre_process`` does, minus its symbolic
    shape inference (which needs sympy and only matters for models whose
    shapes onnx cannot infer). Basic optimisations (constant folding,
    Conv+BatchNorm fusion, redundant node removal) are hardware independent.
    The model is tagged as pre-processed so the quantizers do not advise it.

    Raises:
        RecipeError: shape inference or optimisation failed.
    """
    from onnxruntime.quantization.quant_utils import add_pre_process_metadata

    inferred = _infer_shapes(source.proto)
    with tempfile.TemporaryDirectory(prefix="edgefleet-prep-") as tmp:
        try:
            optimized = _ort_optimize(inferred.SerializeToString(), "basic", Path(tmp) / "opt.onnx")
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises RuntimeError subclasses
            raise RecipeError(f"graph optimisation failed: {first_line(exc)}") from None
    model = _infer_shapes(onnx.load_model_from_string(optimized))
    # After MatMul+Add fusion: tf2onnx models carry [1, N] Gemm biases, which
    # onnxruntime's per-channel quantizer crashes on; [N] is the same bias.
    flatten_gemm_biases(model)
    add_pre_process_metadata(model)
    data: bytes = model.SerializeToString()
    return data


def _op_types(model: bytes | onnx.ModelProto) -> set[str]:
    proto = onnx.load_model_from_string(model) if isinstance(model, bytes) else model
    return {n.op_type for n in proto.graph.node}


class OptimizedFp32Recipe(Recipe):
    """fp32 with shape inference and offline graph optimisation baked in.

    The ``extended`` level (fusions such as Gemm+activation, attention
    patterns) is hardware independent for the CPU provider; ``all`` would add
    layout transforms for *this* CPU's vector width and is never saved. Falls
    back to ``basic`` when extended optimisation fails.
    """

    name = "fp32-opt"
    precision = "fp32"
    description = "fp32, shape inference + offline graph optimisation"

    def options(self) -> dict[str, Any]:
        return {"optimization": "extended"}

    def build(self, inp: BuildInput, *, nodes_to_exclude: Sequence[str] = ()) -> Built:
        notes: list[str] = []
        inferred = _infer_shapes(inp.source.proto).SerializeToString()
        with tempfile.TemporaryDirectory(prefix="edgefleet-opt-") as tmp:
            try:
                out = _ort_optimize(inferred, "extended", Path(tmp) / "ext.onnx")
                level = "extended"
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises RuntimeError subclasses
                notes.append(f"extended optimisation failed ({first_line(exc)}); used basic")
                out = _ort_optimize(inferred, "basic", Path(tmp) / "basic.onnx")
                level = "basic"
        return Built(out, tuple(notes), {"optimization": level})


class Float16Recipe(Recipe):
    """fp16 weights and compute, float32 inputs and outputs (``keep_io_types``).

    Keeping fp32 I/O means the device's serving code and the bundle's sample
    data do not change with precision. On CPUs without fp16 arithmetic
    onnxruntime runs many fp16 ops through casts, so this variant usually
    wins on size only; the latency measurement decides.
    """

    name = "fp16"
    precision = "fp16"
    description = "fp16 weights and activations, fp32 I/O"

    def options(self) -> dict[str, Any]:
        return {"keep_io_types": True}

    def skip_reason(
        self, profile: Profile, source: SourceModel, *, has_calibration: bool = True
    ) -> str | None:
        reason = super().skip_reason(profile, source, has_calibration=has_calibration)
        if reason is None and source.weight_bytes == 0:
            return "model has no float weights to convert"
        return reason

    def build(self, inp: BuildInput, *, nodes_to_exclude: Sequence[str] = ()) -> Built:
        notes: list[str] = []
        with capture_notes(notes, tool="onnxruntime"):
            from onnxruntime.transformers.float16 import convert_float_to_float16

            model = onnx.load_model_from_string(inp.need_prepared())
            converted = convert_float_to_float16(model, keep_io_types=True)
        # The converter appends the fp32<->fp16 Casts of the inputs and
        # outputs after the nodes that read them; order them for the checker.
        sort_topologically(converted.graph)
        return Built(converted.SerializeToString(), dedupe_notes(notes), self.options())


def _int8_types(profile: Profile) -> tuple[Any, Any, bool]:
    """(activation type, weight type, reduce_range) for a profile."""
    from onnxruntime.quantization import QuantType

    if profile.int8_dot:
        return QuantType.QInt8, QuantType.QInt8, False
    return QuantType.QUInt8, QuantType.QInt8, True


def _float_leftovers(prepared: bytes, quantizable: set[str]) -> list[str]:
    return sorted(_op_types(prepared) - quantizable - _PLUMBING)


def _check_quantized(model_path: Path, prepared: bytes) -> bytes:
    data = model_path.read_bytes()
    if not (_op_types(data) & _QUANTIZED_OPS):
        graph = onnx.load_model_from_string(prepared).graph
        inner = float_weight_bytes(graph) - float_weight_bytes(graph, subgraphs=False)
        if inner > float_weight_bytes(graph, subgraphs=False):
            # Say why: onnxruntime's quantizers rewrite the top-level graph only.
            raise RecipeError(
                "the quantizer left every operator in float: most float weights "
                f"({inner} bytes) are inside If/Loop/Scan subgraphs, which onnxruntime's "
                "quantizers do not reach"
            )
        raise RecipeError("the quantizer left every operator in float: nothing to gain")
    return data


def _with_failed(options: Mapping[str, Any], failed_nodes: Sequence[str]) -> dict[str, Any]:
    """The recipe's options, plus the nodes kept float because the quantizer failed on them."""
    out = dict(options)
    if failed_nodes:
        out["quantizer_failed_nodes"] = list(failed_nodes)
    return out


def _node_names(model: bytes) -> dict[str, str]:
    """Node name to op type, for the top-level graph (what the quantizers walk)."""
    proto = onnx.load_model_from_string(model)
    return {n.name: n.op_type for n in proto.graph.node if n.name}


def _failing_node(exc: BaseException, names: Mapping[str, str]) -> str | None:
    """The node onnxruntime's quantizer was handling when it raised ``exc``, if it can be told.

    The quantizer's exceptions do not name the node, but its frames hold it:
    a local ``NodeProto``, or a record with a ``node_name`` (the bias
    bookkeeping where per-channel QDQ crashes on 2-D Gemm biases). The
    innermost frame that holds a node of this model wins.
    """
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            if isinstance(value, onnx.NodeProto) and value.name in names:
                return value.name
            node_name = getattr(value, "node_name", None)
            if isinstance(node_name, str) and node_name in names:
                return node_name
    return None


class _Int8Recipe(Recipe):
    precision = "int8"

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.activation_type, self.weight_type, self.reduce_range = _int8_types(profile)

    def _quantizable(self) -> set[str]:  # pragma: no cover - overridden
        raise NotImplementedError

    def quantizable_ops(self) -> frozenset[str]:
        return frozenset(self._quantizable())

    def _weights_to_quantize(self, source: SourceModel) -> bool:
        present = set(source.op_counts) & self._quantizable()
        return bool(present & (CONV_OPS | MATMUL_OPS | {"Gather", "LSTM", "Attention"}))

    def _run_with_fallback(
        self, prepared: bytes, run: Any, notes: list[str], present: set[str]
    ) -> tuple[bytes, list[str]]:
        """Quantize with every supported op type, working around the quantizer's failures.

        When onnxruntime's quantizer raises while handling one node, that node
        is kept in float and the quantization runs again (at most
        :data:`_MAX_FAILED_NODES` times); each such node gets a note. A failure
        that names no node is retried with only Conv/MatMul/Gemm quantized,
        which copes with most unusual ops; the rest then stays float and the
        note says so.

        ``run(src, out, only, exclude)`` quantizes ``src`` into ``out``,
        ``only`` op types (``None``: all) and keeping ``exclude`` nodes float.

        Returns:
            The quantized model and the nodes kept in float because the
            quantizer failed on them.
        """
        names = _node_names(prepared)
        failed_nodes: list[str] = []
        with tempfile.TemporaryDirectory(prefix="edgefleet-q-") as tmp:
            src = Path(tmp) / "in.onnx"
            src.write_bytes(prepared)
            out = Path(tmp) / "out.onnx"
            first: Exception | None = None
            while True:
                try:
                    with capture_notes(notes, tool="onnxruntime"):
                        run(src, out, None, list(failed_nodes))
                    return _check_quantized(out, prepared), failed_nodes
                except RecipeError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the quantizer raises anything
                    first = first or exc
                    node = _failing_node(exc, names)
                    if (
                        node is None
                        or node in failed_nodes
                        or len(failed_nodes) >= _MAX_FAILED_NODES
                    ):
                        break
                    failed_nodes.append(node)
                    # First in the notes, where the report cannot cut them off.
                    notes.insert(
                        len(failed_nodes) - 1,
                        f"onnxruntime's quantizer failed on node {node!r} "
                        f"({names[node]}): {first_line(exc)}; that node stays float",
                    )
            assert first is not None
            core = sorted(present & set(_CORE_OP_TYPES))
            if not core or set(core) == present:
                raise RecipeError(f"quantizer failed: {first_line(first)}") from None
            notes.append(
                f"quantizing all op types failed ({first_line(first)}); "
                f"retried with only {', '.join(core)}, the rest stays float"
            )
            try:
                with capture_notes(notes, tool="onnxruntime"):
                    run(src, out, core, list(failed_nodes))
                return _check_quantized(out, prepared), failed_nodes
            except RecipeError:
                raise
            except Exception as second:  # noqa: BLE001 - as above
                raise RecipeError(
                    f"quantizer failed: {first_line(first)}; retry with "
                    f"{', '.join(core)} only also failed: {first_line(second)}"
                ) from None


class DynamicInt8Recipe(_Int8Recipe):
    """int8 weights, activations quantized at run time (``quantize_dynamic``).

    Only MatMul with a constant weight is quantized (``MatMulConstBOnly``):
    quantizing both operands of an attention MatMul adds work and error.
    """

    name = "int8-dynamic"
    description = "dynamic int8 (weights int8, activation scales at run time)"

    def __init__(self, profile: Profile, *, per_channel: bool = False) -> None:
        super().__init__(profile)
        self.per_channel = per_channel
        if per_channel:
            self.name = "int8-dynamic-pc"

    def _quantizable(self) -> set[str]:
        return set(DYNAMIC_OP_TYPES)

    def options(self) -> dict[str, Any]:
        return {
            "mode": "dynamic",
            "per_channel": self.per_channel,
            "reduce_range": self.reduce_range,
            "weight_type": "int8",
        }

    def skip_reason(
        self, profile: Profile, source: SourceModel, *, has_calibration: bool = True
    ) -> str | None:
        reason = super().skip_reason(profile, source, has_calibration=has_calibration)
        if reason is not None:
            return reason
        if source.kind == "cnn":
            return (
                "convolutional model: onnxruntime recommends static quantization for CNNs "
                "(no int8-weight ConvInteger kernel on CPU; run-time scales cost more than "
                "they save)"
            )
        if not self._weights_to_quantize(source):
            return "no MatMul/Gather/LSTM/Attention weights for dynamic quantization"
        return None

    def build(self, inp: BuildInput, *, nodes_to_exclude: Sequence[str] = ()) -> Built:
        from onnxruntime.quantization import quantize_dynamic

        prepared = inp.need_prepared()
        present = _op_types(prepared) & self._quantizable()
        notes: list[str] = []
        if self.per_channel:
            prepared, converted = ensure_opset(
                prepared, _PER_CHANNEL_OPSET, "per-channel int8 needs DequantizeLinear's axis"
            )
            if converted:
                notes.append(converted)

        def run(src: Path, out: Path, only: list[str] | None, failed: list[str]) -> None:
            quantize_dynamic(
                src,
                out,
                op_types_to_quantize=only or sorted(present),
                per_channel=self.per_channel,
                reduce_range=self.reduce_range,
                weight_type=self.weight_type,
                nodes_to_exclude=[*nodes_to_exclude, *failed],
                # EnableSubgraph: also the weights inside If/Loop/Scan bodies
                # (silero-vad keeps all of them in If branches).
                extra_options={"MatMulConstBOnly": True, "EnableSubgraph": True},
            )

        if nodes_to_exclude:
            notes.append(f"kept in float (sensitive): {', '.join(nodes_to_exclude)}")
        data, failed_nodes = self._run_with_fallback(prepared, run, notes, present)
        leftovers = _float_leftovers(prepared, self._quantizable() | {"Gemm"})
        gemm = "Gemm" in _op_types(prepared)
        if gemm:
            notes.append("Gemm has no dynamic int8 kernel and stays float")
        if leftovers:
            shown = [o for o in leftovers if o != "Gemm"]
            if shown:
                notes.append(f"no int8 kernel, stays float: {', '.join(shown)}")
        options = {**self.options(), "nodes_to_exclude": list(nodes_to_exclude)}
        return Built(data, dedupe_notes(notes), _with_failed(options, failed_nodes))


# Samples whose activations are collected and reduced together when
# calibrating: bounds the calibrator's memory whatever the sample count.
_CALIBRATION_STRIDE = 8
# Samples the histogram calibrators (percentile, entropy) use at most.
_HISTOGRAM_SAMPLES = 32
# The strides actually used: every intermediate tensor of a stride's samples
# is held at once (and the histogram calibrators copy them again into
# absolute values and bins), so the stride is what bounds calibration
# memory. Measured on PP-OCRv4 rec (10.9 MB, 16 calibration samples):
# percentile at stride 8 peaked at 2.3 GB, minmax at 0.92 GB.
_MINMAX_STRIDE = 4
_HISTOGRAM_STRIDE = 2


def calibration_stride(count: int, most: int = _CALIBRATION_STRIDE) -> int:
    """The largest stride <= ``most`` dividing ``count`` (onnxruntime requires a divisor)."""
    return next(k for k in range(min(most, max(count, 1)), 0, -1) if count % k == 0)


def calibration_cache_path(work_dir: Path | None, method: str, model: bytes) -> Path | None:
    """Where the ranges of ``method`` on this exact model are cached for this compile.

    onnxruntime's ``quantize_static`` writes the calibrated ranges there on
    the first call and reads them on the next ones, so the per-channel,
    per-tensor, fallback and sensitivity-retry candidates of one method
    calibrate once. The ranges cover every tensor (the first call
    quantizes all op types), a superset of what any later call needs.
    """
    if work_dir is None:
        return None
    digest = hashlib.sha256(model).hexdigest()[:16]
    return work_dir / f"calibration-{method}-{digest}.json"


class StaticInt8Recipe(_Int8Recipe):
    """int8 weights and activations with calibrated ranges, QDQ format (``quantize_static``).

    QDQ keeps the graph readable by any onnxruntime and lets the runtime fuse
    Q/DQ pairs into integer kernels (QLinearConv, QLinearMatMul) on the device.
    """

    needs_calibration = True
    static_int8 = True

    def __init__(self, profile: Profile, *, per_channel: bool, method: str) -> None:
        super().__init__(profile)
        if method not in ("minmax", "entropy", "percentile"):
            raise ValueError(f"unknown calibration method {method!r}")
        self.per_channel = per_channel
        self.method = method
        self.name = f"int8-static-{'pc' if per_channel else 'pt'}-{method}"
        self.description = (
            f"static int8 QDQ, {'per-channel' if per_channel else 'per-tensor'} weights, "
            f"{method} calibration"
        )

    def _quantizable(self) -> set[str]:
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

        return set(QDQRegistry) | set(QLinearOpsRegistry)

    def options(self) -> dict[str, Any]:
        return {
            "mode": "static-qdq",
            "per_channel": self.per_channel,
            "calibration": self.method,
            "reduce_range": self.reduce_range,
            "activation_type": "int8" if self.profile.int8_dot else "uint8",
            "weight_type": "int8",
        }

    def skip_reason(
        self, profile: Profile, source: SourceModel, *, has_calibration: bool = True
    ) -> str | None:
        reason = super().skip_reason(profile, source, has_calibration=has_calibration)
        if reason is not None:
            return reason
        if source.kind in ("transformer", "rnn"):
            return (
                f"{source.kind} model: onnxruntime recommends dynamic quantization "
                "(activation ranges vary too much per input for calibrated static ranges)"
            )
        if not self._weights_to_quantize(source):
            return "no Conv/MatMul/Gemm/Gather weights to quantize"
        return None

    def build(self, inp: BuildInput, *, nodes_to_exclude: Sequence[str] = ()) -> Built:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            quantize_static,
        )

        if inp.calibration is None:
            raise RecipeError("needs calibration data")
        prepared = inp.need_prepared()
        notes: list[str] = []
        if self.per_channel:
            prepared, converted = ensure_opset(
                prepared, _PER_CHANNEL_OPSET, "per-channel int8 needs DequantizeLinear's axis"
            )
            if converted:
                notes.append(converted)
        present = _op_types(prepared) & self._quantizable()
        samples = inp.calibration
        # Histogram calibrators (percentile, entropy) cost far more per sample
        # than minmax and settle on a few dozen samples.
        count = samples.count
        if self.method != "minmax" and count > _HISTOGRAM_SAMPLES:
            count = _HISTOGRAM_SAMPLES
            notes.append(
                f"{self.method} calibration on the first {count} of {samples.count} samples"
            )

        class Reader(CalibrationDataReader):  # type: ignore[misc]
            """Feeds calibration samples one inference at a time, a range at a time.

            ``__len__`` and ``set_range`` let onnxruntime calibrate in strides
            (``CalibStridedMinMax``): it collects and reduces the activations
            of ``stride`` samples before the next ones, so memory is bounded
            by the stride, not by the number of samples.
            """

            def __init__(self) -> None:
                self._start, self._end = 0, count
                self._it: Iterator[Feed] = self._range()

            def _range(self) -> Iterator[Feed]:
                for i in range(self._start, self._end):
                    yield samples.feed(i)

            def __len__(self) -> int:
                return count

            def set_range(self, start_index: int, end_index: int) -> None:
                self._start, self._end = start_index, min(end_index, count)
                self._it = self._range()

            def get_next(self) -> Feed | None:
                return next(self._it, None)

            def rewind(self) -> None:
                self._it = self._range()

        method = {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[self.method]
        extra: dict[str, Any] = {
            "ActivationSymmetric": False,
            "WeightSymmetric": True,
            "CalibStridedMinMax": calibration_stride(
                count, _MINMAX_STRIDE if self.method == "minmax" else _HISTOGRAM_STRIDE
            ),
        }
        if self.method == "percentile":
            extra["CalibPercentile"] = 99.99
        cache = calibration_cache_path(inp.work_dir, self.method, prepared)
        if cache is not None and cache.is_file():
            notes.append(f"reused the {self.method} calibration of an earlier candidate")

        def run(src: Path, out: Path, only: list[str] | None, failed: list[str]) -> None:
            quantize_static(
                src,
                out,
                Reader(),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=only,
                per_channel=self.per_channel,
                reduce_range=self.reduce_range,
                activation_type=self.activation_type,
                weight_type=self.weight_type,
                nodes_to_exclude=[*nodes_to_exclude, *failed],
                calibrate_method=method,
                extra_options=extra,
                calibration_cache_path=cache,
            )

        data, failed_nodes = self._run_with_fallback(prepared, run, notes, present)
        leftovers = _float_leftovers(prepared, self._quantizable())
        if leftovers:
            notes.append(f"no int8 kernel, stays float: {', '.join(leftovers)}")
        if nodes_to_exclude:
            notes.append(f"kept in float (sensitive): {', '.join(nodes_to_exclude)}")
        options = {**self.options(), "nodes_to_exclude": list(nodes_to_exclude)}
        return Built(data, dedupe_notes(notes), _with_failed(options, failed_nodes))


class WeightOnlyInt8Recipe(Recipe):
    """Per-channel int8 weights + ``DequantizeLinear``, float compute (weight-only storage).

    About 4x smaller for weight-dominated models at fp32 latency and nearly
    fp32 accuracy, on any CPU: nothing is computed in int8, so it needs no
    calibration, VNNI or dot-product instructions, and works for Conv nets
    where static int8 is slow or clips. The model asks to be opened with its
    weights folded (``session.disable_quant_qdq``); see
    :mod:`~edgefleet.controller.compiler.weight_only`.
    """

    name = "int8-weight-only"
    precision = "int8"
    description = "int8 per-channel weights (DequantizeLinear), float compute"

    def options(self) -> dict[str, Any]:
        return {
            "mode": "weight-only",
            "per_channel": True,
            "weight_type": "int8",
            "symmetric": True,
            "session_config": dict(FOLD_WEIGHTS_SESSION_CONFIG),
        }

    def quantizable_ops(self) -> frozenset[str]:
        return WEIGHT_ONLY_OPS

    def skip_reason(
        self, profile: Profile, source: SourceModel, *, has_calibration: bool = True
    ) -> str | None:
        reason = super().skip_reason(profile, source, has_calibration=has_calibration)
        if reason is not None:
            return reason
        if not set(source.op_counts) & WEIGHT_ONLY_OPS or source.weight_bytes == 0:
            return "no Conv/ConvTranspose/MatMul/Gemm/Gather weights to store in int8"
        return None

    def build(self, inp: BuildInput, *, nodes_to_exclude: Sequence[str] = ()) -> Built:
        prepared, converted = ensure_opset(
            inp.need_prepared(),
            _PER_CHANNEL_OPSET,
            "per-channel int8 needs DequantizeLinear's axis",
        )
        notes = [converted] if converted else []
        model, stats = weight_only_int8(
            onnx.load_model_from_string(prepared), exclude=nodes_to_exclude
        )
        notes.append(stats.note())
        notes.append(
            "opened with session.disable_quant_qdq=1 (recorded in the model's metadata) so "
            "onnxruntime folds the int8 weights to float at load"
        )
        options = {**self.options(), "nodes_to_exclude": list(nodes_to_exclude)}
        return Built(model.SerializeToString(), tuple(notes), options)


class Int4WeightOnlyRecipe(Recipe):
    """Blockwise int4 MatMul (and Gather) weights through onnxruntime's ``MatMulNBits``.

    For transformer, embedding and MLP models, where MatMul and embedding
    weights are most of the bytes. Other Conv/Gemm weights are stored as
    weight-only int8. One recipe per block size: smaller blocks are more
    accurate, larger ones smaller; the measurements and the profile's
    objective decide. Without VNNI the ``MatMulNBits`` kernel is usually a
    little slower than fp32, so this mostly wins under the ``size`` objective.
    """

    precision = "int4"

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.name = f"int4-weight-only-b{block_size}"
        self.description = (
            f"int4 blockwise (block {block_size}) MatMul/Gather weights, int8 weight-only rest"
        )

    def options(self) -> dict[str, Any]:
        return {
            "mode": "weight-only",
            "weight_type": "int4",
            "block_size": self.block_size,
            "symmetric": True,
        }

    def quantizable_ops(self) -> frozenset[str]:
        return WEIGHT_ONLY_OPS

    def skip_reason(
        self, profile: Profile, source: SourceModel, *, has_calibration: bool = True
    ) -> str | None:
        reason = super().skip_reason(profile, source, has_calibration=has_calibration)
        if reason is not None:
            return reason
        if not {"MatMul", "Gather"} & set(source.op_counts):
            return "no MatMul or Gather weights for int4 (MatMulNBits quantizes only those)"
        return int4_tooling_missing()

    def build(self, inp: BuildInput, *, nodes_to_exclude: Sequence[str] = ()) -> Built:
        # From the source graph, not the pre-processed one: basic optimisation
        # fuses MatMul+Add into Gemm, which MatMulNBits does not cover.
        prepared = inp.source.proto.SerializeToString()
        notes: list[str] = []
        proto = inp.source.proto
        gather = any(
            n.op_type == "Gather" and n.input[0] in {i.name for i in proto.graph.initializer}
            for n in proto.graph.node
        )
        # Int4 Gather tables need opset 21; the quantizer would otherwise bump
        # the opset number without converting the graph.
        needed = _INT4_GATHER_OPSET if gather else _PER_CHANNEL_OPSET
        try:
            prepared, converted = ensure_opset(prepared, needed, "int4 weights")
        except RecipeError as exc:
            if not gather:
                raise
            notes.append(f"Gather tables stay float ({exc})")
            gather = False
            prepared, converted = ensure_opset(prepared, _PER_CHANNEL_OPSET, "int4 weights")
        if converted:
            notes.append(converted)
        with capture_notes(notes, tool="onnxruntime", mute_stderr=True):
            model = weight_only_int4(
                onnx.load_model_from_string(prepared),
                block_size=self.block_size,
                gather=gather,
                exclude=nodes_to_exclude,
            )
        counts = {
            op: sum(n.op_type == op for n in model.graph.node)
            for op in ("MatMulNBits", "GatherBlockQuantized")
        }
        notes.insert(
            0,
            f"int4 block {self.block_size}: {counts['MatMulNBits']} MatMul, "
            f"{counts['GatherBlockQuantized']} Gather",
        )
        try:
            model, stats = weight_only_int8(model, exclude=nodes_to_exclude)
            notes.insert(1, stats.note("int8 weight-only (not int4-capable ops)"))
        except RecipeError:
            pass
        options = {**self.options(), "gather": gather, "nodes_to_exclude": list(nodes_to_exclude)}
        return Built(model.SerializeToString(), dedupe_notes(notes), options)


def default_recipes(profile: Profile) -> list[Recipe]:
    """Every recipe the compiler knows, configured for ``profile``.

    ``skip_reason`` then narrows them to what the profile allows and the
    model's op mix calls for; this is the ``auto`` set. A ``tflite`` profile
    gets the TFLite recipes (:func:`~edgefleet.controller.compiler.tflite.tflite_recipes`).
    """
    if profile.runtime == "tflite":
        return tflite_recipes(profile)
    return [
        SourceRecipe(),
        OptimizedFp32Recipe(),
        Float16Recipe(),
        DynamicInt8Recipe(profile),
        # Per-channel weight scales: all-MiniLM-L6-v2 misses a 0.99 cosine
        # gate with per-tensor dynamic int8 (0.957) and passes with these
        # (0.992) at the same speed.
        DynamicInt8Recipe(profile, per_channel=True),
        StaticInt8Recipe(profile, per_channel=True, method="minmax"),
        StaticInt8Recipe(profile, per_channel=False, method="minmax"),
        StaticInt8Recipe(profile, per_channel=True, method="percentile"),
        StaticInt8Recipe(profile, per_channel=True, method="entropy"),
        WeightOnlyInt8Recipe(),
        *(Int4WeightOnlyRecipe(b) for b in INT4_BLOCK_SIZES),
    ]


def recipe_names(profile: Profile | None = None) -> list[str]:
    """Names of the built-in recipes (for the CLI's ``--recipe`` choices)."""
    return [r.name for r in default_recipes(profile or BUILTIN_PROFILES["x86-vnni"])]
