"""What a bundle is: its archive layout, manifest and TUF ``custom`` metadata.

A bundle is a POSIX tar archive (tar is in every Python) holding exactly
these members::

    manifest.json    BundleManifest, UTF-8 JSON
    model.onnx       or model.tflite: the model file the runtime loads
    sample.npz       smoke test: arrays "in.<input name>" and "out.<output name>"

On the wire a bundle may be compressed as a whole (xz/lzma, when that saves
enough: int8 weights and scales compress, fp32 weights barely). The signed
``custom`` field then carries a :class:`BundleCompression`: the codec and the
exact decompressed length, so the agent decompresses with a hard bound and
refuses a bundle that decompresses beyond (or short of) what was signed. A
target without it is the plain tar, as every bundle before compression was.

The controller publishes every bundle as a TUF target whose ``custom`` field
is a :class:`TargetCustom`. The agent checks the custom fields *before*
downloading (hardware class, runtime, release counter) and the manifest after
verifying the bytes, and both must agree.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgefleet.protocols import _fields as f
from edgefleet.protocols.errors import MessageError
from edgefleet.protocols.hardware import satisfies

__all__ = [
    "BUNDLE_FORMAT",
    "COMPRESSIONS",
    "MANIFEST_NAME",
    "MAX_DECOMPRESSED_BYTES",
    "MODEL_NAMES",
    "PRECISIONS",
    "RUNTIMES",
    "SAMPLE_INPUT_PREFIX",
    "SAMPLE_NAME",
    "SAMPLE_OUTPUT_PREFIX",
    "BundleCompression",
    "BundleManifest",
    "TargetCustom",
    "TensorSpec",
]

BUNDLE_FORMAT = 1
MANIFEST_NAME = "manifest.json"
SAMPLE_NAME = "sample.npz"
SAMPLE_INPUT_PREFIX = "in."
SAMPLE_OUTPUT_PREFIX = "out."
RUNTIMES = ("onnxruntime", "tflite")
PRECISIONS = ("fp32", "fp16", "int8", "int4")
MODEL_NAMES = {"onnxruntime": "model.onnx", "tflite": "model.tflite"}
# Whole-bundle codecs an agent can decompress: "lzma" is the xz container
# (Python's stdlib lzma, so no extra dependency on a gateway).
COMPRESSIONS = ("lzma",)
# No signed decompressed length may exceed this (the three members' caps).
MAX_DECOMPRESSED_BYTES = 3 * 1024**3


@dataclass(frozen=True)
class BundleCompression:
    """How a bundle's bytes were compressed, signed in the TUF target's ``custom``.

    Attributes:
        codec: one of :data:`COMPRESSIONS`.
        decompressed_length: exact size in bytes of the tar inside; the agent
            stops decompressing past it and refuses the bundle.
    """

    codec: str
    decompressed_length: int

    def to_dict(self) -> dict[str, Any]:
        return {"codec": self.codec, "decompressed_length": self.decompressed_length}

    @classmethod
    def from_dict(cls, d: Any) -> BundleCompression:
        if not isinstance(d, Mapping):
            raise MessageError("target custom field 'compression' must be an object")
        codec = _choice(d, "codec", COMPRESSIONS)
        length = f.integer(d, "decompressed_length", minimum=1)
        if length > MAX_DECOMPRESSED_BYTES:
            raise MessageError(
                f"decompressed_length {length} is more than {MAX_DECOMPRESSED_BYTES} bytes"
            )
        return cls(codec, length)


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type (numpy dtype name) and shape; ``None`` is a dynamic axis."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        if not isinstance(d, Mapping):
            raise MessageError("tensor spec must be an object")
        shape = d.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) > 16
            or not all(
                s is None or (isinstance(s, int) and not isinstance(s, bool) and s >= 0)
                for s in shape
            )
        ):
            raise MessageError("tensor shape must be a list of non-negative ints or nulls")
        return cls(
            name=f.text(d, "name", max_len=256),
            dtype=f.text(d, "dtype", max_len=32),
            shape=tuple(shape),
        )


def _specs(d: Mapping[str, Any], key: str) -> tuple[TensorSpec, ...]:
    raw = d.get(key)
    if not isinstance(raw, list) or not raw or len(raw) > 64:
        raise MessageError(f"field {key!r} must be a non-empty list of tensor specs")
    return tuple(TensorSpec.from_dict(x) for x in raw)


def _default(value: float | None, default: float) -> float:
    return default if value is None else value


def _choice(d: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> str:
    value: str = f.text(d, key, max_len=32)
    if value not in allowed:
        raise MessageError(f"field {key!r} must be one of {', '.join(allowed)}; got {value!r}")
    return value


@dataclass(frozen=True)
class TargetCustom:
    """The ``custom`` field of a bundle's TUF target: signed facts about it."""

    model: str
    version: str
    release: int
    runtime: str
    precision: str
    hardware_class: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    requires_arch: str | None = None
    requires_features: tuple[str, ...] = ()
    compression: BundleCompression | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def runs_on(self, arch: str, features: tuple[str, ...] | list[str]) -> bool | None:
        """Whether a CPU meets the signed requirements; None when there are none."""
        if self.requires_arch is None:
            return None
        return satisfies(self.requires_arch, self.requires_features, arch, features)

    def to_dict(self) -> dict[str, Any]:
        requires = (
            {}
            if self.requires_arch is None
            else {
                "requires": {
                    "arch": self.requires_arch,
                    "cpu_features": sorted(self.requires_features),
                }
            }
        )
        compression = (
            {} if self.compression is None else {"compression": self.compression.to_dict()}
        )
        return {
            **self.extra,
            **requires,
            **compression,
            "model": self.model,
            "version": self.version,
            "release": self.release,
            "runtime": self.runtime,
            "precision": self.precision,
            "hardware_class": self.hardware_class,
            "io": {
                "inputs": [s.to_dict() for s in self.inputs],
                "outputs": [s.to_dict() for s in self.outputs],
            },
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> TargetCustom:
        if not isinstance(d, Mapping):
            raise MessageError("target has no edgefleet custom metadata")
        io = d.get("io")
        if not isinstance(io, Mapping):
            raise MessageError("target custom field 'io' must be an object")
        requires = d.get("requires")
        if requires is not None and not isinstance(requires, Mapping):
            raise MessageError("target custom field 'requires' must be an object")
        return cls(
            model=f.text(d, "model", max_len=128),
            version=f.text(d, "version", max_len=64),
            release=f.integer(d, "release", minimum=1),
            runtime=_choice(d, "runtime", RUNTIMES),
            precision=_choice(d, "precision", PRECISIONS),
            hardware_class=f.text(d, "hardware_class", max_len=64),
            inputs=_specs(io, "inputs"),
            outputs=_specs(io, "outputs"),
            requires_arch=None if requires is None else f.text(requires, "arch", max_len=32),
            requires_features=()
            if requires is None
            else tuple(f.text_list(requires, "cpu_features", max_items=64)),
            compression=None
            if d.get("compression") is None
            else BundleCompression.from_dict(d["compression"]),
            extra=f.extra(
                d,
                {
                    "model",
                    "version",
                    "release",
                    "runtime",
                    "precision",
                    "hardware_class",
                    "io",
                    "requires",
                    "compression",
                },
            ),
        )


@dataclass(frozen=True)
class BundleManifest:
    """``manifest.json`` inside a bundle.

    ``model_sha256`` pins the model file inside the (TUF-verified) archive, and
    ``smoke_atol``/``smoke_rtol`` say how close the agent's smoke inference on
    ``sample.npz`` must come to the expected outputs recorded at build time.
    """

    model: str
    version: str
    release: int
    runtime: str
    precision: str
    hardware_class: str
    model_file: str
    model_sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    smoke_atol: float = 1e-4
    smoke_rtol: float = 1e-3
    created_at: float = 0.0
    format: int = BUNDLE_FORMAT
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.extra,
            "format": self.format,
            "model": self.model,
            "version": self.version,
            "release": self.release,
            "runtime": self.runtime,
            "precision": self.precision,
            "hardware_class": self.hardware_class,
            "model_file": self.model_file,
            "model_sha256": self.model_sha256,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "smoke": {"atol": self.smoke_atol, "rtol": self.smoke_rtol},
            "created_at": self.created_at,
        }

    def encode(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> BundleManifest:
        """Parse ``manifest.json``.

        Raises:
            MessageError: not JSON, or a field is missing or invalid.
        """
        try:
            d = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise MessageError(f"bundle manifest is not valid JSON: {exc}") from None
        if not isinstance(d, dict):
            raise MessageError("bundle manifest must be a JSON object")
        fmt = f.integer(d, "format", minimum=1)
        if fmt != BUNDLE_FORMAT:
            raise MessageError(f"unsupported bundle format {fmt}")
        runtime = _choice(d, "runtime", RUNTIMES)
        model_file = f.text(d, "model_file", max_len=64)
        if model_file != MODEL_NAMES[runtime]:
            raise MessageError(f"model_file must be {MODEL_NAMES[runtime]!r} for {runtime}")
        smoke = d.get("smoke") or {}
        if not isinstance(smoke, dict):
            raise MessageError("field 'smoke' must be an object")
        sha = f.text(d, "model_sha256", max_len=64)
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise MessageError("model_sha256 must be 64 lowercase hex characters")
        return cls(
            model=f.text(d, "model", max_len=128),
            version=f.text(d, "version", max_len=64),
            release=f.integer(d, "release", minimum=1),
            runtime=runtime,
            precision=_choice(d, "precision", PRECISIONS),
            hardware_class=f.text(d, "hardware_class", max_len=64),
            model_file=model_file,
            model_sha256=sha,
            inputs=_specs(d, "inputs"),
            outputs=_specs(d, "outputs"),
            smoke_atol=_default(f.number(smoke, "atol", optional=True), 1e-4),
            smoke_rtol=_default(f.number(smoke, "rtol", optional=True), 1e-3),
            created_at=f.number(d, "created_at", optional=True) or 0.0,
            format=fmt,
            extra=f.extra(
                d,
                {
                    "format",
                    "model",
                    "version",
                    "release",
                    "runtime",
                    "precision",
                    "hardware_class",
                    "model_file",
                    "model_sha256",
                    "inputs",
                    "outputs",
                    "smoke",
                    "created_at",
                },
            ),
        )
