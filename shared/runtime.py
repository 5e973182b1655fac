"""The runtime backend interface and the onnxruntime and TFLite backends.

The rest of the agent never talks to an inference library directly: it asks
:func:`get_backend` for a :class:`Backend` by the runtime name a bundle
declares (``"onnxruntime"``, ``"tflite"``), loads the bundle's model file into
a :class:`LoadedModel` and calls :meth:`LoadedModel.run`. Keeping that surface
this small is what let the second runtime (TFLite/LiteRT, :class:`TfliteBackend`)
arrive without touching the install pipeline or the HTTP endpoint.

Inputs are checked *before* they reach the runtime. A native runtime that is
handed a wrong dtype or rank fails with an opaque message at best; here the
caller gets an :class:`InferenceInputError` naming the tensor and what was
wrong, which the HTTP endpoint turns into a 400 rather than a 500. Failures of
the runtime itself on valid-looking input raise :class:`InferenceError`.

Inference libraries are imported lazily: importing this module (for example
to report :func:`available_runtimes` in the hardware description) must not
pay for loading onnxruntime or LiteRT.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np

from edgefleet.protocols.bundle import TensorSpec
from edgefleet.protocols.errors import (
    ConfigError,
    InferenceError,
    InferenceInputError,
    ModelLoadError,
    UnsupportedRuntimeError,
)

__all__ = [
    "ONNX_SESSION_CONFIG_ALLOWED",
    "ONNX_SESSION_CONFIG_KEY",
    "Backend",
    "InferenceError",
    "InferenceInputError",
    "LoadedModel",
    "OnnxRuntimeBackend",
    "TfliteBackend",
    "available_runtimes",
    "check_feeds",
    "coerce_inputs",
    "get_backend",
    "is_tflite",
    "onnx_metadata",
    "onnx_session_config",
    "tflite_interpreter_class",
]

log = logging.getLogger(__name__)


class LoadedModel(Protocol):
    """A model loaded by a backend and ready to run.

    Implementations must allow concurrent :meth:`run` calls from several
    threads (the HTTP endpoint serves requests in parallel).
    """

    # Read-only properties rather than attributes, so that an implementation
    # may store them any way it likes (a plain attribute satisfies them too).
    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        """The model's inputs, in the order the model declares them."""
        ...

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        """The model's outputs, in the order the model declares them."""
        ...

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference.

        Raises:
            InferenceInputError: ``feeds`` does not match :attr:`inputs`.
            InferenceError: the runtime failed.
        """
        ...


class Backend(Protocol):
    """Loads model files of one runtime."""

    @property
    def name(self) -> str:
        """The runtime name bundles use: ``"onnxruntime"``, ``"tflite"``."""
        ...

    def load(self, model_path: Path) -> LoadedModel:
        """Load a model file.

        Raises:
            ModelLoadError: the file is missing or the runtime refuses it.
        """
        ...


# --------------------------------------------------------------------------- validation
def _dtype(spec: TensorSpec) -> np.dtype[Any]:
    try:
        return np.dtype(spec.dtype)
    except TypeError:
        raise InferenceInputError(
            f"model input {spec.name!r} declares unsupported dtype {spec.dtype!r}"
        ) from None


def _check_shape(name: str, shape: tuple[int, ...], spec: TensorSpec) -> None:
    if len(shape) != len(spec.shape):
        raise InferenceInputError(
            f"input {name!r} must have rank {len(spec.shape)} (shape {_fmt_shape(spec.shape)}), "
            f"got rank {len(shape)} (shape {list(shape)})"
        )
    for axis, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
        if want is not None and got != want:
            raise InferenceInputError(
                f"input {name!r} must have size {want} on axis {axis} "
                f"(shape {_fmt_shape(spec.shape)}), got shape {list(shape)}"
            )


def _fmt_shape(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"


def _check_names(given: Sequence[str], specs: Sequence[TensorSpec]) -> None:
    wanted = [s.name for s in specs]
    unknown = sorted(set(given) - set(wanted))
    if unknown:
        raise InferenceInputError(
            f"unknown input(s) {', '.join(map(repr, unknown))}; the model takes "
            f"{', '.join(map(repr, wanted))}"
        )
    missing = [n for n in wanted if n not in given]
    if missing:
        raise InferenceInputError(f"missing input(s) {', '.join(map(repr, missing))}")


def check_feeds(feeds: Mapping[str, Any], specs: Sequence[TensorSpec]) -> None:
    """Check that ``feeds`` are exactly the arrays ``specs`` describe.

    Dtypes must match exactly: silently casting here would hide a client bug
    (say float64 into an int8 model). Use :func:`coerce_inputs` to convert
    JSON-like values first.

    Raises:
        InferenceInputError: a name is unknown or missing, or an array has the
            wrong type, dtype, rank or fixed dimension.
    """
    _check_names(list(feeds), specs)
    for spec in specs:
        value = feeds[spec.name]
        if not isinstance(value, np.ndarray):
            raise InferenceInputError(
                f"input {spec.name!r} must be a numpy array, got {type(value).__name__}"
            )
        want = _dtype(spec)
        if value.dtype != want:
            raise InferenceInputError(
                f"input {spec.name!r} must have dtype {want.name}, got {value.dtype.name}"
            )
        _check_shape(spec.name, value.shape, spec)


def coerce_inputs(raw: Mapping[str, Any], specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Turn JSON-decoded values (nested lists, numbers, bools) into model inputs.

    The conversion is strict on purpose: strings are never parsed as numbers,
    bools are only accepted for bool inputs, integer inputs only accept JSON
    integers that fit the dtype, and NaN/Infinity (which Python's ``json``
    accepts) are refused, because a gateway model fed such values produces
    garbage that looks like an answer.

    Raises:
        InferenceInputError: unknown or missing names, ragged lists, values of
            the wrong kind, out-of-range integers, non-finite numbers, or a
            rank or fixed dimension that does not match the spec.
    """
    if not isinstance(raw, Mapping):
        raise InferenceInputError("inputs must be an object mapping input names to values")
    _check_names(list(raw), specs)
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        out[spec.name] = _coerce_one(spec, raw[spec.name])
    return out


