"""Offline agent packages for gateways: ``edgefleet agent package``.

A gateway behind a firewall has no package index. This module builds, on a
machine that has one, a single ``.tar.gz`` that installs the agent there
without any network::

    edgefleet-agent-<platform>-<runtime>/
        install.sh                 venv from the wheelhouse (pip --no-index), config, systemd
        manifest.json              platform, Python, runtime, every wheel with its sha256
        SHA256SUMS                 the same hashes, checked by install.sh with sha256sum
        wheelhouse/*.whl           edgefleet (built here) and its dependencies for that platform
        config/                    agent.toml + root.json (enrolled) or enrollment.json (token)
        systemd/edgefleet-agent.service   the hardened unit from deploy/

How the wheelhouse is chosen (:func:`build_package`):

1. The edgefleet wheel is built from this source tree (or taken from ``--edgefleet-wheel``).
2. Its extra (``agent-onnx`` / ``agent-tflite``) is expanded into requirements with the
   *target's* environment markers. pip evaluates markers on the machine it runs on, not
   on ``--platform`` (pypa/pip#11664), so ``platform_machine == 'armv7l'`` would be
   ignored on an x86-64 builder.
3. pip resolves them (``install --dry-run --report``) with ``--only-binary=:all:`` and
   every manylinux tag the target's glibc accepts, the target's Python version, ABI and
   implementation. Dependencies' own requirements are re-checked with the target's
   markers and pip is asked again with anything it skipped (as
   ``scripts/check_platforms.py`` does).
4. The exact files pip chose are downloaded into a cache directory (``--cache-dir``,
   ``$EDGEFLEET_PACKAGE_CACHE``), checked against the index's sha256, and copied from
   there on every later build.
5. Every wheel is checked to be pure Python or built for the target platform.

Packages a platform takes from its OS (numpy and cffi on 32-bit ARM, where PyPI has no
wheels) are stood in for during resolution by metadata-only wheels of the OS's version,
and left out of the wheelhouse; install.sh then makes the venv with
``--system-site-packages`` and checks that the OS packages are there.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.parser import HeaderParser
from pathlib import Path
from typing import Any

from edgefleet.protocols.errors import EdgefleetError
from edgefleet.shared.settings import read_toml

try:
    from packaging.requirements import Requirement
    from packaging.tags import Tag, compatible_tags, cpython_tags
    from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
except ModuleNotFoundError:  # pragma: no cover - pip always vendors packaging
    from pip._vendor.packaging.requirements import (  # type: ignore[assignment]
        Requirement,
    )
    from pip._vendor.packaging.tags import (  # type: ignore[assignment]
        Tag,
        compatible_tags,
        cpython_tags,
    )
    from pip._vendor.packaging.utils import (  # type: ignore[assignment]
        InvalidWheelFilename,
        canonicalize_name,
        parse_wheel_filename,
    )

__all__ = [
    "CACHE_ENV",
    "PLATFORMS",
    "RUNTIMES",
    "ForeignWheelError",
    "GatewayPlatform",
    "IndexUnreachableError",
    "PackageConfigError",
    "PackageOptions",
    "PackageResult",
    "PackagingError",
    "Target",
    "UnsatisfiableError",
    "UnsupportedTargetError",
    "build_package",
    "default_cache_dir",
    "foreign_wheels",
    "manylinux_tags",
    "resolve_target",
    "target_requirements",
]

PROJECT = "edgefleet"
PACKAGE_FORMAT = "edgefleet-agent-package/v1"
CACHE_ENV = "EDGEFLEET_PACKAGE_CACHE"
RUNTIMES: Mapping[str, str] = {"onnx": "agent-onnx", "tflite": "agent-tflite"}
UNIT_NAME = "edgefleet-agent.service"
# Files install.sh installs owner-only: secrets the agent reads.
PRIVATE_SUFFIXES = (".key", ".token")
PRIVATE_NAMES = frozenset({"enrollment.json", "http.token"})
# pip's words when it could not reach an index (as opposed to "no such version").
NETWORK_ERRORS = (
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Connection refused",
    "Read timed out",
    "ConnectTimeoutError",
    "Network is unreachable",
    "Could not fetch URL",
    "SSLError",
    "ProxyError",
)


# ------------------------------------------------------------------ errors
class PackagingError(EdgefleetError):
    """An agent package could not be built; the message says why and what to do."""

    code = "packaging"


class UnsupportedTargetError(PackagingError):
    """Unknown platform, or a runtime that does not exist for that platform."""

    code = "unsupported_target"


class PackageConfigError(PackagingError):
    """The enrollment directory is missing files or its agent.toml is unusable."""

    code = "package_config"


class IndexUnreachableError(PackagingError):
    """pip could not reach the package index to resolve or download the wheels."""

    code = "index_unreachable"


class UnsatisfiableError(PackagingError):
    """The index has no wheel of some package for the target platform and Python."""

    code = "unsatisfiable"


class ForeignWheelError(PackagingError):
    """A wheel in the wheelhouse is built for another platform or Python."""

    code = "foreign_wheel"


# ------------------------------------------------------------------ platforms
@dataclass(frozen=True)
class GatewayPlatform:
    """A gateway platform the package command builds for (README, "Supported gateway platforms").

    Keep in step with ``PLATFORMS`` in ``scripts/check_platforms.py``.
    """

    key: str
    arch: str  # platform_machine on the device
    glibc_minor: int  # the oldest glibc 2.<minor> supported there
    default_python: str | None  # None: the Python running this command
    # runtime -> why it cannot be installed there
    unavailable: Mapping[str, str] = field(default_factory=dict)
    # distribution -> version the OS provides (python3-<name> from apt)
    os_provided: tuple[tuple[str, str], ...] = ()


PLATFORMS: Mapping[str, GatewayPlatform] = {
    p.key: p
    for p in (
        GatewayPlatform("linux-x86_64", "x86_64", 28, None),
        GatewayPlatform("linux-aarch64", "aarch64", 28, "3.11"),
        GatewayPlatform(
            "linux-armv7l",
            "armv7l",
            36,
            "3.11",
            unavailable={
                "onnx": (
                    "onnxruntime publishes no wheel for 32-bit ARM (armv7l); "
                    "use --runtime tflite there (tflite-runtime), or a 64-bit OS"
                )
            },
            os_provided=(("numpy", "1.24.2"), ("cffi", "1.15.1")),
        ),
    )
}


@dataclass(frozen=True)
class Target:
    """One (platform, Python, runtime) to build a wheelhouse for."""

    platform: GatewayPlatform
    python: str  # "3.11"
    runtime: str  # a key of RUNTIMES

    @property
    def extra(self) -> str:
        return RUNTIMES[self.runtime]

    @property
    def abi(self) -> str:
        return "cp" + self.python.replace(".", "")

    def pip_flags(self) -> list[str]:
        """``--platform``/``--python-version``/``--implementation``/``--abi`` for pip."""
        flags = [
            "--only-binary=:all:", "--implementation", "cp", "--python-version", self.python,
            "--abi", self.abi, "--abi", "abi3", "--abi", "none",
        ]  # fmt: skip
        for tag in manylinux_tags(self.platform.arch, self.platform.glibc_minor):
            flags += ["--platform", tag]
        return flags

    def marker_env(self) -> dict[str, str]:
        """The PEP 508 marker environment of CPython ``python`` on Linux/``arch``."""
        return {
            "implementation_name": "cpython",
            "implementation_version": f"{self.python}.0",
            "os_name": "posix",
            "platform_machine": self.platform.arch,
            "platform_python_implementation": "CPython",
            "platform_release": "",
            "platform_system": "Linux",
            "platform_version": "",
            "python_full_version": f"{self.python}.0",
            "python_version": self.python,
            "sys_platform": "linux",
            "extra": "",
        }

    def supported_tags(self) -> frozenset[Tag]:
        """Every wheel tag CPython ``python`` on this platform installs."""
        version = tuple(int(p) for p in self.python.split("."))
        platforms = manylinux_tags(self.platform.arch, self.platform.glibc_minor)
        platforms.append(f"linux_{self.platform.arch}")
        tags = set(cpython_tags(version, [self.abi, "abi3", "none"], platforms))
        tags |= set(compatible_tags(version, self.abi, platforms))
        return frozenset(tags)


def manylinux_tags(arch: str, glibc_minor: int) -> list[str]:
    """Every manylinux platform tag a device with glibc 2.<glibc_minor> accepts, best first."""
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(glibc_minor, 16, -1)]
    tags.append(f"manylinux2014_{arch}")
    if arch in {"x86_64", "i686"}:
        tags += [f"manylinux_2_{minor}_{arch}" for minor in range(16, 4, -1)]
        tags += [f"manylinux2010_{arch}", f"manylinux1_{arch}"]
    return tags


def resolve_target(platform: str, runtime: str, python: str | None = None) -> Target:
    """Check a (platform, runtime, Python) request before anything is downloaded.

    Raises:
        UnsupportedTargetError: unknown platform or runtime, a malformed Python version, or
            a runtime that has no wheels for the platform (onnx on armv7l).
    """
    gateway = PLATFORMS.get(platform)
    if gateway is None:
        raise UnsupportedTargetError(
            f"unknown platform {platform!r}; choose one of {', '.join(PLATFORMS)}"
        )
    if runtime not in RUNTIMES:
        raise UnsupportedTargetError(
            f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}"
        )
    why = gateway.unavailable.get(runtime)
    if why is not None:
        raise UnsupportedTargetError(f"cannot package runtime {runtime} for {platform}: {why}")
    version = python or gateway.default_python or f"{sys.version_info[0]}.{sys.version_info[1]}"
    if not re.fullmatch(r"3\.\d{1,2}", version):
        raise UnsupportedTargetError(f"--python-version must look like 3.11, got {version!r}")
    return Target(gateway, version, runtime)


# ------------------------------------------------------------------ requirements
def target_requirements(
    requires_dist: Iterable[str], extra: str, env: Mapping[str, str]
) -> list[str]:
    """What installing ``edgefleet[extra]`` needs on the target, markers evaluated there.

    ``requires_dist`` are the ``Requires-Dist`` lines of the edgefleet wheel; its
    self-references (``edgefleet[agent]``) are expanded. Markers are dropped from the
    result.
    """
    lines = [Requirement(line) for line in requires_dist]
    out: list[str] = []
    done: set[str] = set()
    todo = [extra]
    while todo:
        current = todo.pop()
        if current in done:
            continue
        done.add(current)
        scope = {**env, "extra": current}
        for req in lines:
            if req.marker is not None and not req.marker.evaluate(scope):
                continue
            if req.marker is None and current != extra:
                continue  # base requirements: taken once, for the requested extra
            if canonicalize_name(req.name) == PROJECT:
                todo += sorted(req.extras)
                continue
            plain = Requirement(str(req))
            plain.marker = None
            out.append(str(plain))
    return list(dict.fromkeys(out))


def missing_for_target(installs: Iterable[Mapping[str, Any]], env: Mapping[str, str]) -> list[str]:
    """Requirements of a pip report's ``install`` items the target needs but pip left out."""
    items = list(installs)
    resolved = {canonicalize_name(item["metadata"]["name"]) for item in items}
    missing: list[str] = []
    for item in items:
        for line in item["metadata"].get("requires_dist") or ():
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(dict(env)):
                continue
            if canonicalize_name(req.name) not in resolved:
                req.marker = None
                missing.append(str(req))
    return list(dict.fromkeys(missing))


