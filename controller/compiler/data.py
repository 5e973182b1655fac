"""Calibration and validation data: ``.npz`` files with one array per model input.

Layout: an array per model input, named exactly like the input, samples along
axis 0. Two shapes are accepted for each array, because models differ in
whether axis 0 is a batch axis:

* ``(samples, *input_shape)``: sample *i* is ``array[i]`` and must match the
  input shape exactly (fixed axes equal, dynamic axes any size). This is the
  only form for inputs without a batch axis (e.g. token ids of shape ``[seq]``)
  or with a fixed batch larger than one.
* ``(samples, *input_shape[1:])`` when the input's axis 0 is dynamic or 1:
  sample *i* is ``array[i:i+1]``, a batch of one.

All arrays must have the same number of samples and exactly the input's dtype
(no silent casts: an int32 token array for an int64 input is a bug upstream).
Inputs sharing a symbolic axis name (``seq``) must agree on its size; axes
without a real name (nothing, ``-1``, ``0`` or the literal ``?``) are each
dynamic on their own. A rank-0 (scalar) input takes a ``(samples,)`` array.
Anything else raises :class:`~edgefleet.controller.compiler.errors.DataError`
naming the array and what was expected, before any compilation work starts.

Two kinds of reserved keys may sit beside the input arrays:

* ``label:<output>``: the true answer per sample for model output
  ``<output>``, so the report gives real accuracy for fp32 and every
  candidate (:mod:`~edgefleet.controller.compiler.evaluate`). For a
  classifier output (``top1``/``topk:K``) an integer class index per row:
  shape ``(samples,)`` for one row per sample, or ``(samples, rows)``. For a
  probability output (``threshold:T``) 0/1 per value: ``(samples,)`` or
  ``(samples, *output_shape)``. For an integer output (``exact``), values
  of the output's shape. Calibration ignores labels.
* ``stream:id`` (only with a state mapping, ``--state IN=OUT``): an integer
  per sample; consecutive samples with the same id form one stream, and a
  change of value starts the next. Without it all samples are one stream.

Streams (stateful models)
-------------------------
With a state mapping ``{IN: OUT}`` the samples along axis 0 are consecutive
steps of streams. At the first step of each stream the model gets the
array's value for ``IN`` (the initial state); at every later step it gets
the ``OUT`` it produced at the step before, so each model (fp32 and every
candidate) runs its own state through the whole stream. The ``IN`` array may
be left out: the initial state is then zeros (dynamic axes of size 1).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgefleet.controller.compiler.errors import DataError
from edgefleet.controller.compiler.source import SourceModel
from edgefleet.protocols.bundle import TensorSpec

__all__ = [
    "LABEL_PREFIX",
    "STREAM_KEY",
    "DataSource",
    "SampleSet",
    "check_state",
    "load_samples",
    "synthetic_feed",
]

LABEL_PREFIX = "label:"
STREAM_KEY = "stream:id"

Array = npt.NDArray[np.generic]
Feed = dict[str, Array]
DataSource = Path | str | Mapping[str, npt.ArrayLike]


@dataclass(frozen=True)
class SampleSet:
    """Validated samples for one model, addressable one sample (one inference) at a time.

    Attributes:
        role: ``"calibration"`` or ``"validation"`` (used in messages).
        arrays: the arrays by input name, truncated to ``count`` samples.
        batched: per input, ``True`` when the array's axis 0 is the model's
            batch axis (sample *i* is ``array[i:i+1]``), ``False`` when it is
            an extra sample axis (sample *i* is ``array[i]``).
        count: number of samples used.
        total: number of samples in the data before truncation.
        state: state input name to the output fed back into it (empty: every
            sample is independent).
        streams: ``(start, stop)`` sample ranges of the streams, in order
            (only with ``state``).
        labels: per output name, the true answers (``label:<output>``
            arrays), truncated like the inputs.
    """

    role: str
    arrays: Mapping[str, Array]
    batched: Mapping[str, bool]
    count: int
    total: int
    state: Mapping[str, str] = field(default_factory=dict)
    streams: tuple[tuple[int, int], ...] = ()
    labels: Mapping[str, Array] = field(default_factory=dict)

    def feed(self, i: int) -> Feed:
        """The input feed of sample ``i`` (a batch of one where axis 0 is a batch axis).

        ``arr[i]`` of a ``(samples,)`` array for a rank-0 input is a numpy
        scalar, which onnxruntime refuses; ``np.asarray`` makes it the 0-d
        array the input wants.
        """
        return {
            name: (arr[i : i + 1] if self.batched[name] else np.asarray(arr[i]))
            for name, arr in self.arrays.items()
        }

    def feeds(self) -> Iterator[Feed]:
        for i in range(self.count):
            yield self.feed(i)

    def batch_feed(self, start: int, stop: int) -> Feed:
        """Samples ``start..stop-1`` as one batch: only valid when every input is batched.

        Raises:
            ValueError: an input's axis 0 is not a batch axis.
        """
        if not all(self.batched.values()):
            raise ValueError("batch_feed needs every input's axis 0 to be a batch axis")
        return {name: arr[start:stop] for name, arr in self.arrays.items()}


def _load_npz(path: Path, role: str) -> dict[str, Array]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{role} file {path} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"{role} file {path} is a directory") from None
    except OSError as exc:
        raise DataError(f"cannot read {role} file {path}: {exc.strerror or exc}") from None
    except (ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{role} file {path} is not a .npz archive: {exc}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(
            f"{role} file {path} holds a single array; save a .npz with one array per "
            "model input (np.savez(path, input_name=array, ...))"
        )
    try:
        with loaded:
            return {name: loaded[name] for name in loaded.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{role} file {path} is corrupt: {exc}") from None


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _check_dims(
    role: str,
    name: str,
    got: tuple[int, ...],
    spec: TensorSpec,
    hint: str,
    *,
    offset: int = 0,
) -> None:
    """Compare a sample's shape with the input's; ``offset`` skips the batch axis."""
    for axis, (g, w) in enumerate(zip(got, spec.shape[offset:], strict=True), start=offset):
        if w is not None and g != w:
            shown = [1, *got] if offset else list(got)
            raise DataError(
                f"{role} array {name!r}: sample shape {shown} does not fit model input "
                f"shape {_shape_text(spec.shape)} (axis {axis} must be {w}){hint}"
            )


def _one_array(role: str, spec: TensorSpec, value: npt.ArrayLike) -> tuple[Array, bool]:
    """Validate one array against its input; return it and whether axis 0 is the batch axis."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{role} array {spec.name!r} is not a numeric array: {exc}") from None
    if arr.dtype.kind not in "biufc":
        raise DataError(
            f"{role} array {spec.name!r} has non-numeric dtype {arr.dtype}; "
            f"model input expects {spec.dtype}"
        )
    if arr.dtype.name != spec.dtype:
        raise DataError(
            f"{role} array {spec.name!r} has dtype {arr.dtype.name}, model input expects "
            f"{spec.dtype} (convert with .astype(np.{spec.dtype}))"
        )
    rank = len(spec.shape)
    if arr.ndim == 0:
        raise DataError(f"{role} array {spec.name!r} is a scalar; samples go along axis 0")
    if arr.shape[0] == 0:
        raise DataError(f"{role} array {spec.name!r} has no samples")
    if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
        raise DataError(f"{role} array {spec.name!r} contains NaN or infinity")
    if arr.ndim == rank + 1:
        hint = f"; the array is read as (samples, *{_shape_text(spec.shape)})"
        _check_dims(role, spec.name, tuple(arr.shape[1:]), spec, hint)
        return arr, False
    if arr.ndim == rank and rank >= 1:
        lead = spec.shape[0]
        if lead not in (None, 1):
            raise DataError(
                f"{role} array {spec.name!r} has shape {list(arr.shape)}, but model input "
                f"{_shape_text(spec.shape)} has a fixed batch of {lead}: give arrays of "
                f"shape (samples, *{_shape_text(spec.shape)})"
            )
        hint = "; the array is read as (samples, *input_shape[1:]) with axis 0 as the batch axis"
        _check_dims(role, spec.name, tuple(arr.shape[1:]), spec, hint, offset=1)
        return arr, True
    raise DataError(
        f"{role} array {spec.name!r} has {arr.ndim} dimensions {list(arr.shape)}; model input "
        f"has shape {_shape_text(spec.shape)}, so give (samples, *{_shape_text(spec.shape)})"
        + (" or (samples, *shape[1:]) when axis 0 is the batch axis" if rank >= 1 else "")
    )