def _coerce_one(spec: TensorSpec, value: Any) -> np.ndarray:
    want = _dtype(spec)
    name = spec.name
    if isinstance(value, np.ndarray):
        arr = value
    else:
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError) as exc:
            raise InferenceInputError(
                f"input {name!r} is not a rectangular nested list of numbers: {exc}"
            ) from None
    if arr.size == 0:
        _check_shape(name, arr.shape, spec)
        return np.zeros(arr.shape, dtype=want)
    _check_kind(name, arr, want)
    _check_shape(name, arr.shape, spec)
    with np.errstate(over="ignore", invalid="ignore"):
        cast = arr.astype(want, copy=False)
    if want.kind == "f" and not np.isfinite(cast).all():
        raise InferenceInputError(
            f"input {name!r} contains NaN or infinite values (or values too large for {want.name})"
        )
    # Not np.ascontiguousarray: it turns a rank-0 array into rank 1.
    return cast if cast.flags.c_contiguous else cast.copy(order="C")


def _check_kind(name: str, arr: np.ndarray, want: np.dtype[Any]) -> None:
    """Refuse values whose kind would need a lossy or surprising conversion to ``want``."""
    kind = arr.dtype.kind
    if kind == "O":
        raise InferenceInputError(
            f"input {name!r} is ragged or holds values that are not numbers "
            "(or integers too large for any dtype)"
        )
    if want.kind == "b":
        if kind != "b":
            raise InferenceInputError(f"input {name!r} must hold booleans, got {_kind_name(kind)}")
    elif want.kind in "iu":
        if kind not in "iu":
            raise InferenceInputError(
                f"input {name!r} must hold integers ({want.name}), got {_kind_name(kind)}"
            )
        info = np.iinfo(want)
        if int(arr.min()) < info.min or int(arr.max()) > info.max:
            raise InferenceInputError(
                f"input {name!r} has values outside the {want.name} range [{info.min}, {info.max}]"
            )
    elif want.kind == "f":
        if kind not in "iuf":
            raise InferenceInputError(
                f"input {name!r} must hold numbers ({want.name}), got {_kind_name(kind)}"
            )
    else:
        raise InferenceInputError(f"input {name!r} has unsupported dtype {want.name}")


