from __future__ import annotations

import json
from typing import Any

import pytest

from edgefleet.protocols.bundle import BundleManifest, TargetCustom, TensorSpec
from edgefleet.protocols.errors import MessageError

SPEC_IN = (TensorSpec("x", "float32", (None, 16)),)
SPEC_OUT = (TensorSpec("y", "float32", (None, 4)),)
MANIFEST = BundleManifest(
    "m",
    "1.0",
    2,
    "onnxruntime",
    "int8",
    "x86-vnni",
    "model.onnx",
    "a" * 64,
    SPEC_IN,
    SPEC_OUT,
    1e-3,
    1e-2,
    5.0,
)


def test_manifest_round_trip() -> None:
    assert BundleManifest.decode(MANIFEST.encode()) == MANIFEST


def test_target_custom_round_trip() -> None:
    custom = TargetCustom("m", "1.0", 2, "onnxruntime", "fp32", "generic", SPEC_IN, SPEC_OUT)
    assert TargetCustom.from_dict(json.loads(json.dumps(custom.to_dict()))) == custom


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"format": 99}, "unsupported bundle format"),
        ({"runtime": "pytorch"}, "runtime"),
        ({"model_file": "../../evil"}, "model_file"),
        ({"model_sha256": "XYZ"}, "model_sha256"),
        ({"precision": "int3"}, "precision"),
        ({"inputs": []}, "inputs"),
        ({"inputs": [{"name": "x", "dtype": "float32", "shape": [-1]}]}, "shape"),
    ],
)
def test_manifest_refuses_bad_fields(changes: dict[str, Any], fragment: str) -> None:
    body = json.loads(MANIFEST.encode()) | changes
    with pytest.raises(MessageError, match=fragment):
        BundleManifest.decode(json.dumps(body).encode())


def test_target_custom_requires_io() -> None:
    with pytest.raises(MessageError, match="io"):
        TargetCustom.from_dict(
            {
                "model": "m",
                "version": "1",
                "release": 1,
                "runtime": "onnxruntime",
                "precision": "fp32",
                "hardware_class": "generic",
            }
        )
    with pytest.raises(MessageError, match="custom"):
        TargetCustom.from_dict(None)


def test_target_custom_requirements_round_trip_and_check() -> None:
    custom = TargetCustom(
        "m",
        "1.0",
        2,
        "onnxruntime",
        "int8",
        "x86-vnni",
        SPEC_IN,
        SPEC_OUT,
        requires_arch="x86_64",
        requires_features=("avx2", "vnni"),
    )
    again = TargetCustom.from_dict(json.loads(json.dumps(custom.to_dict())))
    assert again == custom
    assert again.runs_on("x86_64", ("avx2", "avx512_vnni")) is True
    assert again.runs_on("x86_64", ("avx2",)) is False
    assert again.runs_on("aarch64", ("asimddp",)) is False
    plain = TargetCustom("m", "1.0", 2, "onnxruntime", "fp32", "generic", SPEC_IN, SPEC_OUT)
    assert "requires" not in plain.to_dict()
    assert plain.runs_on("x86_64", ()) is None


def test_target_custom_refuses_malformed_requirements() -> None:
    body = TargetCustom(
        "m", "1.0", 2, "onnxruntime", "fp32", "generic", SPEC_IN, SPEC_OUT
    ).to_dict()
    with pytest.raises(MessageError, match="requires"):
        TargetCustom.from_dict(body | {"requires": ["x86_64"]})
    with pytest.raises(MessageError, match="cpu_features"):
        TargetCustom.from_dict(body | {"requires": {"arch": "x86_64", "cpu_features": [1]}})
