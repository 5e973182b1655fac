"""Tests for CPU architecture and feature detection."""

from __future__ import annotations

import platform
from pathlib import Path

from edgefleet.protocols.hardware import normalize_arch
from edgefleet.protocols.messages import HardwareInfo
from edgefleet.shared.hardware import (
    CPUINFO,
    RELEVANT_FEATURES,
    CpuInfo,
    detect_hardware,
    parse_cpu_features,
    parse_cpuinfo,
    read_cpuinfo,
)
from edgefleet.shared.runtime import available_runtimes

X86_CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme de pse tsc msr pae mce sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c \
avx2 avx512f avx512dq avx512_vnni avx_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 \
avx512_fp16 sha_ni
bugs\t\t: spectre_v1 spectre_v2

processor\t: 1
vendor_id\t: GenuineIntel
flags\t\t: fpu vme de pse tsc msr pae mce sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c \
avx2 avx512f avx512dq avx512_vnni avx_vnni avx512_bf16 amx_bf16 amx_tile amx_int8 \
avx512_fp16 sha_ni
"""

ARM_CPUINFO = """\
processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid \
asimdrdm lrcpc dcpop asimddp i8mm bf16 sve
CPU implementer\t: 0x41

processor\t: 1
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid \
asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
"""


def test_x86_features_are_the_relevant_subset() -> None:
    assert parse_cpu_features(X86_CPUINFO) == (
        "amx_bf16",
        "amx_int8",
        "amx_tile",
        "avx",
        "avx2",
        "avx512_bf16",
        "avx512_fp16",
        "avx512_vnni",
        "avx512f",
        "avx_vnni",
        "f16c",
        "fma",
        "sse4_2",
    )


def test_arm_features_are_common_to_all_cores() -> None:
    # Core 1 (a LITTLE core) lacks i8mm, bf16 and sve: they cannot be relied on.
    assert parse_cpu_features(ARM_CPUINFO) == ("asimd", "asimddp", "asimdhp")
    single_core = ARM_CPUINFO.split("\n\n", maxsplit=1)[0]
    assert parse_cpu_features(single_core) == ("asimd", "asimddp", "asimdhp", "bf16", "i8mm", "sve")


def test_no_cpuinfo_means_no_features() -> None:
    assert parse_cpu_features("") == ()
    assert parse_cpu_features("processor : 0\nflagsy: avx\n") == ()


def test_parse_cpuinfo_keeps_every_common_flag_and_the_model_name() -> None:
    info = parse_cpuinfo(X86_CPUINFO)
    assert info.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"sse4_1", "sha_ni", "avx512_vnni", "fpu"} <= info.flags
    assert parse_cpu_features(X86_CPUINFO) == tuple(
        sorted(f for f in info.flags if f in RELEVANT_FEATURES or f.startswith("amx"))
    )
    assert parse_cpuinfo(ARM_CPUINFO).model is None
    assert parse_cpuinfo("") == CpuInfo(model=None, flags=frozenset())


def test_read_cpuinfo_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    assert read_cpuinfo(tmp_path / "nope") == CpuInfo(model=None, flags=frozenset())


def test_detect_hardware_from_given_text() -> None:
    info = detect_hardware("rpi5-8gb", ARM_CPUINFO, machine="aarch64")
    assert info == HardwareInfo(
        arch="arm64",
        cpu_features=("asimd", "asimddp", "asimdhp"),
        runtimes=available_runtimes(),
        hardware_class="rpi5-8gb",
    )
    assert "onnxruntime" in info.runtimes
    assert HardwareInfo.from_dict(info.to_dict()) == info


def test_detect_hardware_on_this_machine() -> None:
    info = detect_hardware()
    assert info.arch == normalize_arch(platform.machine())
    assert info.hardware_class == "generic"
    assert info.runtimes == available_runtimes()
    assert all(f in RELEVANT_FEATURES or f.startswith("amx") for f in info.cpu_features)
    if CPUINFO.exists():
        assert info.cpu_features == parse_cpu_features(CPUINFO.read_text())
