"""CPU architecture and feature detection: the agent's hardware report, the compiler's host.

The controller picks (and the compiler builds) bundles per hardware class;
what the agent reports here lets an operator see whether a device can run an
int8 model with fast kernels (VNNI/AMX on x86, dot-product/i8mm on Arm) and
which runtimes it has. Only features that matter for choosing a model build
are reported: ``/proc/cpuinfo`` lists over a hundred flags and the rest would
just bloat every state report.

On machines with several ``flags``/``Features`` lines (one per core) the
*intersection* is reported: on a big.LITTLE Arm board a feature only some
cores have cannot be relied on, because the scheduler may move us anywhere.

On Linux/Arm the features come from the kernel's hardware capability bits
(``getauxval(AT_HWCAP/AT_HWCAP2)``, :func:`read_hwcap`), with ``/proc/cpuinfo``
as the fallback. The kernel derives cpuinfo's ``Features`` line from the same
bits, so a real device gives the same answer either way; but under qemu-user
(how we test Arm gateways on x86 machines) ``/proc/cpuinfo`` is the *host's*
and would report x86 flags for an arm64 process, while the auxiliary vector is
the emulated CPU's. For the same reason an Arm device never reports x86 flags
and an x86 one never Arm features, whatever ``/proc/cpuinfo`` says.

``/proc/cpuinfo`` is parsed here only (:func:`parse_cpuinfo`); the compiler's
description of the machine it measures on reads it through
:func:`read_cpuinfo`. Architecture names are normalised by
:func:`edgefleet.protocols.hardware.normalize_arch`, the one spelling both
sides compare.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edgefleet.protocols.hardware import normalize_arch
from edgefleet.protocols.messages import HardwareInfo
from edgefleet.shared.runtime import available_runtimes

__all__ = [
    "CPUINFO",
    "RELEVANT_FEATURES",
    "CpuInfo",
    "decode_hwcap",
    "detect_hardware",
    "parse_cpu_features",
    "parse_cpuinfo",
    "read_cpuinfo",
    "read_hwcap",
]

log = logging.getLogger(__name__)

CPUINFO = Path("/proc/cpuinfo")

# Features relevant to choosing among fp32/fp16/int8 builds.
RELEVANT_FEATURES = frozenset(
    {
        # x86
        "avx",
        "avx2",
        "avx512f",
        "avx512_vnni",
        "avx512_bf16",
        "avx512_fp16",
        "avx_vnni",
        "fma",
        "f16c",
        "sse4_2",
        # arm ("neon" is 32-bit Arm's name for what arm64 calls asimd)
        "neon",
        "asimd",
        "asimddp",
        "asimdhp",
        "i8mm",
        "sve",
        "sve2",
        "bf16",
    }
)
# Every AMX variant (amx_tile, amx_int8, amx_bf16, amx_fp16, ...) is relevant.
_RELEVANT_PREFIXES = ("amx",)
_ARM_ONLY = frozenset({"neon", "asimd", "asimddp", "asimdhp", "i8mm", "sve", "sve2", "bf16"})
_ARM_ARCHES = frozenset({"arm64", "armv7l", "armv8l", "armv6l"})

# getauxval(3) keys (elf.h), the same on every Linux architecture.
AT_HWCAP = 16
AT_HWCAP2 = 26

# Bit -> feature name, as the kernel names them in /proc/cpuinfo ``Features``
# (arch/arm64/include/uapi/asm/hwcap.h, arch/arm/include/uapi/asm/hwcap.h).
_ARM64_HWCAP: Mapping[int, str] = {
    0: "fp", 1: "asimd", 2: "evtstrm", 3: "aes", 4: "pmull", 5: "sha1", 6: "sha2",
    7: "crc32", 8: "atomics", 9: "fphp", 10: "asimdhp", 11: "cpuid", 12: "asimdrdm",
    13: "jscvt", 14: "fcma", 15: "lrcpc", 16: "dcpop", 17: "sha3", 18: "sm3", 19: "sm4",
    20: "asimddp", 21: "sha512", 22: "sve", 23: "asimdfhm", 24: "dit", 25: "uscat",
    26: "ilrcpc", 27: "flagm", 28: "ssbs", 29: "sb", 30: "paca", 31: "pacg",
}  # fmt: skip
_ARM64_HWCAP2: Mapping[int, str] = {
    0: "dcpodp", 1: "sve2", 2: "sveaes", 3: "svepmull", 4: "svebitperm", 5: "svesha3",
    6: "svesm4", 7: "flagm2", 8: "frint", 9: "svei8mm", 10: "svef32mm", 11: "svef64mm",
    12: "svebf16", 13: "i8mm", 14: "bf16", 15: "dgh", 16: "rng", 17: "bti", 18: "mte",
}  # fmt: skip
_ARM32_HWCAP: Mapping[int, str] = {
    0: "swp", 1: "half", 2: "thumb", 3: "26bit", 4: "fastmult", 5: "fpa", 6: "vfp",
    7: "edsp", 8: "java", 9: "iwmmxt", 10: "crunch", 11: "thumbee", 12: "neon",
    13: "vfpv3", 14: "vfpv3d16", 15: "tls", 16: "vfpv4", 17: "idiva", 18: "idivt",
    19: "vfpd32", 20: "lpae", 21: "evtstrm", 22: "fphp", 23: "asimdhp", 24: "asimddp",
    25: "asimdfhm", 26: "asimdbf16", 27: "i8mm",
}  # fmt: skip
_ARM32_HWCAP2: Mapping[int, str] = {0: "aes", 1: "pmull", 2: "sha1", 3: "sha2", 4: "crc32"}


def _relevant(flags: frozenset[str], arch: str | None = None) -> tuple[str, ...]:
    """The relevant subset of ``flags``; with ``arch``, only that architecture's kind."""
    keep = {f for f in flags if f in RELEVANT_FEATURES or f.startswith(_RELEVANT_PREFIXES)}
    if arch is not None:
        arm = arch in _ARM_ARCHES
        keep = {f for f in keep if (f in _ARM_ONLY) == arm}
    return tuple(sorted(keep))


