from __future__ import annotations

import pytest

from edgefleet.protocols.hardware import normalize_arch, normalize_features, satisfies


def test_arch_spellings() -> None:
    assert normalize_arch("aarch64") == "arm64"
    assert normalize_arch("AMD64") == "x86_64"
    assert normalize_arch("riscv64") == "riscv64"


@pytest.mark.parametrize(
    ("machine", "arch"),
    [
        ("x86_64", "x86_64"),
        ("AMD64", "x86_64"),
        ("aarch64", "arm64"),
        ("arm64", "arm64"),
        ("i686", "x86"),
        ("armv7l", "armv7l"),
        ("", "unknown"),
    ],
)
def test_normalize_arch(machine: str, arch: str) -> None:
    assert normalize_arch(machine) == arch


def test_feature_aliases_and_baseline() -> None:
    features = normalize_features(["avx512_vnni", "AVX2"], "x86_64")
    assert {"vnni", "avx512_vnni", "avx2", "sse2"} <= features
    assert "dotprod" in normalize_features(["asimddp"])


def test_satisfies() -> None:
    x86 = ["avx2", "avx_vnni", "fma"]
    assert satisfies("x86_64", ["avx2", "vnni"], "x86_64", x86)
    assert satisfies("any", [], "aarch64", [])
    assert not satisfies("arm64", ["dotprod"], "x86_64", x86)
    assert not satisfies("x86_64", ["avx512f"], "x86_64", x86)
    assert satisfies("arm64", ["neon"], "aarch64", [])  # baseline of the architecture