def foreign_wheels(target: Target, filenames: Iterable[str]) -> list[str]:
    """The wheel file names that CPython ``target.python`` on the target cannot install."""
    supported = target.supported_tags()
    foreign: list[str] = []
    for name in filenames:
        try:
            _, _, _, tags = parse_wheel_filename(name)
        except InvalidWheelFilename:
            foreign.append(name)
            continue
        if not tags & supported:
            foreign.append(name)
    return foreign


def wheel_metadata(wheel: Path) -> tuple[str, list[str]]:
    """``(version, Requires-Dist lines)`` of a wheel file."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(
            (
                n
                for n in archive.namelist()
                if n.count("/") == 1 and n.endswith(".dist-info/METADATA")
            ),
            None,
        )
        if name is None:
            raise PackagingError(f"{wheel} is not a wheel: it has no .dist-info/METADATA")
        meta = HeaderParser().parsestr(archive.read(name).decode("utf-8"))
    return str(meta["Version"]), [str(v) for v in meta.get_all("Requires-Dist") or ()]


def stub_wheel(directory: Path, name: str, version: str) -> Path:
    """A metadata-only wheel standing for a package the OS provides (never installed)."""
    dist = f"{canonicalize_name(name).replace('-', '_')}-{version}"
    path = directory / f"{dist}-py3-none-any.whl"
    files = {
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: edgefleet\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = "".join(f"{f},,\n" for f in files) + f"{dist}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
        archive.writestr(f"{dist}.dist-info/RECORD", record)
    return path


# ------------------------------------------------------------------ options and result
def default_cache_dir() -> Path:
    """``$EDGEFLEET_PACKAGE_CACHE``, else ``$XDG_CACHE_HOME/edgefleet/packages``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgefleet" / "packages"


