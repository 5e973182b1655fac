#!/usr/bin/env python3
"""Check that the agent extras still resolve for every documented gateway platform.

Issue 12: the README promises which runtimes install on which gateway (table
"Supported gateway platforms"); this script is the check behind that promise and
fails when a dependency change breaks a documented platform. It needs only pip
(>= 23.1, for ``install --dry-run --report`` with ``--platform``). It installs and
downloads nothing: per (platform, Python, extra) it asks pip's resolver what it
*would* install on that foreign platform.

    python scripts/check_platforms.py                  # every documented platform
    python scripts/check_platforms.py --only aarch64   # platforms whose key contains "aarch64"
    python scripts/check_platforms.py --python 3.11    # one Python version
    python scripts/check_platforms.py --list           # the platform table
    python scripts/check_platforms.py -- --cache-dir .cache/pip   # extra pip arguments

Exit status: 0 every cell resolves, or the check was skipped because no package
index is reachable (a line starting "skipped:" says why); 1 a documented platform
broke; 2 pyproject.toml lacks an extra the table names or cannot be read.

It resolves against the index a gateway uses (``$EDGEFLEET_PLATFORM_INDEX``, default
PyPI) with pip in isolated mode, so this machine's pip configuration (local
find-links, extra indexes, constraint files) cannot make a platform look installable;
only ``$PIP_CERT`` (a CA bundle for a TLS-intercepting proxy) is passed on.

Why not simply ``pip download --platform ... ".[agent]"``:

* pip evaluates environment markers (``platform_machine``, ``python_version``) on the
  machine it runs on, not on the ``--platform`` target (pypa/pip#11664). Our
  ``platform_machine == 'armv7l'`` markers would be ignored on an x86-64 runner, and
  dependencies' own markers too. So the extras are read from pyproject.toml and their
  markers evaluated for the target here; after pip answers, every resolved package's
  requirements are re-checked with the target's markers and pip is asked again with
  anything it skipped.
* ``--platform manylinux_2_28_aarch64`` alone does not match wheels tagged
  ``manylinux2014``/``manylinux_2_17`` (most aarch64 wheels): pip does not add the
  older tags a glibc-2.28 device accepts. Alone it "resolves" through a cffi
  pre-release. So every tag the device's glibc accepts is passed.
* Packages a platform takes from the OS (numpy and cffi from Debian on armv7l, where
  PyPI has no wheels for them) are stood in for by metadata-only wheels of the OS's
  version, pinned, so the resolver checks every requirement on them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: pip vendors a TOML reader
    from pip._vendor import tomli as tomllib

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ModuleNotFoundError:  # pip always vendors packaging
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[assignment]
    from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[assignment]

PROJECT = "edgefleet"
DEFAULT_INDEX = "https://pypi.org/simple/"
INDEX_ENV = "EDGEFLEET_PLATFORM_INDEX"
# The extras a gateway installs, and the one thing each must never pull.
AGENT_EXTRAS = ("agent", "agent-onnx", "agent-tflite")
ONNX_FREE_EXTRAS = ("agent", "agent-tflite")
# pip's messages when the index cannot be reached after the probe passed.
NETWORK_ERRORS = (
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Connection refused",
    "Read timed out",
    "ConnectTimeoutError",
    "Network is unreachable",
    "Could not fetch URL",
)
KEY_PACKAGES = frozenset(
    {"onnxruntime", "ai-edge-litert", "tflite-runtime", "numpy", "cryptography"}
)


@dataclass(frozen=True)
class Platform:
    """One row of the README's platform table, as the resolver sees it."""

    key: str  # short name for messages and --only
    describe: str
    arch: str  # platform_machine as the device reports it
    glibc_minor: int  # the device's glibc is 2.<glibc_minor>
    pythons: tuple[str, ...]
    extras: tuple[str, ...]
    # distribution -> version the OS provides (never taken from the index)
    os_provided: tuple[tuple[str, str], ...] = ()