def load_samples(
    source: DataSource,
    model: SourceModel,
    *,
    role: str,
    max_samples: int | None = None,
    state: Mapping[str, str] | None = None,
) -> SampleSet:
    """Load and validate calibration or validation data for ``model``.

    Args:
        source: a ``.npz`` path or a mapping of input name to array.
        model: the source model whose inputs the data must feed.
        role: ``"calibration"`` or ``"validation"``, for messages.
        max_samples: use at most this many samples (the first ones).
        state: state input to the output fed back into it (see "Streams"
            above); check it with :func:`check_state` first.

    Raises:
        DataError: unreadable file, missing or extra arrays, wrong dtype, a
            shape the input cannot take, differing sample counts, symbolic
            axes that disagree between inputs, or NaN/infinite values.
    """
    raw: Mapping[str, npt.ArrayLike]
    if isinstance(source, Path | str):
        raw = _load_npz(Path(source), role)
    elif isinstance(source, Mapping):
        raw = source
    else:
        raise DataError(f"{role} data must be a .npz path or a mapping of input name to array")
    state = dict(state or {})
    raw, label_raw, stream_raw = _split_reserved(role, raw, model, state)
    specs = {s.name: s for s in model.inputs}
    missing = [n for n in specs if n not in raw and n not in state]
    extra = sorted(n for n in raw if n not in specs)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing array(s) for input(s) {', '.join(map(repr, missing))}")
        if extra:
            parts.append(f"array(s) {', '.join(map(repr, extra))} match no model input")
        raise DataError(
            f"{role} data: {'; '.join(parts)} (model inputs: {', '.join(map(repr, specs))})"
        )
    arrays: dict[str, Array] = {}
    batched: dict[str, bool] = {}
    for name, spec in specs.items():
        if name in raw:
            arrays[name], batched[name] = _one_array(role, spec, raw[name])
    if not arrays:
        raise DataError(
            f"{role} data: give at least one input array besides the state input(s) "
            f"{', '.join(map(repr, state))}"
        )
    counts = {name: int(a.shape[0]) for name, a in arrays.items()}
    counts.update({f"{LABEL_PREFIX}{n}": int(np.shape(a)[0]) for n, a in label_raw.items()})
    if stream_raw is not None:
        counts[STREAM_KEY] = int(stream_raw.shape[0])
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{n}: {c}" for n, c in counts.items())
        raise DataError(f"{role} arrays have different sample counts ({listing})")
    total = next(iter(counts.values()))
    for name, spec in specs.items():
        if name not in arrays:
            # A state input left out starts every stream from zeros.
            arrays[name] = np.zeros(
                (total, *(1 if d is None else d for d in spec.shape)), dtype=np.dtype(spec.dtype)
            )
            batched[name] = False
    arrays = {n: arrays[n] for n in specs}
    _check_symbolic(role, model, arrays, batched)
    count = total if max_samples is None else max(1, min(total, max_samples))
    if state and count < total:
        # Cut at a stream boundary when at least one whole stream fits.
        whole = [stop for _, stop in _stream_ranges(stream_raw, total) if stop <= count]
        count = whole[-1] if whole else count
    labels = {n: np.asarray(a) for n, a in label_raw.items()}
    if count < total:
        arrays = {n: a[:count] for n, a in arrays.items()}
        labels = {n: a[:count] for n, a in labels.items()}
    streams: tuple[tuple[int, int], ...] = ()
    if state:
        ids = None if stream_raw is None else stream_raw[:count]
        streams = _stream_ranges(ids, count)
    return SampleSet(
        role=role,
        arrays=arrays,
        batched=batched,
        count=count,
        total=total,
        state=state,
        streams=streams,
        labels=labels if role != "calibration" else {},
    )