@dataclass(frozen=True)
class PackageOptions:
    """What to build. Paths are the builder's."""

    target: Target
    config_dir: Path  # from `edgefleet device enroll --out` or `device token --out`
    out: Path
    cache_dir: Path
    unit_file: Path  # deploy/edgefleet-agent.service
    source_dir: Path | None = None  # the edgefleet source tree to build the wheel from
    edgefleet_wheel: Path | None = None  # or a wheel built before
    pip_args: tuple[str, ...] = ()  # e.g. ("--index-url", "...")
    pip_timeout_s: float = 30.0


@dataclass(frozen=True)
class PackagedWheel:
    file: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class PackageResult:
    """What went into the archive."""

    out: Path
    size_bytes: int
    target: Target
    device_id: str
    first_boot: str  # "enrolled" (root.json) or "token" (enrollment.json)
    wheels: tuple[PackagedWheel, ...]
    os_provided: tuple[tuple[str, str], ...]
    downloaded: int  # wheels fetched from the index this time (others came from the cache)
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "size_bytes": self.size_bytes,
            "platform": self.target.platform.key,
            "python": self.target.python,
            "runtime": self.target.runtime,
            "device_id": self.device_id,
            "first_boot": self.first_boot,
            "wheels": [w.__dict__ for w in self.wheels],
            "os_provided": dict(self.os_provided),
            "downloaded": self.downloaded,
            "seconds": round(self.seconds, 1),
        }


