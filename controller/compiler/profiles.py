"""Device profiles: which variants a class of gateways can run, and what "best" means there.

A :class:`Profile` describes a device class by what changes the choice of a
model build: the runtime, the CPU architecture, and the CPU features that make
int8 fast (VNNI on x86, the dot-product instructions on Arm). Without those
instructions int8 kernels fall back to slower multiply-add sequences that can
also saturate, which is why the recipes quantize differently for them (7-bit
weights, unsigned activations) and why the profile has to say so.

Feature names are the ones Linux prints in ``/proc/cpuinfo`` (what the agent
reports, see ``edgefleet.shared.hardware``). Because the same capability has
several spellings (``avx512_vnni`` and ``avx_vnni`` are both VNNI), matching
expands every feature set with canonical aliases first; a profile may use
either the raw flag or the alias (``vnni``, ``dotprod``, ``neon``,
``fp16arith``).

Custom profiles come from a TOML file::

    [profiles.shelf-gateway]
    runtime = "onnxruntime"
    arch = "arm64"
    cpu_features = ["asimd", "asimddp"]
    precisions = ["fp32", "int8"]
    max_bundle_bytes = 20_000_000
    objective = "latency"
    description = "Shelf cameras, Cortex-A76"
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.controller.compiler.errors import ProfileError

# Normalisation is shared with the agent, which checks signed requirements.
from edgefleet.protocols.hardware import normalize_arch, normalize_features
from edgefleet.protocols.messages import HardwareInfo
from edgefleet.shared.settings import read_toml, refuse_unknown_keys

__all__ = [
    "ARCHES",
    "BUILTIN_PROFILES",
    "COMPILER_PRECISIONS",
    "OBJECTIVES",
    "SIZE_MAX_LATENCY_RATIO",
    "Profile",
    "get_profile",
    "load_profiles",
    "match_profile",
    "normalize_arch",
    "normalize_features",
]

ARCHES = ("x86_64", "arm64", "any")
OBJECTIVES = ("latency", "size")
# The ``size`` objective takes the smallest passing variant, but not one that
# is more than this much slower than fp32 (p50, same interleaved rounds).
SIZE_MAX_LATENCY_RATIO = 1.1
PROFILE_RUNTIMES = ("onnxruntime", "tflite")
# What this compiler can produce. int4 is weight-only: litert-quantizer for
# TFLite, onnxruntime's MatMulNBits/GatherBlockQuantized for ONNX.
COMPILER_PRECISIONS = ("fp32", "fp16", "int8", "int4")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


# Canonical capability names for the spellings that differ between CPUs,
# kernels and tools. Left: a lower-cased reported flag; right: the alias added.
@dataclass(frozen=True)
class Profile:
    """A class of devices and the rules for choosing a variant for it.

    Attributes:
        name: the hardware class name (also used as the bundle's hardware class).
        runtime: ``"onnxruntime"`` (ONNX sources) or ``"tflite"`` (``.tflite`` sources).
        arch: ``"x86_64"``, ``"arm64"``, or ``"any"`` for a portable profile.
        cpu_features: features a device must have to use this profile.
        precisions: precisions a variant may have on these devices.
        max_bundle_bytes: largest model file these devices accept (``None``: any).
        objective: ``"latency"`` picks the fastest variant that passes the
            accuracy gate, never slower than fp32; ``"size"`` (bandwidth-bound
            fleets) picks the smallest that passes the gate with p50 latency
            at most :data:`SIZE_MAX_LATENCY_RATIO` times fp32's.
        description: free text for operators.
    """

    name: str
    runtime: str
    arch: str
    cpu_features: frozenset[str]
    precisions: tuple[str, ...]
    max_bundle_bytes: int | None
    objective: str
    description: str = ""

    def __post_init__(self) -> None:
        problems = _profile_problems(self)
        if problems:
            raise ProfileError(f"profile {self.name!r}: {'; '.join(problems)}")

    @property
    def features(self) -> frozenset[str]:
        """Required features with canonical aliases (what matching compares)."""
        return normalize_features(self.cpu_features)

    @property
    def int8_dot(self) -> bool:
        """Whether these devices have int8 dot-product instructions (VNNI, Arm dotprod).

        Without them onnxruntime's u8s8 kernels use a 16-bit intermediate that
        can saturate, so recipes switch to 7-bit weights (``reduce_range``)
        and unsigned activations.
        """
        return bool({"vnni", "dotprod"} & self.features)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "runtime": self.runtime,
            "arch": self.arch,
            "cpu_features": sorted(self.cpu_features),
            "precisions": list(self.precisions),
            "max_bundle_bytes": self.max_bundle_bytes,
            "objective": self.objective,
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, name: str | None = None) -> Profile:
        """Build a profile from a mapping (a TOML table or ``to_dict`` output).

        Raises:
            ProfileError: a field is missing, unknown, or has the wrong type or value.
        """
        pname = name if name is not None else d.get("name")
        if not isinstance(pname, str):
            raise ProfileError("profile has no name")
        where = f"profile {pname!r}"
        known = {
            "name",
            "runtime",
            "arch",
            "cpu_features",
            "precisions",
            "max_bundle_bytes",
            "objective",
            "description",
        }
        refuse_unknown_keys(
            d,
            known,
            what="field(s)",
            error=lambda msg: ProfileError(f"{where}: {msg}; known: {', '.join(sorted(known))}"),
        )
        features = _str_list(d, "cpu_features", where, default=[])
        precisions = _str_list(d, "precisions", where, default=list(COMPILER_PRECISIONS))
        max_bytes = d.get("max_bundle_bytes")
        if max_bytes is not None and (
            isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0
        ):
            raise ProfileError(f"{where}: max_bundle_bytes must be a positive integer")
        return cls(
            name=pname,
            runtime=_str(d, "runtime", where, default="onnxruntime"),
            arch=normalize_arch(_str(d, "arch", where)),
            cpu_features=frozenset(f.strip().lower() for f in features),
            precisions=tuple(precisions),
            max_bundle_bytes=max_bytes,
            objective=_str(d, "objective", where, default="latency"),
            description=_str(d, "description", where, default=""),
        )


def _str(d: Mapping[str, Any], key: str, where: str, *, default: str | None = None) -> str:
    value = d.get(key, default)
    if value is None:
        raise ProfileError(f"{where}: missing field {key!r}")
    if not isinstance(value, str):
        raise ProfileError(f"{where}: field {key!r} must be a string")
    return value


def _str_list(d: Mapping[str, Any], key: str, where: str, *, default: list[str]) -> list[str]:
    value = d.get(key, default)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProfileError(f"{where}: field {key!r} must be a list of strings")
    return list(value)


def _profile_problems(p: Profile) -> list[str]:
    problems: list[str] = []
    if not isinstance(p.name, str) or not _NAME.match(p.name):
        problems.append("name must be 1-64 of a-z 0-9 . _ - and start with a letter or digit")
    if p.runtime not in PROFILE_RUNTIMES:
        problems.append(f"runtime must be one of {', '.join(PROFILE_RUNTIMES)}, got {p.runtime!r}")
    if p.arch not in ARCHES:
        problems.append(f"arch must be one of {', '.join(ARCHES)}, got {p.arch!r}")
    if not p.precisions:
        problems.append("precisions must not be empty")
    bad = [x for x in p.precisions if x not in COMPILER_PRECISIONS]
    if bad:
        problems.append(
            f"precisions {', '.join(map(repr, bad))} not supported; "
            f"use {', '.join(COMPILER_PRECISIONS)}"
        )
    if len(set(p.precisions)) != len(p.precisions):
        problems.append("precisions must not repeat")
    if p.objective not in OBJECTIVES:
        problems.append(f"objective must be one of {', '.join(OBJECTIVES)}, got {p.objective!r}")
    if p.max_bundle_bytes is not None and (
        isinstance(p.max_bundle_bytes, bool) or p.max_bundle_bytes <= 0
    ):
        problems.append("max_bundle_bytes must be a positive integer")
    return problems


_MB = 1024 * 1024

BUILTIN_PROFILES: Mapping[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            name="x86-vnni",
            runtime="onnxruntime",
            arch="x86_64",
            cpu_features=frozenset({"avx2", "vnni"}),
            precisions=("fp32", "fp16", "int8", "int4"),
            max_bundle_bytes=512 * _MB,
            objective="latency",
            description="x86-64 gateways with AVX2 and VNNI (Ice Lake+, Zen 4+, Alder Lake+)",
        ),
        Profile(
            name="x86-avx2",
            runtime="onnxruntime",
            arch="x86_64",
            cpu_features=frozenset({"avx2"}),
            precisions=("fp32", "fp16", "int8", "int4"),
            max_bundle_bytes=512 * _MB,
            objective="latency",
            description="x86-64 gateways with AVX2 but no VNNI (Haswell-Skylake, Zen 1-3)",
        ),
        Profile(
            name="arm64-dotprod",
            runtime="onnxruntime",
            arch="arm64",
            cpu_features=frozenset({"asimd", "asimddp"}),
            precisions=("fp32", "fp16", "int8", "int4"),
            max_bundle_bytes=256 * _MB,
            objective="latency",
            description="ARMv8.2+ gateways with dot-product instructions (Cortex-A55/A76, RPi 5)",
        ),
        Profile(
            name="arm64-basic",
            runtime="onnxruntime",
            arch="arm64",
            cpu_features=frozenset({"asimd"}),
            precisions=("fp32", "fp16", "int8", "int4"),
            max_bundle_bytes=128 * _MB,
            objective="latency",
            description="ARMv8.0 gateways without dot-product (Cortex-A53/A72, RPi 3/4)",
        ),
        Profile(
            name="generic",
            runtime="onnxruntime",
            arch="any",
            cpu_features=frozenset(),
            precisions=("fp32",),
            max_bundle_bytes=None,
            objective="latency",
            description="anything onnxruntime runs on; fp32 only, nothing assumed",
        ),
        Profile(
            name="arm64-litert",
            runtime="tflite",
            arch="arm64",
            cpu_features=frozenset({"asimd"}),
            precisions=("fp32", "int8", "int4"),
            max_bundle_bytes=128 * _MB,
            objective="latency",
            description="ARMv8 gateways running LiteRT (TFLite) models with ai-edge-litert",
        ),
    )
}


def get_profile(name: str, profiles: Mapping[str, Profile] | None = None) -> Profile:
    """Look a profile up by name among ``profiles`` (default: the built-in ones).

    Raises:
        ProfileError: no profile has that name; the message lists the known ones.
    """
    table = BUILTIN_PROFILES if profiles is None else profiles
    try:
        return table[name]
    except KeyError:
        raise ProfileError(
            f"unknown profile {name!r}; known profiles: {', '.join(sorted(table))}"
        ) from None


def load_profiles(path: Path | str, *, include_builtin: bool = True) -> dict[str, Profile]:
    """Read custom profiles from a TOML file.

    The file has one ``[profiles.<name>]`` table per profile. A custom profile
    with the name of a built-in one replaces it, so a fleet can tighten, say,
    ``max_bundle_bytes`` for ``arm64-basic`` without inventing a new class.

    Args:
        path: the TOML file.
        include_builtin: start from the built-in profiles (default) or from nothing.

    Returns:
        Profiles by name.

    Raises:
        ProfileError: the file cannot be read, is not TOML, or a profile is invalid.
    """
    p = Path(path)
    doc = read_toml(p, "profile file", error=ProfileError)
    tables = doc.get("profiles")
    if not isinstance(tables, dict) or not tables:
        raise ProfileError(f"profile file {p} has no [profiles.<name>] tables")
    refuse_unknown_keys(
        doc,
        {"profiles"},
        what="top-level key(s)",
        error=lambda msg: ProfileError(f"profile file {p}: {msg}"),
    )
    out: dict[str, Profile] = dict(BUILTIN_PROFILES) if include_builtin else {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ProfileError(f"profile file {p}: profiles.{name} must be a table")
        if "name" in table and table["name"] != name:
            raise ProfileError(f"profile file {p}: profiles.{name} has a different name field")
        try:
            out[name] = Profile.from_dict(table, name=name)
        except ProfileError as exc:
            raise ProfileError(f"profile file {p}: {exc}") from None
    return out


def _compatible(
    profile: Profile, arch: str, features: frozenset[str], runtimes: Sequence[str]
) -> bool:
    if runtimes and profile.runtime not in runtimes:
        return False
    if profile.arch not in ("any", arch):
        return False
    return profile.features <= features


def match_profile(
    hardware: HardwareInfo, profiles: Mapping[str, Profile] | Iterable[Profile] | None = None
) -> Profile:
    """Pick the most specific profile a device can use.

    A profile is usable when the device has its runtime (if the device reports
    runtimes), its architecture (or the profile's arch is ``any``), and every
    required CPU feature. Among usable profiles:

    1. the one named by the device's ``hardware_class`` wins, if that is not
       the default ``"generic"`` (an operator pinned the class);
    2. otherwise an architecture-specific profile beats an ``any`` one, and
       more required features beat fewer (``x86-vnni`` over ``x86-avx2``);
    3. remaining ties go to the alphabetically first name, so the choice is
       stable across controller restarts.

    Raises:
        ProfileError: no profile is usable; the message says what the device reported.
    """
    if profiles is None:
        candidates: list[Profile] = list(BUILTIN_PROFILES.values())
    elif isinstance(profiles, Mapping):
        candidates = list(profiles.values())
    else:
        candidates = list(profiles)
    arch = normalize_arch(hardware.arch)
    features = normalize_features(hardware.cpu_features, arch)
    usable = [p for p in candidates if _compatible(p, arch, features, hardware.runtimes)]
    if not usable:
        raise ProfileError(
            f"no profile fits a device with arch {arch!r}, runtimes "
            f"{list(hardware.runtimes) or 'unreported'} and features "
            f"{sorted(hardware.cpu_features)}"
        )
    pinned = [p for p in usable if p.name == hardware.hardware_class and p.name != "generic"]
    if pinned:
        return pinned[0]
    usable.sort(key=lambda p: (p.arch == "any", -len(p.features), p.name))
    return usable[0]