# Keep in step with the README table "Supported gateway platforms".
PLATFORMS = (
    Platform(
        "linux-x86_64",
        "x86-64, glibc >= 2.28 (Debian 10+, Ubuntu 20.04+, RHEL 8+)",
        "x86_64",
        28,
        ("3.10", "3.11", "3.12", "3.13"),
        AGENT_EXTRAS,
    ),
    Platform(
        "linux-aarch64",
        "64-bit ARM, glibc >= 2.28 (Raspberry Pi OS 64-bit, Debian 11+, Ubuntu 20.04+)",
        "aarch64",
        28,
        ("3.10", "3.11", "3.12", "3.13"),
        AGENT_EXTRAS,
    ),
    Platform(
        "linux-armv7l",
        "32-bit ARM, Raspberry Pi OS / Debian 12 armhf (glibc 2.36, Python 3.11) with "
        "python3-numpy 1.24.2 and python3-cffi 1.15.1 from apt (venv --system-site-packages)",
        "armv7l",
        36,
        ("3.11",),
        ("agent", "agent-tflite"),
        os_provided=(("numpy", "1.24.2"), ("cffi", "1.15.1")),
    ),
)


# ------------------------------------------------------------------ pure parts
def manylinux_tags(arch: str, glibc_minor: int) -> list[str]:
    """Every manylinux platform tag a device with glibc 2.<glibc_minor> accepts, best first."""
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(glibc_minor, 16, -1)]
    tags.append(f"manylinux2014_{arch}")
    if arch in {"x86_64", "i686"}:
        tags += [f"manylinux_2_{minor}_{arch}" for minor in range(16, 4, -1)]
        tags += [f"manylinux2010_{arch}", f"manylinux1_{arch}"]
    return tags


def marker_env(arch: str, python: str) -> dict[str, str]:
    """The PEP 508 marker environment of CPython ``python`` on Linux/``arch``."""
    return {
        "implementation_name": "cpython",
        "implementation_version": f"{python}.0",
        "os_name": "posix",
        "platform_machine": arch,
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": "Linux",
        "platform_version": "",
        "python_full_version": f"{python}.0",
        "python_version": python,
        "sys_platform": "linux",
        "extra": "",
    }


def read_extras(pyproject: Path) -> dict[str, list[str]]:
    """``[project.optional-dependencies]`` of ``pyproject``.

    Raises:
        ValueError: the file cannot be read or has no such table.
        TypeError: the table is not a table.
    """
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        extras = data["project"]["optional-dependencies"]
    except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read the extras from {pyproject}: {exc!r}") from exc
    if not isinstance(extras, dict):
        raise TypeError(f"{pyproject}: [project.optional-dependencies] is not a table")
    return {str(name): [str(line) for line in lines] for name, lines in extras.items()}


def extra_requirements(
    optional: Mapping[str, Sequence[str]],
    extra: str,
    env: Mapping[str, str],
    seen: frozenset[str] = frozenset(),
) -> list[str]:
    """The requirements of ``extra`` on the target ``env``, markers dropped.

    Self-references (``edgefleet[agent]``) are expanded; requirements whose marker
    is false on the target are left out.

    Raises:
        KeyError: ``extra`` (or one it refers to) is not defined.
    """
    out: list[str] = []
    for line in optional[extra]:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(dict(env)):
            continue
        if canonicalize_name(req.name) == PROJECT:
            for sub in sorted(req.extras):
                if sub not in seen | {extra}:
                    out += extra_requirements(optional, sub, env, seen | {extra})
            continue
        req.marker = None
        out.append(str(req))
    return list(dict.fromkeys(out))


def missing_for_target(installs: Iterable[Mapping[str, Any]], env: Mapping[str, str]) -> list[str]:
    """Requirements of a pip report's ``install`` items that the target needs but pip left out.

    pip evaluated the dependencies' markers on the host; this re-evaluates them on the
    target and names what is missing (markers dropped).
    """
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


def stub_wheel(directory: Path, name: str, version: str) -> Path:
    """A metadata-only wheel standing for a package the OS provides."""
    dist = f"{canonicalize_name(name).replace('-', '_')}-{version}"
    path = directory / f"{dist}-py3-none-any.whl"
    files = {
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: check_platforms\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n"
        ),
    }
    record = "".join(f"{f},,\n" for f in files) + f"{dist}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
        archive.writestr(f"{dist}.dist-info/RECORD", record)
    return path