Progress = Callable[[str], None]


def _quiet(_message: str) -> None:
    return None


# ------------------------------------------------------------------ the config directory
@dataclass(frozen=True)
class EnrollmentFiles:
    device_id: str
    first_boot: str
    state_dir: str
    files: tuple[Path, ...]


def read_config_dir(config_dir: Path) -> EnrollmentFiles:
    """Check an enrollment directory: agent.toml plus the files it names.

    Raises:
        PackageConfigError: agent.toml is missing or unreadable, names no device, or a
            file it refers to (root.json, enrollment.json, certificates) is not there.
    """
    config = config_dir / "agent.toml"
    if not config.is_file():
        raise PackageConfigError(
            f"{config_dir} has no agent.toml; make one with `edgefleet device enroll ID --out "
            f"{config_dir}` or `edgefleet device token ID --url URL --out {config_dir}`"
        )
    try:
        raw = read_toml(config, "agent config")
    except EdgefleetError as exc:
        raise PackageConfigError(str(exc)) from None
    device_id = raw.get("device_id")
    if not isinstance(device_id, str) or not device_id:
        raise PackageConfigError(f"{config}: device_id is missing")
    named: list[str] = []
    enrollment = raw.get("enrollment")
    if isinstance(enrollment, dict) and isinstance(enrollment.get("token_file"), str):
        named.append(enrollment["token_file"])
        first_boot = "token"
    elif isinstance(raw.get("trust_root"), str):
        named.append(raw["trust_root"])
        first_boot = "enrolled"
    else:
        raise PackageConfigError(
            f"{config}: neither trust_root (an enrolled device) nor [enrollment] token_file "
            "(first-boot enrollment); the agent could not trust any bundle"
        )
    for table in ("broker", "http"):
        section = raw.get(table)
        if isinstance(section, dict):
            named += [v for k, v in section.items() if k.endswith("_file") and isinstance(v, str)]
    files = [config]
    for name in named:
        path = Path(name)
        if path.is_absolute():
            continue  # a path on the device (e.g. /run/credentials/...), not shipped
        if len(path.parts) != 1:
            raise PackageConfigError(
                f"{config}: {name!r} is in a subdirectory; keep the files next to agent.toml"
            )
        if not (config_dir / path).is_file():
            raise PackageConfigError(f"{config} names {name}, but {config_dir / path} is missing")
        files.append(config_dir / path)
    state_dir = raw.get("state_dir")
    return EnrollmentFiles(
        device_id,
        first_boot,
        state_dir if isinstance(state_dir, str) else "",
        tuple(dict.fromkeys(files)),
    )


