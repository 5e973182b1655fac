"""CPU architecture and feature names, spelled one way on both sides.

Agents report ``/proc/cpuinfo`` spellings (``avx512_vnni``, ``asimddp``); the
compiler's profiles and the signed bundle requirements use canonical aliases
(``vnni``, ``dotprod``). Both sides normalise through this module, so a
bundle's signed requirements mean the same thing to the controller that chose
it and to the agent that checks it before installing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = ["normalize_arch", "normalize_features", "satisfies"]

FEATURE_ALIASES: Mapping[str, str] = {
    "avx512_vnni": "vnni",
    "avx512vnni": "vnni",
    "avx_vnni": "vnni",
    "avxvnni": "vnni",
    "asimddp": "dotprod",
    "asimd_dp": "dotprod",
    "asimd": "neon",
    "asimdhp": "fp16arith",
    "avx512_fp16": "fp16arith",
    "avx512fp16": "fp16arith",
}
# Linux says ``aarch64`` where macOS says ``arm64``, and Windows ``AMD64`` where
# Linux says ``x86_64``: hardware classes must not depend on the OS.
ARCH_ALIASES: Mapping[str, str] = {
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
    "any": "any",
}
# Instructions every CPU of an architecture has, so a device that reports no
# flags at all still matches the basic profile of its architecture.
BASELINE: Mapping[str, frozenset[str]] = {
    "x86_64": frozenset({"sse2"}),
    "arm64": frozenset({"neon", "asimd"}),
}


def normalize_arch(arch: str) -> str:
    """One spelling per architecture (``aarch64`` -> ``arm64``, ``AMD64`` -> ``x86_64``).

    Used on ``platform.machine()`` by the agent's hardware report and the
    compiler's host description, and on profile and bundle requirements.
    Unknown names are returned lower-cased; an empty one is ``"unknown"``.
    """
    key = arch.strip().lower()
    return ARCH_ALIASES.get(key, key or "unknown")


def normalize_features(features: Iterable[str], arch: str | None = None) -> frozenset[str]:
    """Lower-case the flags and add the canonical alias of each one.

    Args:
        features: CPU flags as reported (``/proc/cpuinfo`` spelling) or aliases.
        arch: if given, the architecture's baseline features are added too.
    """
    out: set[str] = set()
    for raw in features:
        flag = raw.strip().lower()
        if not flag:
            continue
        out.add(flag)
        alias = FEATURE_ALIASES.get(flag)
        if alias:
            out.add(alias)
    if arch is not None:
        out |= BASELINE.get(normalize_arch(arch), frozenset())
    return frozenset(out)


def satisfies(
    required_arch: str, required_features: Iterable[str], arch: str, features: Iterable[str]
) -> bool:
    """Whether a CPU (``arch``, ``features``) can run code built for the requirements."""
    own_arch = normalize_arch(arch)
    if normalize_arch(required_arch) not in ("any", own_arch):
        return False
    return normalize_features(required_features) <= normalize_features(features, own_arch)