# ------------------------------------------------------------------ the index
def index_url() -> str:
    """The index to resolve against: ``$EDGEFLEET_PLATFORM_INDEX`` or PyPI."""
    return (os.environ.get(INDEX_ENV) or DEFAULT_INDEX).rstrip("/") + "/"


def _ssl_context() -> ssl.SSLContext:
    cafile = os.environ.get("PIP_CERT") or None
    return ssl.create_default_context(cafile=cafile)


def probe(url: str, timeout: float) -> str | None:
    """None when the index answers, otherwise why it does not."""
    if not url.startswith(("https://", "http://")):
        return f"not an http(s) index: {url}"
    request = urllib.request.Request(url + "pip/", method="HEAD")  # noqa: S310 (checked above)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=_ssl_context()):  # noqa: S310
            return None
    except urllib.error.HTTPError as exc:
        return None if exc.code < 500 else f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return str(getattr(exc, "reason", exc))


# ------------------------------------------------------------------ resolving
@dataclass
class Result:
    """What pip resolved (or why not) for one (platform, Python, extra) cell."""

    platform: Platform
    python: str
    extra: str
    ok: bool = False
    seconds: float = 0.0
    resolved: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    network: bool = False
    missing: list[str] = field(default_factory=list)


def _pip_command(
    p: Platform, python: str, reqs: Sequence[str], workdir: Path, report: Path, url: str,
    pip_args: Sequence[str],
) -> list[str]:
    cmd = [
        sys.executable, "-m", "pip", "--isolated", "install", "--dry-run",
        "--ignore-installed", "--progress-bar=off", "--no-color",
        "--target", str(workdir / "target"), "--only-binary=:all:",
        "--implementation", "cp", "--python-version", python,
        "--index-url", url, "--report", str(report),
    ]  # fmt: skip
    if os.environ.get("PIP_CERT"):
        cmd += ["--cert", os.environ["PIP_CERT"]]
    for tag in manylinux_tags(p.arch, p.glibc_minor):
        cmd += ["--platform", tag]
    if p.os_provided:
        cmd += ["--find-links", str(workdir / "os-provided" / p.key)]
    return [*cmd, *pip_args, *reqs]


