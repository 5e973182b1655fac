"""The runtime backend interface and the onnxruntime backend.

The rest of the agent never talks to an inference library directly: it asks
:func:`get_backend` for a :class:`Backend` by the runtime name a bundle
declares (``"onnxruntime"``, ``"tflite"``), loads the bundle's model file into
a :class:`LoadedModel` and calls :meth:`LoadedModel.run`. Keeping that surface
this small is what lets a second runtime (TFLite/LiteRT) arrive later without
touching the install pipeline or the HTTP endpoint.

Inputs are checked *before* they reach the runtime. A native runtime that is
handed a wrong dtype or rank fails with an opaque message at best; here the
caller gets an :class:`InferenceInputError` naming the tensor and what was
wrong, which the HTTP endpoint turns into a 400 rather than a 500. Failures of
the runtime itself on valid-looking input raise :class:`InferenceError`.

Inference libraries are imported lazily: importing this module (for example
to report :func:`available_runtimes` in the hardware description) must not
pay for loading onnxruntime.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from edgefleet.agent.errors import AgentError, ModelLoadError, UnsupportedRuntimeError
from edgefleet.protocols.bundle import TensorSpec

__all__ = [
    "Backend",
    "InferenceError",
    "InferenceInputError",
    "LoadedModel",
    "OnnxRuntimeBackend",
    "available_runtimes",
    "check_feeds",
    "coerce_inputs",
    "get_backend",
]

log = logging.getLogger(__name__)


class InferenceInputError(AgentError, ValueError):
    """The caller's inputs do not fit the model (names, dtypes, ranks, values).

    It is a :class:`ValueError` too, so generic callers that treat "bad
    argument" uniformly still catch it.
    """

    code: ClassVar[str] = "bad_input"


class InferenceError(AgentError):
    """The runtime failed while running a model on inputs that passed validation."""

    code: ClassVar[str] = "inference_failed"


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


class OnnxRuntimeBackend:
    """Loads ``.onnx`` files into onnxruntime CPU sessions tuned for gateways.

    Gateways are small shared machines: one intra-op thread by default, and
    no busy-wait spinning between ops, which otherwise burns a core per
    session while idle.
    """

    name = "onnxruntime"

    def __init__(self, threads: int = 1) -> None:
        if threads < 1:
            raise ValueError("threads must be at least 1")
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
                "onnxruntime is not installed; install edgefleet[agent]"
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
            session = ort.InferenceSession(
                str(model_path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # InvalidProtobuf, Fail, NotImplemented, ... share no base
            raise ModelLoadError(f"onnxruntime cannot load {model_path.name}: {exc}") from exc
        return _OnnxModel(session)


# --------------------------------------------------------------------------- registry
def _onnxruntime(threads: int) -> Backend:
    return OnnxRuntimeBackend(threads=threads)


def _tflite(threads: int) -> Backend:
    raise UnsupportedRuntimeError(
        "the tflite runtime is not supported by this agent yet; "
        "a later release supports it with: pip install 'edgefleet[tflite]'"
    )


# runtime name -> (module that must be importable, factory)
_BACKENDS: dict[str, tuple[str, Callable[[int], Backend]]] = {
    "onnxruntime": ("onnxruntime", _onnxruntime),
}
_PLANNED = {"tflite": _tflite}


def available_runtimes() -> tuple[str, ...]:
    """Runtimes this agent can load models for, in a stable order.

    Only checks that the runtime's module can be found, without importing it,
    so it is cheap enough to call when describing the hardware.
    """
    return tuple(
        name
        for name, (module, _) in _BACKENDS.items()
        if importlib.util.find_spec(module) is not None
    )


def get_backend(runtime: str, *, threads: int = 1) -> Backend:
    """Return a backend for a bundle's declared runtime.

    Raises:
        UnsupportedRuntimeError: the runtime is unknown, not implemented yet
            (``tflite``), or its library is not installed.
    """
    if runtime in _PLANNED:
        return _PLANNED[runtime](threads)
    entry = _BACKENDS.get(runtime)
    if entry is None:
        raise UnsupportedRuntimeError(
            f"unknown runtime {runtime!r}; this agent supports "
            f"{', '.join(sorted(_BACKENDS)) or 'none'}"
        )
    module, factory = entry
    if importlib.util.find_spec(module) is None:
        raise UnsupportedRuntimeError(
            f"runtime {runtime!r} is not installed on this device; install edgefleet[agent]"
        )
    return factory(threads)
