"""Build bundle archives (see :mod:`edgefleet.protocols.bundle`) from ONNX and TFLite models.

A bundle carries, next to the model, the inputs and the outputs the runtime
(onnxruntime, or the TFLite interpreter for ``runtime="tflite"``) produced
for them on the controller. The agent re-runs that sample after
installing and refuses to go live if its outputs differ (beyond the manifest's
tolerances), which catches a broken runtime, a wrong CPU build or a corrupted
model before it serves a single request.

For the wire, :func:`compress_bundle` xz-compresses a bundle when that saves
at least :data:`MIN_COMPRESSION_SAVING` of its bytes; the publisher signs
the codec and the decompressed length in the target's ``custom`` field.

Bundle bytes are reproducible: fixed tar and zip metadata and a fixed member
order mean the same model, sample and fields always give the same sha256,
so re-publishing an unchanged bundle is recognisably a no-op.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import math
import tarfile
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnx.checker
import onnx.external_data_helper
import onnx.shape_inference
from google.protobuf.message import DecodeError

from edgefleet.controller.errors import ModelError
from edgefleet.protocols.bundle import (
    MANIFEST_NAME,
    MAX_DECOMPRESSED_BYTES,
    MODEL_NAMES,
    SAMPLE_INPUT_PREFIX,
    SAMPLE_NAME,
    SAMPLE_OUTPUT_PREFIX,
    BundleCompression,
    BundleManifest,
    TensorSpec,
)

__all__ = [
    "LZMA_PRESET",
    "MIN_COMPRESSION_SAVING",
    "build_bundle",
    "compress_bundle",
    "default_sample",
    "inspect_onnx",
    "inspect_tflite_io",
]

# Compress a bundle only when that saves at least this share of its bytes:
# below it the agent's decompression pass costs more than the link saves.
MIN_COMPRESSION_SAVING = 0.05
# xz preset 6: an 8 MiB dictionary, so a gateway decompresses in ~9 MiB of
# memory (preset 9 would need 65 MiB for a few percent more).
LZMA_PRESET = 6

# The earliest date a zip entry can carry; any fixed value makes archives reproducible.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_ZIP_UNIX = 3  # "made by" Unix, so the bytes do not depend on the building OS
_MEMBER_MODE = 0o644
_INT_SAMPLE_HIGH = 4  # int inputs are often indices: keep them small and valid


def inspect_onnx(model: bytes) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The input and output tensors of an ONNX model.

    Initializers listed as graph inputs (older exporters do this) are not
    inputs a caller must feed, so they are left out. Shape inference runs
    first so outputs whose shapes the exporter did not record still get them.

    Args:
        model: The serialized ``ModelProto``.

    Returns:
        ``(inputs, outputs)``; dtypes are numpy dtype names such as
        ``"float32"`` and dynamic dimensions are ``None``.

    Raises:
        ModelError: The bytes are not a valid ONNX model, keep weights in
            external files, or have a non-tensor input or output or one of
            unknown rank.
    """
    proto = _load(model)
    initializers = {init.name for init in proto.graph.initializer}
    inputs = tuple(_spec(vi, "input") for vi in proto.graph.input if vi.name not in initializers)
    outputs = tuple(_spec(vi, "output") for vi in proto.graph.output)
    if not inputs or not outputs:
        raise ModelError("the ONNX model must have at least one input and one output")
    return inputs, outputs


def _tflite_model(model: bytes) -> Any:
    """Load a ``.tflite`` model with the agent's own TFLite backend.

    The agent loads the bundle with exactly this code, so the input/output
    specs written into the manifest (signature names, dynamic axes, float32
    at the boundary of a full-integer model) are the ones it will find.
    """
    from edgefleet.protocols.errors import ModelLoadError, UnsupportedRuntimeError
    from edgefleet.shared.runtime import TfliteBackend

    if not model:
        raise ModelError("the model file is empty")
    try:
        return TfliteBackend(threads=1).load_bytes(model, "the model file")
    except UnsupportedRuntimeError as exc:
        raise ModelError(f"cannot build a tflite bundle here: {exc}") from None
    except ModelLoadError as exc:
        raise ModelError(str(exc)) from None


