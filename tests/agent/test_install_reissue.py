"""The manifest check accepts a re-issue only when the signed metadata says so."""

from __future__ import annotations

from dataclasses import replace

import pytest

from edgefleet.agent.install import Installer
from edgefleet.protocols.bundle import BundleManifest, TargetCustom, TensorSpec
from edgefleet.protocols.errors import BundleFormatError

SPEC = (TensorSpec("x", "float32", (None, 4)),)
MANIFEST = BundleManifest(
    "m", "1.0", 3, "onnxruntime", "fp32", "generic", "model.onnx", "a" * 64, SPEC, SPEC
)
CUSTOM = TargetCustom("m", "1.0", 3, "onnxruntime", "fp32", "generic", SPEC, SPEC)


def test_matching_manifest_passes() -> None:
    Installer._check_manifest(MANIFEST, CUSTOM)


def test_reissue_with_signed_reissue_of_passes() -> None:
    Installer._check_manifest(MANIFEST, replace(CUSTOM, release=9, extra={"reissue_of": 3}))


@pytest.mark.parametrize(
    "custom",
    [
        replace(CUSTOM, release=9),  # a newer release without saying it is a re-issue
        replace(CUSTOM, release=9, extra={"reissue_of": 2}),  # of another release
        replace(CUSTOM, release=9, extra={"reissue_of": "3"}),  # not an integer
        replace(CUSTOM, release=9, extra={"reissue_of": True}),
        replace(CUSTOM, release=2, extra={"reissue_of": 3}),  # "re-issue" to an older release
        replace(CUSTOM, release=9, version="2.0", extra={"reissue_of": 3}),  # other version
    ],
)
def test_anything_else_disagreeing_is_refused(custom: TargetCustom) -> None:
    with pytest.raises(BundleFormatError, match="disagrees with its signed metadata"):
        Installer._check_manifest(MANIFEST, custom)