def packaged_unit(unit_text: str, first_boot: str) -> str:
    """The unit file as shipped: an enrolled device has no token for ``LoadCredential``.

    systemd refuses to start a unit whose credential file is missing.
    """
    if first_boot == "token":
        return unit_text
    lines = unit_text.splitlines()
    kept = [ln for ln in lines if not ln.startswith("LoadCredential=enrollment.json")]
    if len(kept) != len(lines):
        kept.insert(0, "# edgefleet agent package: enrolled device, LoadCredential= removed.")
    return "\n".join(kept) + "\n"


# ------------------------------------------------------------------ pip
def _run_pip(args: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-color",
        "--timeout", f"{timeout_s:g}", "--retries", "2", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _pip_failure(
    proc: subprocess.CompletedProcess[str], target: Target, what: str
) -> PackagingError:
    """Turn a failed pip run into the error an operator can act on."""
    text = proc.stdout + proc.stderr
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "is ignored" not in ln]
    network = [ln for ln in lines if any(m in ln for m in NETWORK_ERRORS)]
    unmet = re.findall(r"No matching distribution found for ([^\s]+)", text)
    no_version = re.findall(
        r"Could not find a version that satisfies the requirement ([^\s]+)", text
    )
    packages = list(dict.fromkeys(unmet + no_version))
    where = f"{target.platform.key}, CPython {target.python}"
    if network:
        return IndexUnreachableError(
            f"the package index is unreachable while {what} ({network[-1][:300]}); "
            "check the network or pass --index-url, or build where an index is reachable"
        )
    if packages:
        return UnsatisfiableError(
            f"no wheel for {where} satisfies {', '.join(packages)} "
            f"(while {what}; the agent's [{target.extra}] extra needs it)"
        )
    conflicts = [ln for ln in lines if " depends on " in ln or "conflict" in ln.lower()]
    detail = "; ".join((conflicts or [ln for ln in lines if "ERROR" in ln] or lines)[-4:])
    return PackagingError(f"pip failed while {what} for {where}: {detail[:800]}")


def _resolve(
    target: Target,
    requirements: Sequence[str],
    work: Path,
    options: PackageOptions,
    find_links: Sequence[Path],
    progress: Progress,
) -> list[dict[str, Any]]:
    """pip's resolution for the target: the report's ``install`` items."""
    env = target.marker_env()
    added: list[str] = []
    for attempt in range(4):
        report = work / f"report-{attempt}.json"
        args = [
            "install", "--dry-run", "--ignore-installed", "--quiet",
            "--target", str(work / "target"), "--report", str(report), *target.pip_flags(),
        ]  # fmt: skip
        for link in find_links:
            args += ["--find-links", str(link)]
        args += [*options.pip_args, *requirements, *added]
        progress(f"resolving for {target.platform.key} (CPython {target.python})")
        proc = _run_pip(args, options.pip_timeout_s)
        if proc.returncode != 0:
            raise _pip_failure(proc, target, "resolving the dependencies")
        installs: list[dict[str, Any]] = json.loads(report.read_text(encoding="utf-8"))["install"]
        missing = [m for m in missing_for_target(installs, env) if m not in added]
        if not missing:
            return installs
        added += missing
    raise PackagingError(f"pip kept leaving out {', '.join(added)} for {target.platform.key}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(
    target: Target,
    installs: Sequence[Mapping[str, Any]],
    skip: frozenset[str],
    options: PackageOptions,
    progress: Progress,
) -> tuple[list[Path], int]:
    """The wheel files pip chose, from the cache or downloaded into it. ``(paths, downloaded)``."""
    store = options.cache_dir / "wheels"
    store.mkdir(parents=True, exist_ok=True)
    wanted: list[tuple[Path, str | None, str]] = []
    for item in installs:
        name = canonicalize_name(item["metadata"]["name"])
        if name in skip:
            continue
        info = item["download_info"]
        url = str(info["url"])
        sha = (info.get("archive_info") or {}).get("hashes", {}).get("sha256")
        filename = url.rsplit("/", 1)[-1].split("#", 1)[0]
        wanted.append((store / filename, sha, url))

    def fresh(path: Path, sha: str | None) -> bool:
        return path.is_file() and (sha is None or _sha256(path) == sha)

    to_get = [(p, sha, url) for p, sha, url in wanted if not fresh(p, sha)]
    if to_get:
        progress(f"downloading {len(to_get)} wheel(s) into {store}")
        for path, _, _ in to_get:
            path.unlink(missing_ok=True)  # a stale or partial file: fetch again
        args = ["download", "--no-deps", "--quiet", "--dest", str(store), *target.pip_flags()]
        args += [*options.pip_args, *(url for _, _, url in to_get)]
        proc = _run_pip(args, options.pip_timeout_s)
        if proc.returncode != 0:
            raise _pip_failure(proc, target, "downloading the wheels")
        for path, sha, url in to_get:
            if not path.is_file():
                raise PackagingError(f"pip did not save {path.name} (from {url})")
            if sha is not None and _sha256(path) != sha:
                path.unlink()
                raise PackagingError(f"{path.name}: sha256 differs from the index's; not used")
    return [p for p, _, _ in wanted], len(to_get)


