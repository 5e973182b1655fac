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

``/proc/cpuinfo`` is parsed here only (:func:`parse_cpuinfo`); the compiler's
description of the machine it measures on reads it through
:func:`read_cpuinfo`. Architecture names are normalised by
:func:`edgefleet.protocols.hardware.normalize_arch`, the one spelling both
sides compare.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from pathlib import Path

from edgefleet.protocols.hardware import normalize_arch
from edgefleet.protocols.messages import HardwareInfo
from edgefleet.shared.runtime import available_runtimes

__all__ = [
    "CPUINFO",
    "RELEVANT_FEATURES",
    "CpuInfo",
    "detect_hardware",
    "parse_cpu_features",
    "parse_cpuinfo",
    "read_cpuinfo",
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


def _relevant(flags: frozenset[str]) -> tuple[str, ...]:
    return tuple(
        sorted(f for f in flags if f in RELEVANT_FEATURES or f.startswith(_RELEVANT_PREFIXES))
    )


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
    """
    cpu = read_cpuinfo() if cpuinfo_text is None else parse_cpuinfo(cpuinfo_text)
    return HardwareInfo(
        arch=normalize_arch(platform.machine() if machine is None else machine),
        cpu_features=_relevant(cpu.flags),
        runtimes=available_runtimes(),
        hardware_class=hardware_class or "generic",
    )