def inspect_tflite_io(model: bytes) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The input and output tensors of a TFLite model, as the agent will serve them.

    Names come from the model's signature when it has exactly one (``image``
    rather than ``serving_default_image:0``); a ``-1`` in the shape signature
    is a dynamic axis (``None``); quantized int8 inputs and outputs of a
    full-integer model are served as float32.

    Raises:
        ModelError: no TFLite interpreter is installed, the bytes are not a
            TFLite model, the interpreter refuses them, or the model has no
            input or output.
    """
    loaded = _tflite_model(model)
    inputs, outputs = tuple(loaded.inputs), tuple(loaded.outputs)
    if not inputs or not outputs:
        raise ModelError("the TFLite model must have at least one input and one output")
    return inputs, outputs


def build_bundle(
    model: bytes,
    *,
    name: str,
    version: str,
    release: int,
    hardware_class: str,
    precision: str,
    sample_inputs: Mapping[str, npt.NDArray[Any]],
    runtime: str = "onnxruntime",
    smoke_atol: float = 1e-4,
    smoke_rtol: float = 1e-3,
) -> tuple[bytes, BundleManifest]:
    """Package ``model`` with its manifest and smoke-test sample as a bundle.

    The expected outputs come from the runtime on the CPU with one thread,
    the most reproducible configuration, so the agent's tolerances only have
    to absorb differences between CPUs and kernels, not threading noise.

    Args:
        model: ONNX model bytes, or ``.tflite`` bytes with ``runtime="tflite"``.
        name: Model name (``BundleManifest.model``).
        version: Model version string.
        release: Release counter; agents refuse to go backwards.
        hardware_class: The hardware class the bundle is built for.
        precision: One of ``edgefleet.protocols.bundle.PRECISIONS``.
        sample_inputs: Input name -> array; must name exactly the model's
            inputs with matching dtypes and ranks (see :func:`default_sample`).
        runtime: ``"onnxruntime"`` or ``"tflite"``.
        smoke_atol: Absolute tolerance for the agent's smoke test.
        smoke_rtol: Relative tolerance for the agent's smoke test.

    Returns:
        The archive bytes and the manifest inside it.

    Raises:
        ModelError: The model is invalid or cannot run, the sample does not
            fit it, the outputs are not finite, the runtime is unknown (or,
            for tflite, no TFLite interpreter is installed), or the
            tolerances are negative.
        MessageError: A manifest field is invalid (e.g. an unknown precision
            or a release below 1), as the agent would find it.
    """
    if runtime not in MODEL_NAMES:
        raise ModelError(
            f"bundles can be built for {', '.join(sorted(MODEL_NAMES))}, not {runtime!r}"
        )
    if not (_finite_non_negative(smoke_atol) and _finite_non_negative(smoke_rtol)):
        raise ModelError("smoke_atol and smoke_rtol must be finite and non-negative")
    if runtime == "tflite":
        loaded = _tflite_model(model)
        inputs, outputs = tuple(loaded.inputs), tuple(loaded.outputs)
        if not inputs or not outputs:
            raise ModelError("the TFLite model must have at least one input and one output")
        feeds = _check_sample(inputs, sample_inputs)
        expected = _run_tflite(loaded, feeds, outputs)
    else:
        inputs, outputs = inspect_onnx(model)
        feeds = _check_sample(inputs, sample_inputs)
        expected = _run(model, feeds, outputs)

    model_file = MODEL_NAMES[runtime]
    manifest = BundleManifest(
        model=name,
        version=version,
        release=release,
        runtime=runtime,
        precision=precision,
        hardware_class=hardware_class,
        model_file=model_file,
        model_sha256=hashlib.sha256(model).hexdigest(),
        inputs=inputs,
        outputs=outputs,
        smoke_atol=smoke_atol,
        smoke_rtol=smoke_rtol,
        # A timestamp would make every build's bytes (and hash) different;
        # the registry records when a bundle was built.
        created_at=0.0,
    )
    manifest_raw = manifest.encode()
    BundleManifest.decode(manifest_raw)  # refuse here what the agent would refuse

    sample = {SAMPLE_INPUT_PREFIX + k: v for k, v in feeds.items()}
    sample.update({SAMPLE_OUTPUT_PREFIX + k: v for k, v in expected.items()})
    archive = _tar({MANIFEST_NAME: manifest_raw, model_file: model, SAMPLE_NAME: _npz(sample)})
    return archive, manifest


def compress_bundle(
    archive: bytes, *, min_saving: float = MIN_COMPRESSION_SAVING
) -> tuple[bytes, BundleCompression | None]:
    """Compress a bundle archive for the wire when that measurably helps.

    Quantized weights (int8 values near zero, repeated scales and zero
    points) compress well; fp32 weights barely do. The archive is compressed
    with xz (stdlib :mod:`lzma`, preset :data:`LZMA_PRESET`, CRC-64 check)
    and kept only if it is at least ``min_saving`` smaller. The result is
    reproducible: the same archive always gives the same bytes.

    Args:
        archive: the tar from :func:`build_bundle`.
        min_saving: the share of bytes compression must save, in ``[0, 1)``.

    Returns:
        ``(bytes to publish, compression)``: the compressed bytes and the
        :class:`~edgefleet.protocols.bundle.BundleCompression` to sign in the
        target's ``custom`` field, or the archive unchanged and ``None``.

    Raises:
        ModelError: ``min_saving`` is outside ``[0, 1)`` or the archive is
            larger than an agent accepts decompressed.
    """
    if not (0 <= min_saving < 1):
        raise ModelError(f"min_saving must be in [0, 1), got {min_saving}")
    if len(archive) > MAX_DECOMPRESSED_BYTES:
        raise ModelError(
            f"the bundle is {len(archive)} bytes; agents accept at most {MAX_DECOMPRESSED_BYTES}"
        )
    packed = lzma.compress(
        archive, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=LZMA_PRESET
    )
    if len(packed) > len(archive) * (1 - min_saving):
        return archive, None
    return packed, BundleCompression("lzma", len(archive))


def default_sample(
    inputs: Sequence[TensorSpec], *, batch: int = 2, seed: int = 0
) -> dict[str, npt.NDArray[Any]]:
    """Random sample inputs that fit ``inputs``, for models shipped without one.

    A dynamic first dimension (the batch axis, by convention) becomes
    ``batch``; other dynamic dimensions become 1. Floats are standard normal;
    integers are drawn from ``[0, 4)`` because integer inputs are usually
    indices (token ids, categories) that must stay in range; booleans are
    random.

    Raises:
        ModelError: An input has a dtype with no sensible random values
            (strings, complex numbers, exotic float formats).
    """
    if batch < 1:
        raise ModelError(f"batch must be at least 1, got {batch}")
    rng = np.random.default_rng(seed)
    sample: dict[str, npt.NDArray[Any]] = {}
    for spec in inputs:
        shape = tuple(
            (batch if axis == 0 else 1) if dim is None else dim
            for axis, dim in enumerate(spec.shape)
        )
        try:
            dtype = np.dtype(spec.dtype)
        except TypeError:
            dtype = np.dtype(object)
        if dtype.kind == "f":
            sample[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            sample[spec.name] = rng.integers(0, _INT_SAMPLE_HIGH, size=shape).astype(dtype)
        elif dtype.kind == "b":
            sample[spec.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            raise ModelError(
                f"cannot make random sample data for input {spec.name!r} of type "
                f"{spec.dtype}; pass sample inputs explicitly"
            )
    return sample


# -- model checks -----------------------------------------------------------------


def _load(model: bytes) -> onnx.ModelProto:
    """Parse and check ``model``, with shapes inferred."""
    if not model:
        raise ModelError("the model file is empty")
    try:
        proto = onnx.load_model_from_string(model)
    except (DecodeError, ValueError) as exc:
        raise ModelError(f"the model file is not an ONNX model (protobuf: {exc})") from None
    # Nested graphs' tensors are left to the checker, which also refuses them.
    if any(onnx.external_data_helper.uses_external_data(t) for t in proto.graph.initializer):
        raise ModelError("the ONNX model keeps weights in external files; embed them in the model")
    try:
        onnx.checker.check_model(proto)
        proto = onnx.shape_inference.infer_shapes(proto)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ModelError(f"the model file is not a valid ONNX model: {exc}") from None
    return proto


def _spec(vi: onnx.ValueInfoProto, kind: str) -> TensorSpec:
    which = vi.type.WhichOneof("value")
    if which != "tensor_type":
        raise ModelError(f"model {kind} {vi.name!r} is a {which}; only tensors are supported")
    tensor = vi.type.tensor_type
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    except (KeyError, ValueError):
        raise ModelError(
            f"model {kind} {vi.name!r} has unsupported element type {tensor.elem_type}"
        ) from None
    if not tensor.HasField("shape"):
        raise ModelError(f"model {kind} {vi.name!r} has no known rank")
    shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
    return TensorSpec(name=vi.name, dtype=dtype, shape=shape)


def _check_sample(
    inputs: Sequence[TensorSpec], sample: Mapping[str, npt.NDArray[Any]]
) -> dict[str, npt.NDArray[Any]]:
    """Check that ``sample`` feeds exactly the model's inputs; return contiguous copies."""
    wanted = [spec.name for spec in inputs]
    missing = sorted(set(wanted) - set(sample))
    unexpected = sorted(set(sample) - set(wanted))
    if missing or unexpected:
        raise ModelError(
            f"sample inputs do not match the model's inputs {wanted}: "
            f"missing {missing}, unexpected {unexpected}"
        )
    feeds: dict[str, npt.NDArray[Any]] = {}
    for spec in inputs:
        array = np.asarray(sample[spec.name])
        if array.dtype.name != spec.dtype:
            raise ModelError(
                f"sample input {spec.name!r} is {array.dtype.name} but the model expects "
                f"{spec.dtype}"
            )
        fits = array.ndim == len(spec.shape) and all(
            want is None or want == got for want, got in zip(spec.shape, array.shape, strict=True)
        )
        if not fits:
            declared = ["?" if d is None else d for d in spec.shape]
            raise ModelError(
                f"sample input {spec.name!r} has shape {list(array.shape)} but the model "
                f"expects {declared}"
            )
        feeds[spec.name] = np.ascontiguousarray(array)
    return feeds