def _kind_name(kind: str) -> str:
    return {
        "b": "booleans",
        "i": "integers",
        "u": "integers",
        "f": "floats",
        "c": "complex numbers",
        "U": "strings",
        "S": "bytes",
    }.get(kind, "non-numeric values")


# --------------------------------------------------------------------------- onnxruntime
# ONNX element types we can serve, as numpy dtype names. Strings, bfloat16 and
# the float8 family have no plain numpy/JSON representation; a model using
# them at its boundary is refused at load time rather than failing per request.
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(uint16)": "uint16",
    "tensor(int32)": "int32",
    "tensor(uint32)": "uint32",
    "tensor(int64)": "int64",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


def _ort_spec(arg: Any, what: str) -> TensorSpec:
    dtype = _ORT_TYPES.get(str(arg.type))
    if dtype is None:
        raise ModelLoadError(f"model {what} {arg.name!r} has unsupported type {arg.type}")
    shape = tuple(
        d if isinstance(d, int) and not isinstance(d, bool) and d >= 0 else None
        for d in (arg.shape or ())
    )
    return TensorSpec(name=str(arg.name), dtype=dtype, shape=shape)


class _OnnxModel:
    """An onnxruntime ``InferenceSession`` behind the :class:`LoadedModel` interface."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.inputs = tuple(_ort_spec(a, "input") for a in session.get_inputs())
        self.outputs = tuple(_ort_spec(a, "output") for a in session.get_outputs())
        self._output_names = [s.name for s in self.outputs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(feeds, self.inputs)
        try:
            results = self._session.run(self._output_names, dict(feeds))
        except Exception as exc:  # onnxruntime's pybind errors share no useful base
            raise InferenceError(f"onnxruntime failed: {exc}") from exc
        return {n: np.asarray(r) for n, r in zip(self._output_names, results, strict=True)}


# ------------------------------------------------------------ onnx session options
# A compiled variant may ask for session config entries through its own
# metadata (``metadata_props``), so the file carries how it must be opened and
# the agent needs neither the bundle format nor the onnx package to know it.
# The compiler times each candidate with the same entries.
ONNX_SESSION_CONFIG_KEY = "edgefleet.onnxruntime.session_config"
# Entries a model may set, with their allowed values. Only what changes how a
# correct model is optimised: a signed bundle still must not be able to tune
# threads, memory arenas or file paths on the gateway.
#
# ``session.disable_quant_qdq=1`` keeps weight-only int8 models (int8 weight
# initializer -> DequantizeLinear -> float Conv/MatMul) fast: onnxruntime then
# folds the DequantizeLinear of constant weights at load and runs float kernels
# (with Conv fusions and NCHWc layouts). By default it keeps the
# DequantizeLinear nodes for QDQ fusions that weight-only models do not have,
# which runs 1.65-1.84x slower than fp32. It would hurt a static QDQ model,
# which is why it is per model and not a backend default.
ONNX_SESSION_CONFIG_ALLOWED: Mapping[str, frozenset[str]] = {
    "session.disable_quant_qdq": frozenset({"0", "1"}),
}
# ModelProto.metadata_props; StringStringEntryProto.key / .value.
_MODEL_METADATA_FIELD = 14
_ENTRY_KEY_FIELD = 1
_ENTRY_VALUE_FIELD = 2


def _read_varint(f: BinaryIO) -> int:
    value = 0
    shift = 0
    while True:
        byte = f.read(1)
        if not byte:
            raise ValueError("truncated varint")
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("oversized varint")


def _read_fields(f: BinaryIO, end: int, keep: Collection[int]) -> list[tuple[int, bytes]]:
    """Length-delimited fields numbered ``keep`` of the message in ``f`` up to offset ``end``.

    Every other field is skipped by seeking past it, so the graph (nearly all
    of a model's bytes) is never read.
    """
    out: list[tuple[int, bytes]] = []
    while f.tell() < end:
        tag = _read_varint(f)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _read_varint(f)
        elif wire == 2:
            length = _read_varint(f)
            if f.tell() + length > end:
                raise ValueError("truncated length-delimited field")
            if number in keep:
                out.append((number, f.read(length)))
            else:
                f.seek(length, 1)
        elif wire in (1, 5):
            f.seek(8 if wire == 1 else 4, 1)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    if f.tell() != end:
        raise ValueError("truncated field")
    return out


def onnx_metadata(data: bytes | BinaryIO) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX model, read without the onnx package.

    Args:
        data: the serialized model, or a seekable binary file holding it.

    Raises:
        ValueError: it is not a well-formed protobuf message.
    """
    import io

    f = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    start = f.tell()
    end = f.seek(0, io.SEEK_END)
    f.seek(start)
    out: dict[str, str] = {}
    for _, raw in _read_fields(f, end, {_MODEL_METADATA_FIELD}):
        entry = dict(
            _read_fields(io.BytesIO(raw), len(raw), {_ENTRY_KEY_FIELD, _ENTRY_VALUE_FIELD})
        )
        key = entry.get(_ENTRY_KEY_FIELD, b"").decode("utf-8", "replace")
        out[key] = entry.get(_ENTRY_VALUE_FIELD, b"").decode("utf-8", "replace")
    return out


def onnx_session_config(data: bytes | BinaryIO) -> dict[str, str]:
    """The session config entries a serialized ONNX model asks for.

    The request is JSON under :data:`ONNX_SESSION_CONFIG_KEY` in its metadata.

    Entries outside :data:`ONNX_SESSION_CONFIG_ALLOWED`, and a malformed
    request, are logged and ignored: the model then loads with the defaults,
    which is slower for weight-only models but never wrong.
    """
    import json

    try:
        raw = onnx_metadata(data).get(ONNX_SESSION_CONFIG_KEY)
    except ValueError as exc:
        log.warning("cannot read the model's metadata (%s); default session options", str(exc))
        return {}
    if raw is None:
        return {}
    try:
        asked = json.loads(raw)
    except ValueError:
        asked = None
    if not isinstance(asked, dict):
        log.warning("ignoring malformed %s metadata %r", ONNX_SESSION_CONFIG_KEY, raw[:80])
        return {}
    config: dict[str, str] = {}
    for key, value in asked.items():
        allowed = ONNX_SESSION_CONFIG_ALLOWED.get(key)
        if allowed is None or not isinstance(value, str) or value not in allowed:
            log.warning("ignoring session config entry %r=%r the model asks for", key, value)
            continue
        config[key] = value
    return config


def _model_session_config(model_path: Path) -> dict[str, str]:
    with model_path.open("rb") as f:
        return onnx_session_config(f)


class OnnxRuntimeBackend:
    """Loads ``.onnx`` files into onnxruntime CPU sessions tuned for gateways.

    Gateways are small shared machines: one intra-op thread by default, and
    no busy-wait spinning between ops, which otherwise burns a core per
    session while idle.
    """

    name = "onnxruntime"

    def __init__(self, threads: int = 1) -> None:
        if threads < 1:
            raise ConfigError("threads must be at least 1")
        self.threads = threads

    def load(self, model_path: Path) -> LoadedModel:
        """Create an inference session from ``model_path``.

        Raises:
            ModelLoadError: the file cannot be read or onnxruntime refuses it,
                or its inputs/outputs use types the agent cannot serve.
        """
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise UnsupportedRuntimeError(
                "onnxruntime is not installed; install edgefleet[agent-onnx]"
            ) from exc
        if not model_path.is_file():
            raise ModelLoadError(f"model file {model_path} does not exist")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only; warnings go nowhere useful on a gateway
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            for key, value in _model_session_config(model_path).items():
                options.add_session_config_entry(key, value)
        except OSError as exc:
            raise ModelLoadError(f"cannot read {model_path.name}: {exc}") from exc
        try:
            session = ort.InferenceSession(
                str(model_path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # InvalidProtobuf, Fail, NotImplemented, ... share no base
            raise ModelLoadError(f"onnxruntime cannot load {model_path.name}: {exc}") from exc
        return _OnnxModel(session)


# --------------------------------------------------------------------------- tflite
# The interpreter modules, in order of preference. ai-edge-litert is the
# maintained LiteRT package (wheels for numpy 1 and 2); tflite-runtime is the
# legacy one some gateway images still ship, and its last release (2.14) is
# built against numpy 1.x.
TFLITE_MODULES = ("ai_edge_litert", "tflite_runtime")
TFLITE_MAGIC = b"TFL3"

# TFLite tensor types the agent serves, as numpy dtype names. Strings and
# complex numbers have no JSON form; a model using them at its boundary is
# refused at load time.
_TFLITE_TYPES = frozenset(
    {
        "float32", "float16", "float64", "int8", "uint8", "int16", "uint16",
        "int32", "uint32", "int64", "uint64", "bool",
    }
)  # fmt: skip


def _numpy_major() -> int:
    return int(np.__version__.split(".", 1)[0])


def tflite_interpreter_class(modules: Sequence[str] = TFLITE_MODULES) -> Any:
    """The ``Interpreter`` class of the first usable TFLite runtime in ``modules``.

    ai-edge-litert is preferred; tflite-runtime is the fallback. tflite-runtime
    2.14 is compiled against numpy 1.x: imported next to numpy 2 it fails with
    a long ABI message (or crashes later), so that combination is refused up
    front with an explanation instead of being imported.

    Raises:
        UnsupportedRuntimeError: no module is installed, the only one is
            tflite-runtime next to numpy >= 2, or the installed one cannot be
            imported.
    """
    refusals: list[str] = []
    for module in modules:
        if importlib.util.find_spec(module) is None:
            continue
        if module == "tflite_runtime" and _numpy_major() >= 2:
            refusals.append(
                f"tflite-runtime 2.14 needs numpy<2, but numpy {np.__version__} is installed; "
                "install ai-edge-litert instead (pip install 'edgefleet[agent-tflite]'), "
                "or pin numpy<2 for tflite-runtime"
            )
            continue
        try:
            interpreter = importlib.import_module(f"{module}.interpreter")
        except ImportError as exc:
            refusals.append(f"{module} is installed but cannot be imported: {exc}")
            continue
        return interpreter.Interpreter
    if refusals:
        raise UnsupportedRuntimeError("; ".join(refusals))
    raise UnsupportedRuntimeError(
        "no TFLite interpreter is installed on this device; "
        "install one with: pip install 'edgefleet[agent-tflite]' (ai-edge-litert)"
    )


def _tflite_usable() -> bool:
    """Whether :func:`tflite_interpreter_class` would find a runtime, without importing one."""
    for module in TFLITE_MODULES:
        if importlib.util.find_spec(module) is None:
            continue
        if module == "tflite_runtime" and _numpy_major() >= 2:
            continue
        return True
    return False


def is_tflite(data: bytes) -> bool:
    """Whether ``data`` carries the TFLite flatbuffer file identifier (``TFL3`` at bytes 4..8)."""
    return len(data) >= 8 and data[4:8] == TFLITE_MAGIC


@dataclass(frozen=True)
class _Boundary:
    """How one model input or output maps between the caller and the interpreter.

    ``scale``/``zero_point`` are set for a quantized boundary tensor (a
    full-integer model's int8 input, say): the caller then sees float32 and the
    value is (de)quantized here, so every variant of a model, fp32 or int8,
    takes and returns the same arrays.
    """

    spec: TensorSpec
    index: int
    raw_dtype: np.dtype[Any]
    scale: float | None = None
    zero_point: int = 0


def _tflite_boundary(detail: Mapping[str, Any], name: str, what: str) -> _Boundary:
    raw = np.dtype(detail["dtype"])
    if raw.name not in _TFLITE_TYPES:
        raise ModelLoadError(f"model {what} {name!r} has unsupported type {raw.name}")
    signature = detail.get("shape_signature")
    dims = detail["shape"] if signature is None or len(signature) == 0 else signature
    shape = tuple(int(d) if int(d) >= 0 else None for d in dims)
    params = detail.get("quantization_parameters") or {}
    scales = np.asarray(params.get("scales", ()), dtype=np.float64)
    zeros = np.asarray(params.get("zero_points", ()), dtype=np.int64)
    if raw.kind in "iu" and scales.size == 1 and float(scales[0]) > 0:
        spec = TensorSpec(name=name, dtype="float32", shape=shape)
        zero = int(zeros[0]) if zeros.size else 0
        return _Boundary(spec, int(detail["index"]), raw, float(scales[0]), zero)
    if raw.kind in "iu" and scales.size > 1:
        raise ModelLoadError(
            f"model {what} {name!r} is quantized per channel; only per-tensor "
            "quantized inputs and outputs can be served"
        )
    return _Boundary(TensorSpec(name=name, dtype=raw.name, shape=shape), int(detail["index"]), raw)


def _signature_names(interpreter: Any) -> tuple[dict[int, str], dict[int, str]] | None:
    """Tensor index -> signature name for inputs and outputs, if there is one usable signature.

    Converters name boundary tensors ``serving_default_image:0`` and
    ``StatefulPartitionedCall:0``; the signature keeps the names the model
    author chose (``image``, ``probs``), which are what callers and sample
    files should use. Only a single signature covering exactly the main
    graph's inputs and outputs is used; otherwise tensor names are kept.
    """
    try:
        signatures = interpreter.get_signature_list()
        if len(signatures) != 1:
            return None
        runner = interpreter.get_signature_runner(next(iter(signatures)))
        ins = {int(d["index"]): str(k) for k, d in runner.get_input_details().items()}
        outs = {int(d["index"]): str(k) for k, d in runner.get_output_details().items()}
    except (ValueError, RuntimeError, KeyError, AttributeError):
        return None
    main_in = {int(d["index"]) for d in interpreter.get_input_details()}
    main_out = {int(d["index"]) for d in interpreter.get_output_details()}
    if set(ins) != main_in or set(outs) != main_out:
        return None
    return ins, outs


class _TfliteModel:
    """A TFLite interpreter behind the :class:`LoadedModel` interface.

    An interpreter is not thread-safe (its tensors are shared buffers), so
    every inference holds a lock: concurrent HTTP requests are served one at
    a time per model, which on a gateway core costs nothing over what the
    kernels already serialise. A dynamic axis (batch) is resized only when the
    incoming shape differs from the allocated one.
    """

    def __init__(self, interpreter: Any) -> None:
        self._interpreter = interpreter
        self._lock = threading.Lock()
        names = _signature_names(interpreter)
        in_names, out_names = names if names is not None else ({}, {})
        self._in = tuple(
            _tflite_boundary(d, in_names.get(int(d["index"]), str(d["name"])), "input")
            for d in interpreter.get_input_details()
        )
        self._out = tuple(
            _tflite_boundary(d, out_names.get(int(d["index"]), str(d["name"])), "output")
            for d in interpreter.get_output_details()
        )
        seen = [b.spec.name for b in (*self._in, *self._out)]
        if len(set(seen)) != len(seen):
            raise ModelLoadError(f"model tensor names are not unique: {seen}")
        self.inputs = tuple(b.spec for b in self._in)
        self.outputs = tuple(b.spec for b in self._out)
        self._shapes = {
            int(d["index"]): tuple(int(x) for x in d["shape"])
            for d in interpreter.get_input_details()
        }

    @staticmethod
    def _to_raw(b: _Boundary, value: np.ndarray) -> np.ndarray:
        # float32 arithmetic in place: exact for 8-bit codes, and cheaper than
        # float64 on a model whose inference takes microseconds.
        if b.scale is None:
            return np.ascontiguousarray(value)
        info = np.iinfo(b.raw_dtype)
        q: np.ndarray = np.multiply(value, np.float32(1.0 / b.scale), dtype=np.float32)
        q += np.float32(b.zero_point)
        np.rint(q, out=q)
        np.clip(q, info.min, info.max, out=q)
        return q.astype(b.raw_dtype)

    @staticmethod
    def _from_raw(b: _Boundary, value: np.ndarray) -> np.ndarray:
        if b.scale is None:
            return value
        out = value.astype(np.float32)
        out -= np.float32(b.zero_point)
        out *= np.float32(b.scale)
        return out

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(feeds, self.inputs)
        it = self._interpreter
        with self._lock:
            try:
                resized = False
                for b in self._in:
                    shape = tuple(int(x) for x in feeds[b.spec.name].shape)
                    if self._shapes[b.index] != shape:
                        it.resize_tensor_input(b.index, list(shape), strict=True)
                        self._shapes[b.index] = shape
                        resized = True
                if resized:
                    it.allocate_tensors()
                for b in self._in:
                    it.set_tensor(b.index, self._to_raw(b, feeds[b.spec.name]))
                it.invoke()
                return {b.spec.name: self._from_raw(b, it.get_tensor(b.index)) for b in self._out}
            except Exception as exc:  # the interpreter raises ValueError/RuntimeError alike
                raise InferenceError(f"tflite failed: {exc}") from exc


class TfliteBackend:
    """Loads ``.tflite`` files into a LiteRT (or legacy tflite-runtime) interpreter.

    One kernel thread by default, like the onnxruntime backend: gateways are
    small shared machines. Models are read into memory and checked for the
    TFLite file identifier before the interpreter sees them, so a wrong file
    is reported as such instead of as a flatbuffer verification failure.
    """

    name = "tflite"

    def __init__(self, threads: int = 1) -> None:
        if threads < 1:
            raise ConfigError("threads must be at least 1")
        self.threads = threads

    def load(self, model_path: Path) -> LoadedModel:
        """Create an interpreter from ``model_path``.

        Raises:
            UnsupportedRuntimeError: no usable TFLite runtime is installed.
            ModelLoadError: the file is missing, not a TFLite model, or the
                interpreter refuses it (corrupt, unknown op), or its inputs and
                outputs use types the agent cannot serve.
        """
        interpreter_class = tflite_interpreter_class()
        if not model_path.is_file():
            raise ModelLoadError(f"model file {model_path} does not exist")
        try:
            data = model_path.read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"cannot read {model_path.name}: {exc.strerror or exc}") from exc
        return self._load(data, model_path.name, interpreter_class)

    def load_bytes(self, data: bytes, what: str = "model") -> LoadedModel:
        """Like :meth:`load`, from the model's bytes (the controller's compiler uses this)."""
        return self._load(bytes(data), what, tflite_interpreter_class())

    def _load(self, data: bytes, what: str, interpreter_class: Any) -> _TfliteModel:
        if not is_tflite(data):
            raise ModelLoadError(f"{what} is not a TFLite model (no TFL3 file identifier)")
        try:
            interpreter = interpreter_class(model_content=data, num_threads=self.threads)
            interpreter.allocate_tensors()
        except Exception as exc:  # ValueError/RuntimeError from the native side alike
            text = " ".join(str(exc).split())[:300] or type(exc).__name__
            raise ModelLoadError(f"tflite cannot load {what}: {text}") from exc
        return _TfliteModel(interpreter)


# --------------------------------------------------------------------------- registry
def _onnxruntime(threads: int) -> Backend:
    return OnnxRuntimeBackend(threads=threads)


def _tflite(threads: int) -> Backend:
    tflite_interpreter_class()  # refuse now, with the reason, rather than at load time
    return TfliteBackend(threads=threads)


def _onnxruntime_usable() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


# runtime name -> (cheap "is it installed" check, factory, what to install)
_BACKENDS: dict[str, tuple[Callable[[], bool], Callable[[int], Backend], str]] = {
    "onnxruntime": (_onnxruntime_usable, _onnxruntime, "edgefleet[agent-onnx]"),
    "tflite": (_tflite_usable, _tflite, "edgefleet[agent-tflite]"),
}


def available_runtimes() -> tuple[str, ...]:
    """Runtimes this agent can load models for, in a stable order.

    Only checks that the runtime's module can be found, without importing it,
    so it is cheap enough to call when describing the hardware. ``tflite`` is
    reported when ai-edge-litert is installed, or tflite-runtime next to
    numpy < 2 (the only combination tflite-runtime 2.14 works in).
    """
    return tuple(name for name, (usable, _, _) in _BACKENDS.items() if usable())


def get_backend(runtime: str, *, threads: int = 1) -> Backend:
    """Return a backend for a bundle's declared runtime.

    Raises:
        UnsupportedRuntimeError: the runtime is unknown or its library is not
            installed (for ``tflite``: also tflite-runtime next to numpy >= 2).
        ConfigError: ``threads`` is below 1 (a runtime_threads setting).
    """
    entry = _BACKENDS.get(runtime)
    if entry is None:
        raise UnsupportedRuntimeError(
            f"unknown runtime {runtime!r}; this agent supports "
            f"{', '.join(sorted(_BACKENDS)) or 'none'}"
        )
    usable, factory, extra = entry
    if threads < 1:
        raise ConfigError("threads must be at least 1")
    if runtime != "tflite" and not usable():
        raise UnsupportedRuntimeError(
            f"runtime {runtime!r} is not installed on this device; install {extra}"
        )
    return factory(threads)
