"""CPU architecture and feature detection for the agent's hardware report.

The controller picks (and the compiler builds) bundles per hardware class;
what the agent reports here lets an operator see whether a device can run an
int8 model with fast kernels (VNNI/AMX on x86, dot-product/i8mm on Arm) and
which runtimes it has. Only features that matter for choosing a model build
are reported: ``/proc/cpuinfo`` lists over a hundred flags and the rest would
just bloat every state report.

On machines with several ``flags``/``Features`` lines (one per core) the
*intersection* is reported: on a big.LITTLE Arm board a feature only some
cores have cannot be relied on, because the scheduler may move us anywhere.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path

from edgefleet.protocols.messages import HardwareInfo
from edgefleet.shared.runtime import available_runtimes

__all__ = ["RELEVANT_FEATURES", "detect_hardware", "normalize_arch", "parse_cpu_features"]

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
        # arm
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

_ARCH = {
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "x64": "x86_64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "aarch64_be": "arm64",
    "i386": "x86",
    "i486": "x86",
    "i586": "x86",
    "i686": "x86",
}


def normalize_arch(machine: str) -> str:
    """Map ``platform.machine()`` spellings to one name per architecture.

    Linux says ``aarch64`` where macOS says ``arm64`` and Windows ``AMD64``
    where Linux says ``x86_64``; hardware classes must not depend on the OS.
    Unknown names are returned lower-cased.
    """
    key = machine.strip().lower()
    return _ARCH.get(key, key or "unknown")


def _relevant(flag: str) -> bool:
    return flag in RELEVANT_FEATURES or flag.startswith(_RELEVANT_PREFIXES)


def parse_cpu_features(cpuinfo_text: str) -> tuple[str, ...]:
    """Relevant CPU features from ``/proc/cpuinfo`` text, sorted.

    Reads ``flags`` lines (x86) and ``Features`` lines (Arm) and keeps the
    relevant features common to all of them.
    """
    common: set[str] | None = None
    for line in cpuinfo_text.splitlines():
        key, sep, value = line.partition(":")
        if not sep or key.strip() not in ("flags", "Features"):
            continue
        flags = {f for f in value.lower().split() if _relevant(f)}
        common = flags if common is None else common & flags
    return tuple(sorted(common or ()))


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
    """
    if cpuinfo_text is None:
        try:
            cpuinfo_text = CPUINFO.read_text(errors="replace")
        except OSError as exc:
            log.debug("no CPU feature information: %s", exc)
            cpuinfo_text = ""
    return HardwareInfo(
        arch=normalize_arch(platform.machine() if machine is None else machine),
        cpu_features=parse_cpu_features(cpuinfo_text),
        runtimes=available_runtimes(),
        hardware_class=hardware_class or "generic",
    )