def _run(
    model: bytes, feeds: Mapping[str, npt.NDArray[Any]], outputs: Sequence[TensorSpec]
) -> dict[str, npt.NDArray[Any]]:
    """Run onnxruntime on CPU with one thread; return finite outputs by name."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: warnings would go to stderr
    names = [spec.name for spec in outputs]
    try:
        session = ort.InferenceSession(
            model, sess_options=options, providers=["CPUExecutionProvider"]
        )
        results = session.run(names, dict(feeds))
    except Exception as exc:  # onnxruntime's errors derive directly from Exception
        raise ModelError(f"onnxruntime cannot run the model on the sample: {exc}") from exc
    return _finite_outputs(names, results)


def _run_tflite(
    loaded: Any, feeds: Mapping[str, npt.NDArray[Any]], outputs: Sequence[TensorSpec]
) -> dict[str, npt.NDArray[Any]]:
    """Run the TFLite interpreter (one thread, as loaded); return finite outputs by name."""
    from edgefleet.shared.runtime import InferenceError, InferenceInputError

    names = [spec.name for spec in outputs]
    try:
        results = loaded.run(dict(feeds))
    except (InferenceError, InferenceInputError) as exc:
        raise ModelError(f"tflite cannot run the model on the sample: {exc}") from None
    return _finite_outputs(names, [results[n] for n in names])


def _finite_outputs(names: Sequence[str], results: Sequence[Any]) -> dict[str, npt.NDArray[Any]]:
    expected: dict[str, npt.NDArray[Any]] = {}
    for name, value in zip(names, results, strict=True):
        array = np.ascontiguousarray(value)
        if array.dtype.kind in "fc" and not np.all(np.isfinite(array)):
            raise ModelError(
                f"output {name!r} is not finite for the sample inputs, so the agent's "
                "smoke test could never pass; choose other sample inputs"
            )
        expected[name] = array
    return expected


def _finite_non_negative(value: float) -> bool:
    return math.isfinite(value) and value >= 0


# -- archive writing ------------------------------------------------------------------


def _npz(arrays: Mapping[str, npt.NDArray[Any]]) -> bytes:
    """``numpy.savez`` output, but with fixed zip timestamps so bytes are reproducible.

    ``np.savez`` stamps entries with the current time; ``np.load`` reads
    this just the same (member ``"<key>.npy"`` becomes key ``"<key>"``).
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            npy = io.BytesIO()
            try:
                np.lib.format.write_array(npy, arrays[key], allow_pickle=False)
            except ValueError as exc:
                raise ModelError(f"sample array {key!r} cannot be stored: {exc}") from None
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
            info.create_system = _ZIP_UNIX
            info.external_attr = _MEMBER_MODE << 16
            zf.writestr(info, npy.getvalue())
    return buf.getvalue()


def _tar(members: Mapping[str, bytes]) -> bytes:
    """An uncompressed ustar archive with sorted members and no varying metadata."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(members):
            data = members[name]
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = _MEMBER_MODE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
