"""Tests for CPU architecture and feature detection."""

from __future__ import annotations

import platform
import struct
import sys
from pathlib import Path

import pytest

from edgefleet.protocols.hardware import normalize_arch
from edgefleet.protocols.messages import HardwareInfo
from edgefleet.shared.hardware import (
    CPUINFO,
    RELEVANT_FEATURES,
    CpuInfo,
    decode_hwcap,
    detect_hardware,
    parse_cpu_features,
    parse_cpuinfo,
    read_cpuinfo,
    read_hwcap,
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


# AT_HWCAP / AT_HWCAP2 as qemu-aarch64 7.2 reports them per -cpu (LD_SHOW_AUXV=1,
# issue 12 research): what the emulated-ARM run must detect.
QEMU_AARCH64 = {
    "cortex-a72": (0x8FB, 0x0, ("asimd",)),  # ~ Raspberry Pi 4
    "cortex-a76": (0x119FFB, 0x0, ("asimd", "asimddp", "asimdhp")),  # ~ Raspberry Pi 5
    "max": (
        0xECFFFFFB,
        0x7F877FFF,
        ("asimd", "asimddp", "asimdhp", "bf16", "i8mm", "sve", "sve2"),
    ),
}


@pytest.mark.parametrize("cpu", sorted(QEMU_AARCH64))
def test_arm64_hwcap_bits_decode_to_the_cpu_profile(cpu: str) -> None:
    hwcap, hwcap2, relevant = QEMU_AARCH64[cpu]
    names = decode_hwcap("arm64", hwcap, hwcap2)
    assert tuple(sorted(names & RELEVANT_FEATURES)) == relevant
    assert {"fp", "asimd", "aes", "crc32"} <= names


def test_arm64_hwcap_bits_match_the_kernel_names_in_cpuinfo() -> None:
    """Bit i of AT_HWCAP is the i-th name the kernel prints in ``Features``."""
    hwcap = 1 << 1 | 1 << 10 | 1 << 20 | 1 << 22
    assert decode_hwcap("arm64", hwcap, 1 << 1 | 1 << 13 | 1 << 14) == {
        "asimd", "asimdhp", "asimddp", "sve", "sve2", "i8mm", "bf16"
    }  # fmt: skip
    assert decode_hwcap("arm64", 0, 0) == frozenset()


def test_arm32_hwcap_bits() -> None:
    # A Cortex-A72 in 32-bit mode (Raspberry Pi 4 on Raspberry Pi OS 32-bit).
    hwcap = 1 << 12 | 1 << 16 | 1 << 17 | 1 << 13
    assert {"neon", "vfpv4", "idiva", "vfpv3"} == decode_hwcap("armv7l", hwcap)
    assert decode_hwcap("armv7l", 1 << 24 | 1 << 23 | 1 << 27) == {"asimddp", "asimdhp", "i8mm"}
    assert decode_hwcap("armv7l", 0, 1 << 0 | 1 << 4) == {"aes", "crc32"}


def test_arm32_device_reports_neon() -> None:
    """32-bit Arm says ``neon`` (arm64: ``asimd``); profiles match either as ``neon``."""
    assert decode_hwcap("armv7l", 1 << 12 | 1 << 16) & RELEVANT_FEATURES == {"neon"}
    cpuinfo = "processor\t: 0\nFeatures\t: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4\n"
    assert detect_hardware(cpuinfo_text=cpuinfo, machine="armv7l").cpu_features == ("neon",)


def test_x86_publishes_no_hwcap_features() -> None:
    assert decode_hwcap("x86_64", 0xFFFFFFFF, 0xFFFFFFFF) == frozenset()


def test_arm_device_never_reports_x86_flags_from_a_foreign_cpuinfo() -> None:
    """Under qemu-user /proc/cpuinfo is the host's: x86 flags for an arm64 process."""
    info = detect_hardware(cpuinfo_text=X86_CPUINFO, machine="aarch64")
    assert info.arch == "arm64"
    assert info.cpu_features == ()
    x86 = detect_hardware(cpuinfo_text=ARM_CPUINFO, machine="x86_64")
    assert x86.cpu_features == ()


def _auxv() -> dict[int, int]:
    raw = Path("/proc/self/auxv").read_bytes()
    fmt = "QQ" if struct.calcsize("P") == 8 else "II"
    step = struct.calcsize(fmt)
    return dict(struct.unpack_from(fmt, raw, i) for i in range(0, len(raw) - step + 1, step))


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not Path("/proc/self/auxv").exists(),
    reason="needs Linux /proc/self/auxv",
)
def test_read_hwcap_is_the_kernel_auxiliary_vector() -> None:
    auxv = _auxv()
    got = read_hwcap()
    assert got is not None
    if normalize_arch(platform.machine()) in ("arm64", "armv7l"):
        assert got == (auxv.get(16, 0), auxv.get(26, 0))
    else:
        # glibc on x86 answers AT_HWCAP with its own platform bits, not the
        # kernel's (only Arm is decoded); AT_HWCAP2 is passed through.
        assert got[1] == auxv.get(26, 0)