def _pip_resolve(
    p: Platform, python: str, extra: str, reqs: Sequence[str], workdir: Path, url: str,
    pip_args: Sequence[str], attempt: int,
) -> Result:
    report = workdir / f"{p.key}-{python}-{extra}-{attempt}.json"
    proc = subprocess.run(
        _pip_command(p, python, reqs, workdir, report, url, pip_args),
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    result = Result(p, python, extra)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        errors = [
            ln for ln in lines
            if "No matching distribution" in ln or " depends on " in ln
            or "Could not find a version" in ln
        ] or [ln for ln in lines if "ERROR" in ln][-3:]  # fmt: skip
        result.problems = list(dict.fromkeys(errors))[:8]
        result.network = any(m in proc.stderr for m in NETWORK_ERRORS)
        return result
    installs = json.loads(report.read_text(encoding="utf-8"))["install"]
    result.ok = True
    result.resolved = {
        canonicalize_name(i["metadata"]["name"]): str(i["metadata"]["version"]) for i in installs
    }
    result.missing = missing_for_target(installs, marker_env(p.arch, python))
    return result


def resolve(
    p: Platform, python: str, extra: str, optional: Mapping[str, Sequence[str]], workdir: Path,
    url: str, pip_args: Sequence[str],
) -> Result:
    """Resolve one extra for one platform, re-resolving while pip skipped target-only deps."""
    started = time.monotonic()
    env = marker_env(p.arch, python)
    reqs = extra_requirements(optional, extra, env)
    reqs += [f"{name}=={version}" for name, version in p.os_provided]
    added: list[str] = []
    result = Result(p, python, extra)
    for attempt in range(4):
        result = _pip_resolve(p, python, extra, reqs + added, workdir, url, pip_args, attempt)
        if not result.ok or not result.missing:
            break
        added += [m for m in result.missing if m not in added]
    result.seconds = time.monotonic() - started
    if result.ok and result.missing:
        result.ok = False
        result.problems += [f"still missing after re-resolving: {m}" for m in result.missing]
    if result.ok and added:
        result.problems.append(
            "note: added for the target (host markers differ): " + ", ".join(added)
        )
    if result.ok and extra in ONNX_FREE_EXTRAS and "onnxruntime" in result.resolved:
        result.ok = False
        result.problems.append(
            f"[{extra}] must not pull onnxruntime, but resolves "
            f"onnxruntime=={result.resolved['onnxruntime']}"
        )
    for name, _version in p.os_provided:
        key = canonicalize_name(name)
        if key in result.resolved:
            result.resolved[key] += " (OS)"
    return result


def _cells(
    platforms: Sequence[Platform], pythons: Sequence[str] | None
) -> list[tuple[Platform, str, str]]:
    return [
        (p, py, extra)
        for p in platforms
        for py in p.pythons
        if not pythons or py in pythons
        for extra in p.extras
    ]


def _print_results(results: Sequence[Result], verbose: bool) -> None:
    for r in results:
        mark = "ok  " if r.ok else "FAIL"
        summary = ", ".join(
            f"{n}=={v}" for n, v in sorted(r.resolved.items()) if verbose or n in KEY_PACKAGES
        )
        print(f"{mark} {r.platform.key:14} py{r.python:5} [{r.extra}] {r.seconds:5.1f}s  {summary}")
        for line in r.problems:
            print(f"       {line}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", maxsplit=1)[0])
    parser.add_argument(
        "--pyproject", type=Path, default=Path(__file__).resolve().parent.parent / "pyproject.toml"
    )
    parser.add_argument("--only", default="", help="only platforms whose key contains this")
    parser.add_argument("--python", action="append", help="only this Python version (repeatable)")
    parser.add_argument("--jobs", type=int, default=6, help="parallel pip processes")
    parser.add_argument("--probe-timeout", type=float, default=5.0)
    parser.add_argument("--list", action="store_true", help="print the platform table and exit")
    parser.add_argument("--verbose", "-v", action="store_true", help="print every resolved set")
    parser.add_argument("pip_args", nargs="*", help="passed to pip (after --)")
    args = parser.parse_args(argv)

    platforms = [p for p in PLATFORMS if args.only in p.key]
    if args.list:
        for p in platforms:
            print(f"{p.key:14} py {','.join(p.pythons):20} [{','.join(p.extras)}]  {p.describe}")
        return 0
    try:
        optional = read_extras(args.pyproject)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    absent = sorted({e for p in platforms for e in p.extras if e not in optional})
    if absent:
        print(
            f"error: {args.pyproject} has no extra(s) {', '.join(absent)} "
            f"(it has: {', '.join(sorted(optional))})",
            file=sys.stderr,
        )
        return 2

    url = index_url()
    why = probe(url, args.probe_timeout)
    if why is not None:
        print(f"skipped: no package index reachable ({url}: {why})")
        return 0

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="check-platforms-") as tmp:
        work = Path(tmp)
        for p in platforms:
            if p.os_provided:
                (work / "os-provided" / p.key).mkdir(parents=True)
                for name, version in p.os_provided:
                    stub_wheel(work / "os-provided" / p.key, name, version)
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            results = list(
                pool.map(
                    lambda cell: resolve(
                        cell[0], cell[1], cell[2], optional, work, url, args.pip_args
                    ),
                    _cells(platforms, args.python),
                )
            )
    elapsed = time.monotonic() - started

    if results and not any(r.ok for r in results) and all(r.network for r in results):
        print(f"skipped: package index {url} answered the probe but pip could not use it:")
        print("  " + "\n  ".join(results[0].problems[:3]))
        return 0
    _print_results(results, args.verbose)
    failed = [r for r in results if not r.ok]
    passed = len(results) - len(failed)
    print(f"platform check: {passed} of {len(results)} resolved in {elapsed:.0f}s")
    if failed:
        print(
            "\nA documented gateway platform no longer resolves (README, 'Supported gateway "
            "platforms'). Fix the dependency change, or change the README table and PLATFORMS "
            "in scripts/check_platforms.py together.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
