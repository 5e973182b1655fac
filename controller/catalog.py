"""Registering a model: registry row, bundles, TUF targets - in that order.

The release counter is allocated by the registry first, because it is baked
into each bundle's manifest and signed into its TUF target; then each bundle
is built, added to the TUF repository (signed), and recorded in the registry.

:func:`register_compiled` first compiles the source for every requested
profile (nothing is registered if a profile has no variant that passes the
accuracy gate), then publishes one bundle per profile - the chosen variant,
with the profile's CPU requirements signed into its TUF target and the
compile report stored with it - plus the fp32 source as the ``generic``
fallback for devices no profile fits.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edgefleet.controller.bundle import (
    build_bundle,
    compress_bundle,
    default_sample,
    inspect_onnx,
    inspect_tflite_io,
)
from edgefleet.controller.compiler import BUILTIN_PROFILES, CompileReport, Profile, compile_model
from edgefleet.controller.compiler.data import DataSource
from edgefleet.controller.errors import InvalidNameError, RegistryError
from edgefleet.controller.registry import BundleInfo, ModelVersionInfo, Registry
from edgefleet.controller.trust import TrustRepository
from edgefleet.protocols.bundle import TargetCustom, TensorSpec
from edgefleet.shared.runtime import is_tflite

__all__ = [
    "NAME_PATTERN",
    "CompiledModel",
    "RegisteredModel",
    "bundle_target_path",
    "register_compiled",
    "register_model",
]

# How close a device's smoke inference must come to the controller's. fp32 is
# nearly bit-exact across CPUs; reduced precision kernels differ between
# instruction sets (VNNI vs AVX2 int8 paths), so their gate is looser - the
# smoke test exists to catch a broken build, not to re-run the accuracy gate.
SMOKE_TOLERANCE = {"fp32": (1e-4, 1e-3), "fp16": (2e-2, 5e-2), "int8": (5e-2, 1e-1)}

# Names and versions become TUF target paths and table cells.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class RegisteredModel:
    version: ModelVersionInfo
    bundles: tuple[BundleInfo, ...]


@dataclass(frozen=True)
class CompiledModel:
    version: ModelVersionInfo
    bundles: tuple[BundleInfo, ...]
    reports: dict[str, CompileReport]


def _check_names(name: str, version: str, hardware_classes: Sequence[str]) -> None:
    for label, value in (
        ("model name", name),
        ("version", version),
        *(("hardware class", h) for h in hardware_classes),
    ):
        if not NAME_PATTERN.match(value):
            raise InvalidNameError(
                f"invalid {label} {value!r}: use letters, digits, '.', '_' or '-' (max 64)"
            )


def _publish(
    registry: Registry,
    repository: TrustRepository,
    info: ModelVersionInfo,
    model: bytes,
    *,
    hardware_class: str,
    precision: str,
    sample: Mapping[str, np.ndarray],
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    profile: Profile | None = None,
    report: dict[str, object] | None = None,
) -> BundleInfo:
    runtime = runtime_of(model)
    atol, rtol = SMOKE_TOLERANCE.get(precision, SMOKE_TOLERANCE["int8"])
    data, _manifest = build_bundle(
        model,
        name=info.name,
        version=info.version,
        release=info.release,
        hardware_class=hardware_class,
        precision=precision,
        sample_inputs=sample,
        smoke_atol=atol,
        smoke_rtol=rtol,
        runtime=runtime,
    )
    # xz for the wire when it saves enough; the decompressed size is signed.
    data, compression = compress_bundle(data)
    custom = TargetCustom(
        model=info.name,
        version=info.version,
        release=info.release,
        runtime=runtime,
        precision=precision,
        hardware_class=hardware_class,
        inputs=inputs,
        outputs=outputs,
        requires_arch=None if profile is None else profile.arch,
        requires_features=() if profile is None else tuple(sorted(profile.cpu_features)),
        compression=compression,
    )
    published = repository.add_target(
        bundle_target_path(info.name, info.version, hardware_class, precision), data, custom
    )
    return registry.add_bundle(
        info.id,
        hardware_class=hardware_class,
        runtime=runtime,
        precision=precision,
        target_path=published.path,
        sha256=published.sha256,
        length=published.length,
        report=report,
    )


def _register_version(
    registry: Registry,
    model: bytes,
    *,
    name: str,
    version: str,
    sample: Mapping[str, np.ndarray],
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    description: str,
) -> ModelVersionInfo:
    """Allocate the release, after a trial build proves the model runs on the sample.

    Building first means a model that cannot run never leaves a version behind.
    """
    build_bundle(
        model,
        name=name,
        version=version,
        release=1,
        hardware_class="generic",
        precision="fp32",
        sample_inputs=sample,
        runtime=runtime_of(model),
    )
    return registry.register_model_version(
        name,
        version,
        source_sha256=hashlib.sha256(model).hexdigest(),
        inputs=inputs,
        outputs=outputs,
        description=description,
    )


def register_compiled(
    registry: Registry,
    repository: TrustRepository,
    source: bytes,
    *,
    name: str,
    version: str,
    profiles: Sequence[Profile],
    calibration: DataSource | None = None,
    validation: DataSource | None = None,
    tolerance: float = 0.01,
    metrics: Mapping[str, str] | None = None,
    state: Mapping[str, str] | None = None,
    max_accuracy_drop: float | None = None,
    sample_inputs: Mapping[str, np.ndarray] | None = None,
    description: str = "",
    latency_iterations: int = 50,
) -> CompiledModel:
    """Compile ``source`` for each profile and register the chosen variants.

    ``metrics``, ``state`` and ``max_accuracy_drop`` judge accuracy as
    :func:`~edgefleet.controller.compiler.compile_model` does, for every
    profile; a profile's objective is its own (pass a replaced profile to
    override it).

    Raises:
        CompileError: the source or the data is unusable, or a profile has no
            variant within ``tolerance`` (nothing is registered then).
        ModelError, DuplicateError, InvalidNameError: as :func:`register_model`.
    """
    _check_names(name, version, [p.name for p in profiles])
    inputs, outputs = inspect_model(source)
    results = {
        p.name: compile_model(
            source,
            p,
            calibration=calibration,
            validation=validation,
            tolerance=tolerance,
            metrics=metrics,
            state=state,
            max_accuracy_drop=max_accuracy_drop,
            latency_iterations=latency_iterations,
        )
        for p in profiles
    }
    sample = dict(sample_inputs) if sample_inputs is not None else default_sample(inputs)
    info = _register_version(
        registry,
        source,
        name=name,
        version=version,
        sample=sample,
        inputs=inputs,
        outputs=outputs,
        description=description,
    )
    bundles = [
        _publish(
            registry,
            repository,
            info,
            source,
            hardware_class="generic",
            precision="fp32",
            sample=sample,
            inputs=inputs,
            outputs=outputs,
        )
    ]
    for profile in profiles:
        result = results[profile.name]
        best = result.best
        bundles.append(
            _publish(
                registry,
                repository,
                info,
                best.model,
                hardware_class=profile.name,
                precision=best.precision,
                sample=sample,
                inputs=inputs,
                outputs=outputs,
                profile=profile,
                report=result.report.to_dict(),
            )
        )
    return CompiledModel(info, tuple(bundles), {k: r.report for k, r in results.items()})


def runtime_of(model: bytes) -> str:
    """``tflite`` for a TFLite flatbuffer, else ``onnxruntime``."""
    return "tflite" if is_tflite(model) else "onnxruntime"


def inspect_model(model: bytes) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Input and output specs of an ONNX or TFLite model."""
    return inspect_tflite_io(model) if is_tflite(model) else inspect_onnx(model)


