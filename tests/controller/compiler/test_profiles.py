"""Profiles: built-ins, TOML loading and its errors, matching devices to profiles."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.controller.compiler import (
    BUILTIN_PROFILES,
    Profile,
    ProfileError,
    get_profile,
    load_profiles,
    match_profile,
)
from edgefleet.protocols.errors import ConfigError
from edgefleet.protocols.messages import HardwareInfo


def test_builtin_profiles_cover_the_common_gateway_classes() -> None:
    assert {"x86-vnni", "x86-avx2", "arm64-dotprod", "arm64-basic", "generic"} <= set(
        BUILTIN_PROFILES
    )
    assert BUILTIN_PROFILES["x86-vnni"].int8_dot
    assert BUILTIN_PROFILES["arm64-dotprod"].int8_dot
    assert not BUILTIN_PROFILES["x86-avx2"].int8_dot
    assert not BUILTIN_PROFILES["arm64-basic"].int8_dot
    assert BUILTIN_PROFILES["generic"].precisions == ("fp32",)


def test_profile_round_trips_through_dict() -> None:
    p = BUILTIN_PROFILES["arm64-dotprod"]
    assert Profile.from_dict(p.to_dict()) == p


@pytest.mark.parametrize(
    ("arch", "features", "expected"),
    [
        ("x86_64", ("avx2", "avx512_vnni", "avx512f"), "x86-vnni"),
        ("x86_64", ("avx2", "avx_vnni"), "x86-vnni"),  # Alder Lake spelling
        ("x86_64", ("avx2", "fma"), "x86-avx2"),
        ("amd64", ("avx", "sse4_2"), "generic"),  # no AVX2: nothing assumed
        ("aarch64", ("asimd", "asimddp"), "arm64-dotprod"),
        ("arm64", (), "arm64-basic"),  # every arm64 has NEON
        ("riscv64", ("v",), "generic"),
    ],
)
def test_match_profile_picks_the_most_specific_usable_profile(
    arch: str, features: tuple[str, ...], expected: str
) -> None:
    hw = HardwareInfo(arch=arch, cpu_features=features, runtimes=("onnxruntime",))
    assert match_profile(hw).name == expected


def test_match_profile_honours_a_pinned_hardware_class_only_when_usable() -> None:
    vnni = ("avx2", "avx512_vnni")
    pinned = HardwareInfo("x86_64", vnni, ("onnxruntime",), hardware_class="x86-avx2")
    assert match_profile(pinned).name == "x86-avx2"
    impossible = HardwareInfo("x86_64", ("avx2",), ("onnxruntime",), hardware_class="x86-vnni")
    assert match_profile(impossible).name == "x86-avx2"
    default = HardwareInfo("x86_64", vnni, ("onnxruntime",), hardware_class="generic")
    assert match_profile(default).name == "x86-vnni"


def test_match_profile_refuses_a_device_without_a_usable_runtime() -> None:
    hw = HardwareInfo("x86_64", ("avx2",), runtimes=("tflite",))
    with pytest.raises(ProfileError, match="no profile fits"):
        match_profile(hw)


def test_load_profiles_adds_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text(
        """
[profiles.shelf-cam]
arch = "aarch64"
cpu_features = ["asimd", "asimddp"]
precisions = ["fp32", "int8"]
max_bundle_bytes = 5_000_000
objective = "size"

[profiles.arm64-basic]
arch = "arm64"
cpu_features = ["asimd"]
precisions = ["fp32"]
"""
    )
    profiles = load_profiles(f)
    cam = profiles["shelf-cam"]
    assert cam.arch == "arm64"
    assert cam.objective == "size"
    assert cam.int8_dot
    assert cam.max_bundle_bytes == 5_000_000
    assert profiles["arm64-basic"].precisions == ("fp32",)
    assert "x86-vnni" in profiles
    hw = HardwareInfo("aarch64", ("asimd", "asimddp", "i8mm"), ("onnxruntime",))
    assert match_profile(hw, profiles).name in ("arm64-dotprod", "shelf-cam")
    assert get_profile("shelf-cam", profiles) is cam
    assert set(load_profiles(f, include_builtin=False)) == {"shelf-cam", "arm64-basic"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[profiles.a\narch = 'x86_64'", "not valid TOML"),
        ("[other]\nx = 1", "no \\[profiles"),
        ("[profiles.a]\narch = 'x86_64'\ncolour = 'red'", "unknown field"),
        ("[profiles.a]\narch = 'mips'", "arch must be one of"),
        ("[profiles.a]\ncpu_features = []", "missing field 'arch'"),
        ("[profiles.a]\narch = 'x86_64'\nprecisions = ['int2']", "not supported"),
        ("[profiles.a]\narch = 'x86_64'\nprecisions = 'fp32'", "list of strings"),
        ("[profiles.a]\narch = 'x86_64'\nobjective = 'cost'", "objective must be"),
        ("[profiles.a]\narch = 'x86_64'\nmax_bundle_bytes = -3", "positive integer"),
        ("[profiles.a]\narch = 'x86_64'\nruntime = 'tvm'", "runtime must be"),
        ("[profiles.'Bad Name']\narch = 'x86_64'", "name must be"),
        ("profiles = 3", "no \\[profiles"),
    ],
)
def test_load_profiles_reports_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "p.toml"
    f.write_text(text)
    with pytest.raises(ProfileError, match=message) as info:
        load_profiles(f)
    assert str(f) in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_load_profiles_missing_file_and_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read"):
        load_profiles(tmp_path / "nope.toml")
    with pytest.raises(ProfileError, match=r"known profiles: .*x86-vnni"):
        get_profile("x86-sse")
