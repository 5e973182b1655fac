"""Registering a model: registry row, bundles, TUF targets - in that order.

The release counter is allocated by the registry first, because it is baked
into each bundle's manifest and signed into its TUF target; then each bundle
is built, added to the TUF repository (signed), and recorded in the registry.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edgefleet.controller.bundle import build_bundle, default_sample, inspect_onnx
from edgefleet.controller.registry import BundleInfo, ModelVersionInfo, Registry
from edgefleet.controller.trust import TrustRepository
from edgefleet.protocols.bundle import TargetCustom

__all__ = ["NAME_PATTERN", "RegisteredModel", "bundle_target_path", "register_model"]

# Names and versions become TUF target paths and table cells.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class RegisteredModel:
    version: ModelVersionInfo
    bundles: tuple[BundleInfo, ...]


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
        ValueError: a name, version or hardware class has unsafe characters.
    """
    for label, value in (("model name", name), ("version", version),
                         *(("hardware class", h) for h in hardware_classes)):
        if not NAME_PATTERN.match(value):
            raise ValueError(
                f"invalid {label} {value!r}: use letters, digits, '.', '_' or '-' (max 64)"
            )
    if not hardware_classes:
        raise ValueError("at least one hardware class is needed")
    inputs, outputs = inspect_onnx(model)
    sample = dict(sample_inputs) if sample_inputs is not None else default_sample(inputs)
    # Build the first bundle before touching the registry, so a model that
    # cannot run never leaves a version behind.
    build_bundle(model, name=name, version=version, release=1,
                 hardware_class=hardware_classes[0], precision=precision, sample_inputs=sample)
    info = registry.register_model_version(
        name, version, source_sha256=hashlib.sha256(model).hexdigest(),
        inputs=inputs, outputs=outputs, description=description,
    )
    bundles: list[BundleInfo] = []
    for hardware_class in hardware_classes:
        data, _manifest = build_bundle(
            model, name=name, version=version, release=info.release,
            hardware_class=hardware_class, precision=precision, sample_inputs=sample,
        )
        custom = TargetCustom(
            model=name, version=version, release=info.release, runtime="onnxruntime",
            precision=precision, hardware_class=hardware_class, inputs=inputs, outputs=outputs,
        )
        published = repository.add_target(
            bundle_target_path(name, version, hardware_class, precision), data, custom
        )
        bundles.append(registry.add_bundle(
            info.id, hardware_class=hardware_class, runtime="onnxruntime", precision=precision,
            target_path=published.path, sha256=published.sha256, length=published.length,
        ))
    return RegisteredModel(info, tuple(bundles))