def bundle_target_path(name: str, version: str, hardware_class: str, precision: str) -> str:
    return f"{name}/{version}/{hardware_class}-{precision}.bundle"


def register_model(
    registry: Registry,
    repository: TrustRepository,
    model: bytes,
    *,
    name: str,
    version: str,
    hardware_classes: Sequence[str] = ("generic",),
    precision: str = "fp32",
    sample_inputs: Mapping[str, np.ndarray] | None = None,
    description: str = "",
) -> RegisteredModel:
    """Register ``model`` as ``name@version`` and publish one signed bundle per hardware class.

    Raises:
        ModelError: the model is not valid ONNX or cannot run on the sample.
        DuplicateError: ``name@version`` is registered already.
        InvalidNameError: a name, version or hardware class has unsafe characters.
        RegistryError: no hardware class is given.
    """
    _check_names(name, version, hardware_classes)
    if not hardware_classes:
        raise RegistryError("at least one hardware class is needed")
    inputs, outputs = inspect_model(model)
    sample = dict(sample_inputs) if sample_inputs is not None else default_sample(inputs)
    info = _register_version(
        registry,
        model,
        name=name,
        version=version,
        sample=sample,
        inputs=inputs,
        outputs=outputs,
        description=description,
    )
    bundles = [
        _publish(
            registry,
            repository,
            info,
            model,
            hardware_class=hardware_class,
            precision=precision,
            sample=sample,
            inputs=inputs,
            outputs=outputs,
            profile=BUILTIN_PROFILES.get(hardware_class),
        )
        for hardware_class in hardware_classes
    ]
    return RegisteredModel(info, tuple(bundles))