# ------------------------------------------------------------------ the edgefleet wheel
_SOURCE_PARTS = ("pyproject.toml", "README.md", "src", "protocols", "shared", "agent", "controller")


def find_source_dir() -> Path | None:
    """The edgefleet source tree this module runs from (an editable install), if any."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    try:
        if 'name = "edgefleet"' in pyproject.read_text(encoding="utf-8"):
            return root
    except OSError:
        return None
    return None


def build_edgefleet_wheel(source: Path, dest: Path, options: PackageOptions) -> Path:
    """``pip wheel`` of a clean copy of the source tree (the tree itself is left untouched)."""
    copy = dest / "src"
    for part in _SOURCE_PARTS:
        origin = source / part
        if origin.is_dir():
            shutil.copytree(origin, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
        elif origin.is_file():
            copy.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, copy / part)
    out = dest / "dist"
    proc = _run_pip(
        ["wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), *options.pip_args, str(copy)],
        options.pip_timeout_s,
    )
    if proc.returncode != 0:
        text = proc.stdout + proc.stderr
        if any(marker in text for marker in NETWORK_ERRORS):
            raise IndexUnreachableError(
                "the package index is unreachable while building the edgefleet wheel (pip "
                "fetches its build backend, setuptools, from there); check the network or "
                "--index-url, or pass --edgefleet-wheel PATH"
            )
        tail = [ln.strip() for ln in text.strip().splitlines() if "is ignored" not in ln][-5:]
        raise PackagingError(
            f"building the edgefleet wheel from {source} failed: {' '.join(tail)}; "
            "or pass --edgefleet-wheel PATH"
        )
    wheels = sorted(out.glob("edgefleet-*.whl"))
    if len(wheels) != 1:
        raise PackagingError(f"building the edgefleet wheel gave {len(wheels)} wheels")
    return wheels[0]


# ------------------------------------------------------------------ the archive
def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def _add_file(tar: tarfile.TarFile, name: str, path: Path, mode: int) -> None:
    info = tar.gettarinfo(str(path), arcname=name)
    info.mode = mode
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    with path.open("rb") as f:
        tar.addfile(info, f)


def _private(name: str) -> bool:
    return name in PRIVATE_NAMES or name.endswith(PRIVATE_SUFFIXES)


def install_script(target: Target, manifest: Mapping[str, Any]) -> str:
    """The ``install.sh`` of a package for ``target``."""
    os_names = " ".join(name for name, _ in target.platform.os_provided)
    apt = " ".join(f"python3-{name}" for name, _ in target.platform.os_provided)
    values = {
        "@PLATFORM@": target.platform.key,
        "@ARCH@": target.platform.arch,
        "@PYTHON@": target.python,
        "@EXTRA@": target.extra,
        "@SYSTEM_SITE@": "1" if target.platform.os_provided else "0",
        "@OS_MODULES@": os_names,
        "@APT_PACKAGES@": apt,
        "@DEVICE@": str(manifest["device_id"]),
        "@FIRST_BOOT@": str(manifest["first_boot"]),
    }
    text = _INSTALL_SH
    for key, value in values.items():
        text = text.replace(key, value)
    return text


def build_package(options: PackageOptions, progress: Progress = _quiet) -> PackageResult:
    """Build the offline agent package ``options.out``.

    Raises:
        PackageConfigError: the enrollment directory is incomplete.
        IndexUnreachableError: the package index could not be reached.
        UnsatisfiableError: some package has no wheel for the target (named).
        ForeignWheelError: a wheel for another platform slipped into the wheelhouse.
        PackagingError: anything else that stopped the build (the message says what).
    """
    started = time.monotonic()
    target = options.target
    enrollment = read_config_dir(options.config_dir)
    try:
        unit_text = options.unit_file.read_text(encoding="utf-8")
    except OSError as exc:
        raise PackagingError(f"cannot read the systemd unit {options.unit_file}: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="edgefleet-package-") as tmp:
        work = Path(tmp)
        if options.edgefleet_wheel is not None:
            own_wheel = options.edgefleet_wheel
        else:
            source = options.source_dir or find_source_dir()
            if source is None:
                raise PackagingError(
                    "no edgefleet source tree next to this installation to build the wheel "
                    "from; pass --edgefleet-wheel PATH (a wheel of this version)"
                )
            progress(f"building the edgefleet wheel from {source}")
            own_wheel = build_edgefleet_wheel(source, work / "build", options)
        version, requires = wheel_metadata(own_wheel)
        env = target.marker_env()
        requirements = target_requirements(requires, target.extra, env)
        os_links = work / "os-provided"
        os_links.mkdir()
        for name, os_version in target.platform.os_provided:
            stub_wheel(os_links, name, os_version)
            requirements.append(f"{name}=={os_version}")
        installs = _resolve(target, requirements, work, options, [os_links], progress)
        skip = frozenset(canonicalize_name(n) for n, _ in target.platform.os_provided)
        fetched, downloaded = _fetch(target, installs, skip, options, progress)
        wheels = [own_wheel, *fetched]
        foreign = foreign_wheels(target, [w.name for w in wheels])
        if foreign:
            raise ForeignWheelError(
                f"not installable on {target.platform.key} with CPython {target.python}: "
                + ", ".join(foreign)
            )
        packaged = tuple(PackagedWheel(w.name, _sha256(w), w.stat().st_size) for w in wheels)
        manifest: dict[str, Any] = {
            "format": PACKAGE_FORMAT,
            "platform": target.platform.key,
            "arch": target.platform.arch,
            "python": target.python,
            "runtime": target.runtime,
            "extra": target.extra,
            "edgefleet_version": version,
            "device_id": enrollment.device_id,
            "first_boot": enrollment.first_boot,
            "system_site_packages": bool(target.platform.os_provided),
            "os_provided": dict(target.platform.os_provided),
            "wheels": [w.__dict__ for w in packaged],
            "built_at": int(time.time()),
        }
        top = f"edgefleet-agent-{target.platform.key}-{target.runtime}"
        progress(f"writing {options.out}")
        options.out.parent.mkdir(parents=True, exist_ok=True)
        partial = options.out.with_name(options.out.name + ".partial")
        with tarfile.open(partial, "w:gz", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, f"{top}/install.sh", install_script(target, manifest).encode(), 0o755)
            _add_bytes(
                tar, f"{top}/manifest.json", (json.dumps(manifest, indent=2) + "\n").encode(), 0o644
            )
            sums = "".join(f"{w.sha256}  {w.file}\n" for w in packaged)
            _add_bytes(tar, f"{top}/SHA256SUMS", sums.encode(), 0o644)
            unit = packaged_unit(unit_text, enrollment.first_boot).encode()
            _add_bytes(tar, f"{top}/systemd/{UNIT_NAME}", unit, 0o644)
            for path in enrollment.files:
                mode = 0o600 if _private(path.name) else 0o644
                _add_file(tar, f"{top}/config/{path.name}", path, mode)
            for wheel in wheels:
                _add_file(tar, f"{top}/wheelhouse/{wheel.name}", wheel, 0o644)
        os.replace(partial, options.out)
    return PackageResult(
        out=options.out,
        size_bytes=options.out.stat().st_size,
        target=target,
        device_id=enrollment.device_id,
        first_boot=enrollment.first_boot,
        wheels=packaged,
        os_provided=target.platform.os_provided,
        downloaded=downloaded,
        seconds=time.monotonic() - started,
    )


_INSTALL_SH = r"""#!/bin/sh
# Offline installer of the edgefleet agent, made by `edgefleet agent package`.
# Platform @PLATFORM@, CPython @PYTHON@, extra [@EXTRA@], device @DEVICE@ (@FIRST_BOOT@).
# Needs no network: pip installs from ./wheelhouse only (--no-index).
#
#   sudo ./install.sh            venv /opt/edgefleet, config /etc/edgefleet, systemd unit
#   ./install.sh --prefix DIR --no-systemd   all under DIR (containers, tests)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
prefix=""
systemd=1
python=python3
unit=edgefleet-agent.service