def check_state(model: SourceModel, state: Mapping[str, str] | None) -> dict[str, str]:
    """Validate a state mapping ``{input: output}`` against the model.

    Raises:
        DataError: an unknown input or output name, an output used twice, or a
            state output whose dtype or fixed shape differs from its input's.
    """
    mapping = dict(state or {})
    ins = {s.name: s for s in model.inputs}
    outs = {s.name: s for s in model.outputs}
    used: set[str] = set()
    for i, o in mapping.items():
        if i not in ins:
            raise DataError(
                f"state {i}={o}: {i!r} is not a model input (inputs: {', '.join(map(repr, ins))})"
            )
        if o not in outs:
            raise DataError(
                f"state {i}={o}: {o!r} is not a model output "
                f"(outputs: {', '.join(map(repr, outs))})"
            )
        if o in used:
            raise DataError(f"state output {o!r} is fed back into more than one input")
        used.add(o)
        si, so = ins[i], outs[o]
        if si.dtype != so.dtype:
            raise DataError(
                f"state {i}={o}: input {i!r} is {si.dtype} but output {o!r} is {so.dtype}"
            )
        fixed_clash = len(si.shape) == len(so.shape) and any(
            a is not None and b is not None and a != b
            for a, b in zip(si.shape, so.shape, strict=True)
        )
        if fixed_clash or (si.shape and so.shape and len(si.shape) != len(so.shape)):
            raise DataError(
                f"state {i}={o}: output shape {_shape_text(so.shape)} cannot feed input "
                f"shape {_shape_text(si.shape)}"
            )
    return mapping