def _bits(value: int, names: Mapping[int, str]) -> set[str]:
    return {name for bit, name in names.items() if value >> bit & 1}


def decode_hwcap(arch: str, hwcap: int, hwcap2: int = 0) -> frozenset[str]:
    """Feature names of the kernel's ``AT_HWCAP``/``AT_HWCAP2`` bits for ``arch``.

    ``arch`` is a :func:`normalize_arch` name; only ``arm64`` and 32-bit Arm
    (``armv7l``, ...) are decoded, any other gives an empty set (x86 does not
    publish its features this way).
    """
    if arch == "arm64":
        return frozenset(_bits(hwcap, _ARM64_HWCAP) | _bits(hwcap2, _ARM64_HWCAP2))
    if arch in _ARM_ARCHES:
        return frozenset(_bits(hwcap, _ARM32_HWCAP) | _bits(hwcap2, _ARM32_HWCAP2))
    return frozenset()


def read_hwcap() -> tuple[int, int] | None:
    """This process's ``(AT_HWCAP, AT_HWCAP2)`` from the C library, or None.

    None off Linux, where the C library has no ``getauxval`` (musl and glibc
    both do), or where the kernel reports no bits at all.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError) as exc:
        log.debug("no getauxval: %s", exc)
        return None
    getauxval.argtypes = [ctypes.c_ulong]
    getauxval.restype = ctypes.c_ulong
    hwcap, hwcap2 = int(getauxval(AT_HWCAP)), int(getauxval(AT_HWCAP2))
    return (hwcap, hwcap2) if hwcap or hwcap2 else None


@dataclass(frozen=True)
class CpuInfo:
    """What ``/proc/cpuinfo`` says about this CPU.

    Attributes:
        model: the ``model name`` of the first core (x86); ``None`` when not
            reported (most Arm kernels).
        flags: every ``flags``/``Features`` entry all cores share, lower-cased.
    """

    model: str | None
    flags: frozenset[str]


def parse_cpuinfo(cpuinfo_text: str) -> CpuInfo:
    """Parse ``/proc/cpuinfo`` text; the flags are those common to all cores."""
    model: str | None = None
    common: set[str] | None = None
    for line in cpuinfo_text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "model name" and model is None and value.strip():
            model = value.strip()
        elif key in ("flags", "Features"):
            flags = set(value.lower().split())
            common = flags if common is None else common & flags
    return CpuInfo(model=model, flags=frozenset(common or ()))


def read_cpuinfo(path: Path = CPUINFO) -> CpuInfo:
    """This machine's :class:`CpuInfo`; empty where ``/proc/cpuinfo`` cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        log.debug("no CPU feature information: %s", exc)
        text = ""
    return parse_cpuinfo(text)


def parse_cpu_features(cpuinfo_text: str) -> tuple[str, ...]:
    """Relevant CPU features from ``/proc/cpuinfo`` text, sorted.

    Reads ``flags`` lines (x86) and ``Features`` lines (Arm) and keeps the
    relevant features common to all of them.
    """
    return _relevant(parse_cpuinfo(cpuinfo_text).flags)


def detect_hardware(
    hardware_class: str | None = None,
    cpuinfo_text: str | None = None,
    *,
    machine: str | None = None,
) -> HardwareInfo:
    """Describe this device for the controller.

    Args:
        hardware_class: the class from the agent's configuration; ``"generic"``
            when not configured.
        cpuinfo_text: ``/proc/cpuinfo`` content to parse instead of reading
            the file (tests; or empty on systems without it).
        machine: ``platform.machine()`` value to use instead of the real one.

    On Arm, without ``cpuinfo_text``, the features are the kernel's hardware
    capability bits (:func:`read_hwcap`); ``/proc/cpuinfo`` only where those
    are unavailable. Features of another architecture are never reported.
    """
    arch = normalize_arch(platform.machine() if machine is None else machine)
    hwcap = read_hwcap() if cpuinfo_text is None and arch in _ARM_ARCHES else None
    if hwcap is not None:
        flags = decode_hwcap(arch, *hwcap)
    else:
        cpu = read_cpuinfo() if cpuinfo_text is None else parse_cpuinfo(cpuinfo_text)
        flags = cpu.flags
    return HardwareInfo(
        arch=arch,
        cpu_features=_relevant(flags, arch),
        runtimes=available_runtimes(),
        hardware_class=hardware_class or "generic",
    )