usage() {
    echo "usage: $0 [--prefix DIR] [--no-systemd] [--python PYTHON]"
    echo "  --prefix DIR  install under DIR/opt/edgefleet, DIR/etc/edgefleet (with --no-systemd)"
    echo "  --no-systemd  do not install or enable the systemd unit"
    echo "  --python PY   the interpreter for the venv (default python3; CPython @PYTHON@)"
}
fail() { echo "install.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || { usage >&2; exit 2; }; prefix=$2; shift 2 ;;
        --no-systemd) systemd=0; shift ;;
        --python) [ $# -ge 2 ] || { usage >&2; exit 2; }; python=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

venv="$prefix/opt/edgefleet"
confdir="$prefix/etc/edgefleet"
if [ "$systemd" = 1 ]; then
    [ -z "$prefix" ] \
        || fail "the systemd unit names /opt/edgefleet, not --prefix; add --no-systemd"
    [ "$(id -u)" = 0 ] || fail "run as root to install the systemd unit, or add --no-systemd"
    command -v systemctl >/dev/null 2>&1 || fail "no systemctl here; add --no-systemd"
fi

command -v "$python" >/dev/null 2>&1 \
    || fail "$python not found; install CPython @PYTHON@ (apt-get install python3 python3-venv)"
have=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$have" = "@PYTHON@" ] || fail "this package holds wheels for CPython @PYTHON@, \
but $python is $have: rebuild it with --python-version $have"
# A 32-bit userland on a 64-bit ARM kernel says aarch64 but runs armv7l wheels.
machine=$("$python" -c 'import platform, struct
m = platform.machine()
arm32 = m.startswith("arm") or (m == "aarch64" and struct.calcsize("P") == 4)
print("armv7l" if arm32 else m)')
[ "$machine" = "@ARCH@" ] || fail "this package is for @PLATFORM@, but $python runs \
on $machine: build one with --platform linux-$machine"
"$python" -c 'import venv, ensurepip' 2>/dev/null \
    || fail "$python cannot make venvs; apt-get install python3-venv"
if [ "@SYSTEM_SITE@" = 1 ]; then
    for module in @OS_MODULES@; do
        "$python" -c "import $module" 2>/dev/null \
            || fail "@PLATFORM@ takes $module from the OS: apt-get install @APT_PACKAGES@"
    done
fi

if command -v sha256sum >/dev/null 2>&1; then
    (cd "$here/wheelhouse" && sha256sum -c --quiet ../SHA256SUMS) \
        || fail "wheelhouse damaged: SHA256SUMS does not match"
fi

echo "install.sh: venv $venv (CPython $have, @PLATFORM@)"
if [ "@SYSTEM_SITE@" = 1 ]; then
    "$python" -m venv --system-site-packages "$venv"
else
    "$python" -m venv "$venv"
fi
# --isolated: no pip.conf or PIP_* variable here may add an index or constraints.
"$venv/bin/python" -m pip --isolated install --no-index --find-links "$here/wheelhouse" \
    --no-cache-dir --disable-pip-version-check --quiet "edgefleet[@EXTRA@]"
"$venv/bin/python" -c 'import edgefleet.agent.cli' || fail "the agent does not import in $venv"

echo "install.sh: config $confdir"
mkdir -p "$confdir"
chmod 0755 "$confdir"
for file in "$here"/config/*; do
    name=$(basename "$file")
    cp "$file" "$confdir/$name"
    case "$name" in
        enrollment.json|http.token|*.key|*.token) chmod 0600 "$confdir/$name" ;;
        *) chmod 0644 "$confdir/$name" ;;
    esac
done

if [ "$systemd" = 1 ]; then
    if [ -f "$confdir/enrollment.json" ]; then
        # The service reads the root-only token through systemd's credentials.
        credential="/run/credentials/$unit/enrollment.json"
        sed -i "s#^token_file *= *\"enrollment.json\"#token_file = \"$credential\"#" \
            "$confdir/agent.toml"
    fi
    grep -q '^state_dir *= *"/var/lib/edgefleet-agent"' "$confdir/agent.toml" \
        || echo "install.sh: warning: state_dir is not /var/lib/edgefleet-agent" \
            "(the unit's StateDirectory)" >&2
    install -m 0644 "$here/systemd/$unit" "/etc/systemd/system/$unit"
    systemctl daemon-reload
    systemctl enable --now "$unit"
    echo "install.sh: $unit enabled and started (journalctl -u edgefleet-agent)"
else
    echo "install.sh: done; run: $venv/bin/edgefleet-agent --config $confdir/agent.toml"
fi
"""