def _split_reserved(
    role: str, raw: Mapping[str, npt.ArrayLike], model: SourceModel, state: Mapping[str, str]
) -> tuple[dict[str, npt.ArrayLike], dict[str, Array], Array | None]:
    """Separate ``label:<output>`` and ``stream:id`` arrays from the input arrays."""
    inputs: dict[str, npt.ArrayLike] = {}
    labels: dict[str, Array] = {}
    stream: Array | None = None
    outputs = [o.name for o in model.outputs]
    input_names = {s.name for s in model.inputs}
    for key, value in raw.items():
        if key in input_names:
            inputs[key] = value
        elif key.startswith(LABEL_PREFIX):
            out = key[len(LABEL_PREFIX) :]
            if out not in outputs:
                raise DataError(
                    f"{role} array {key!r}: {out!r} is not a model output "
                    f"(outputs: {', '.join(map(repr, outputs))})"
                )
            arr = np.asarray(value)
            if arr.ndim == 0 or arr.shape[0] == 0 or arr.dtype.kind not in "biuf":
                raise DataError(
                    f"{role} array {key!r} must hold numeric labels with samples along axis 0"
                )
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                raise DataError(f"{role} array {key!r} contains NaN or infinity")
            labels[out] = arr
        elif key == STREAM_KEY:
            if not state:
                raise DataError(
                    f"{role} array {STREAM_KEY!r} marks streams, which only a state mapping "
                    "(--state IN=OUT) uses"
                )
            arr = np.asarray(value)
            if arr.ndim != 1 or arr.dtype.kind not in "biu" or arr.shape[0] == 0:
                raise DataError(
                    f"{role} array {STREAM_KEY!r} must be one integer stream id per sample, "
                    f"shape (samples,); got {arr.dtype} {list(arr.shape)}"
                )
            stream = arr
        else:
            inputs[key] = value
    return inputs, labels, stream


def _stream_ranges(ids: Array | None, count: int) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` per stream: a new stream wherever the id changes."""
    if ids is None:
        return ((0, count),)
    starts = [0, *(int(i) for i in np.flatnonzero(ids[1:] != ids[:-1]) + 1)]
    return tuple(zip(starts, [*starts[1:], count], strict=True))


def _check_symbolic(
    role: str, model: SourceModel, arrays: Mapping[str, Array], batched: Mapping[str, bool]
) -> None:
    seen: dict[str, tuple[str, int]] = {}
    for name, arr in arrays.items():
        params = model.dim_params.get(name, ())
        per_sample = (1, *arr.shape[1:]) if batched[name] else tuple(arr.shape[1:])
        for axis, param in enumerate(params):
            if param is None or axis >= len(per_sample):
                continue
            size = int(per_sample[axis])
            if param in seen and seen[param][1] != size:
                other, other_size = seen[param]
                raise DataError(
                    f"{role} arrays disagree on dynamic axis {param!r}: {other!r} has "
                    f"{other_size}, {name!r} has {size}"
                )
            seen.setdefault(param, (name, size))


def synthetic_feed(model: SourceModel, *, seed: int = 0) -> Feed:
    """A single plausible input for timing when no data was given.

    Dynamic axes get size 1, float inputs standard-normal values and integer
    inputs zeros (a valid index for any embedding table). Only latency is
    measured with it; accuracy is never judged on made-up data.
    """
    rng = np.random.default_rng(seed)
    feed: Feed = {}
    for spec in model.inputs:
        shape = tuple(1 if d is None else d for d in spec.shape)
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feed[spec.name] = np.asarray(rng.standard_normal(shape), dtype=dtype)
        else:
            feed[spec.name] = np.zeros(shape, dtype=dtype)
    return feed
