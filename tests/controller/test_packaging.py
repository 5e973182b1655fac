"""``edgefleet agent package``: offline agent installers for gateways (issue 12).

Fast tests build real archives with real pip against a local, file-only
wheelhouse (a stand-in edgefleet wheel and one stand-in dependency), so the
archive layout and the refusals are checked without a network. The slow tests
use this machine's package index: they build the real x86-64 package, install
it with the network cut off (a fresh network namespace where this machine
allows one, and pip with no index in any case), and run the installed agent
against a real broker and controller; and they check that the ARM archives
hold nothing built for another platform.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from packaging.requirements import Requirement

from edgefleet.controller import packaging
from edgefleet.controller.broker import free_port
from edgefleet.controller.bundle import inspect_onnx
from edgefleet.controller.cli import cli
from edgefleet.controller.demo_model import build_demo_model
from edgefleet.shared.link import BrokerSettings
from edgefleet.shared.settings import read_toml
from tests.e2e.harness import Harness, wait_for

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "edgefleet-agent.service"


# ------------------------------------------------------------------ helpers
def _wheel(directory: Path, name: str, version: str, requires: list[str], tag: str) -> Path:
    """A minimal but installable wheel (one module) for the fast tests."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = directory / f"{dist}-{tag}.whl"
    requires_text = "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = {
        f"{name.replace('-', '_')}_mod.py": "VALUE = 1\n",
        f"{dist}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
            "Provides-Extra: agent\nProvides-Extra: agent-onnx\n" + requires_text
        ),
        f"{dist}.dist-info/WHEEL": (
            f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n"
        ),
    }
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
        archive.writestr(f"{dist}.dist-info/RECORD", "".join(f"{f},,\n" for f in files))
    return path


def _enrolled_dir(path: Path, device_id: str = "gw-0001", **extra: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    lines = [
        f'device_id = "{device_id}"',
        f'state_dir = "{extra.pop("state_dir", "/var/lib/edgefleet-agent")}"',
        'trust_root = "root.json"',
        *(f"{k} = {v}" for k, v in extra.items()),
    ]
    (path / "agent.toml").write_text("\n".join(lines) + "\n")
    (path / "root.json").write_text("{}\n")
    return path


def _token_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "agent.toml").write_text(
        'device_id = "gw-0002"\nstate_dir = "/var/lib/edgefleet-agent"\n\n'
        '[enrollment]\ntoken_file = "enrollment.json"\n'
    )
    (path / "enrollment.json").write_text('{"token": "secret"}\n')
    return path


def _local_options(
    tmp: Path, config_dir: Path, platform: str = "linux-x86_64"
) -> packaging.PackageOptions:
    """Options that resolve against a local wheelhouse only (no network)."""
    index = tmp / "local-index"
    index.mkdir(exist_ok=True)
    own = _wheel(
        tmp, "edgefleet", "0.1.0",
        ['fakedep>=1.0; extra == "agent"', 'edgefleet[agent]; extra == "agent-onnx"'],
        "py3-none-any",
    )  # fmt: skip
    _wheel(index, "fakedep", "1.2", [], "py3-none-any")
    return packaging.PackageOptions(
        target=packaging.resolve_target(platform, "onnx"),
        config_dir=config_dir,
        out=tmp / "gw.tar.gz",
        cache_dir=tmp / "cache",
        unit_file=UNIT,
        edgefleet_wheel=own,
        pip_args=("--isolated", "--no-index", "--find-links", str(index)),
    )


def _members(archive: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(archive) as tar:
        return {m.name: m for m in tar.getmembers()}


def _read(archive: Path, name: str) -> str:
    with tarfile.open(archive) as tar:
        f = tar.extractfile(name)
        assert f is not None
        return f.read().decode()


# ------------------------------------------------------------------ refusals
def test_onnx_on_armv7l_is_refused_naming_onnxruntime() -> None:
    with pytest.raises(packaging.UnsupportedTargetError, match=r"onnxruntime.*armv7l.*tflite"):
        packaging.resolve_target("linux-armv7l", "onnx")


@pytest.mark.parametrize(
    ("platform", "runtime", "python", "message"),
    [
        ("linux-riscv64", "onnx", None, "unknown platform 'linux-riscv64'"),
        ("linux-x86_64", "tensorrt", None, "unknown runtime 'tensorrt'"),
        ("linux-aarch64", "onnx", "3", "must look like 3.11"),
        ("linux-aarch64", "onnx", "3.11; rm -rf /", "must look like 3.11"),
    ],
)
def test_bad_targets_are_refused(
    platform: str, runtime: str, python: str | None, message: str
) -> None:
    with pytest.raises(packaging.UnsupportedTargetError, match=message):
        packaging.resolve_target(platform, runtime, python)


def test_default_python_is_311_on_arm_and_this_one_on_x86() -> None:
    assert packaging.resolve_target("linux-aarch64", "onnx").python == "3.11"
    assert packaging.resolve_target("linux-armv7l", "tflite").python == "3.11"
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert packaging.resolve_target("linux-x86_64", "onnx").python == here


def test_cli_refuses_onnx_on_armv7l_and_unknown_platforms(tmp_path: Path) -> None:
    config = _enrolled_dir(tmp_path / "cfg")
    base = ["agent", "package", "--config-dir", str(config), "--out", str(tmp_path / "o.tgz")]
    done = CliRunner().invoke(cli, [*base, "--platform", "linux-armv7l", "--runtime", "onnx"])
    assert done.exit_code == 1
    assert "onnxruntime publishes no wheel for 32-bit ARM" in done.output
    assert "[unsupported_target]" in done.output
    done = CliRunner().invoke(cli, [*base, "--platform", "linux-mips", "--runtime", "onnx"])
    assert done.exit_code == 2
    assert "linux-mips" in done.output
    assert not (tmp_path / "o.tgz").exists()


def test_incomplete_config_dirs_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(packaging.PackageConfigError, match=r"has no agent\.toml"):
        packaging.read_config_dir(empty)
    no_root = _enrolled_dir(tmp_path / "noroot")
    (no_root / "root.json").unlink()
    with pytest.raises(packaging.PackageConfigError, match=r"names root.json.*missing"):
        packaging.read_config_dir(no_root)
    untrusting = tmp_path / "untrusting"
    untrusting.mkdir()
    (untrusting / "agent.toml").write_text('device_id = "x"\nstate_dir = "/s"\n')
    with pytest.raises(packaging.PackageConfigError, match="neither trust_root"):
        packaging.read_config_dir(untrusting)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "agent.toml").write_text("device_id = [")
    with pytest.raises(packaging.PackageConfigError):
        packaging.read_config_dir(broken)


def test_unreachable_index_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = _local_options(tmp_path, _enrolled_dir(tmp_path / "cfg"))
    closed = free_port()  # nothing listens there
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for name in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL"):
        monkeypatch.delenv(name, raising=False)
    options = packaging.PackageOptions(
        **{
            **options.__dict__,
            "pip_args": ("--index-url", f"http://127.0.0.1:{closed}/simple"),
            "pip_timeout_s": 3.0,
        }
    )
    with pytest.raises(packaging.IndexUnreachableError, match="package index is unreachable"):
        packaging.build_package(options)
    assert not options.out.exists()
    # Building the edgefleet wheel itself needs the index too (its build backend).
    from_source = packaging.PackageOptions(
        **{**options.__dict__, "edgefleet_wheel": None, "source_dir": ROOT}
    )
    with pytest.raises(packaging.IndexUnreachableError, match="building the edgefleet wheel"):
        packaging.build_package(from_source)
    assert not options.out.exists()


def test_a_package_without_a_wheel_for_the_platform_is_named(tmp_path: Path) -> None:
    options = _local_options(tmp_path, _enrolled_dir(tmp_path / "cfg"), "linux-aarch64")
    index = Path(options.pip_args[-1])
    (index / "fakedep-1.2-py3-none-any.whl").unlink()
    _wheel(index, "fakedep", "1.2", [], "cp311-cp311-manylinux_2_28_x86_64")  # x86 only
    with pytest.raises(packaging.UnsatisfiableError, match=r"linux-aarch64.*fakedep>=1.0"):
        packaging.build_package(options)


# ------------------------------------------------------------------ pure parts
def _requires_dist() -> list[str]:
    """The real extras of pyproject.toml as Requires-Dist lines, like the built wheel has."""
    optional = read_toml(ROOT / "pyproject.toml", "pyproject")["project"]["optional-dependencies"]
    lines = []
    for extra, reqs in optional.items():
        for line in reqs:
            spec, _, marker = line.partition(";")
            condition = f'extra == "{extra}"'
            lines.append(
                f"{spec.strip()}; ({marker.strip()}) and {condition}"
                if marker
                else f"{spec.strip()}; {condition}"
            )
    return lines


def _names(requirements: list[str]) -> set[str]:
    return {Requirement(r).name for r in requirements}


def test_requirements_use_the_targets_markers() -> None:
    lines = _requires_dist()
    armv7 = packaging.resolve_target("linux-armv7l", "tflite")
    arm_reqs = packaging.target_requirements(lines, "agent-tflite", armv7.marker_env())
    assert "tflite-runtime>=2.14" in arm_reqs
    assert "numpy<2" in arm_reqs
    assert "cryptography<46.0.1" in arm_reqs
    assert {"onnxruntime", "ai-edge-litert", "sqlalchemy"}.isdisjoint(_names(arm_reqs))
    arm64 = packaging.resolve_target("linux-aarch64", "onnx")
    onnx_reqs = packaging.target_requirements(lines, "agent-onnx", arm64.marker_env())
    assert {"onnxruntime", "paho-mqtt", "tuf", "cryptography", "numpy"} <= _names(onnx_reqs)
    assert "cryptography<46.0.1" not in onnx_reqs
    assert {"tflite-runtime", "ai-edge-litert", "click"}.isdisjoint(_names(onnx_reqs))


def test_foreign_wheels_are_found() -> None:
    aarch64 = packaging.resolve_target("linux-aarch64", "onnx")
    armv7 = packaging.resolve_target("linux-armv7l", "tflite")
    names = [
        "paho_mqtt-2.2.0-py3-none-any.whl",
        "numpy-2.4.6-cp311-cp311-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl",
        "cryptography-50.0.2-cp311-abi3-manylinux_2_28_aarch64.whl",
        "numpy-2.4.6-cp311-cp311-manylinux_2_28_x86_64.whl",  # x86
        "numpy-2.4.6-cp312-cp312-manylinux_2_28_aarch64.whl",  # another Python
        "onnxruntime-1.32-cp311-cp311-manylinux_2_34_aarch64.whl",  # glibc newer than 2.28
        "not-a-wheel.whl",
    ]
    assert packaging.foreign_wheels(aarch64, names) == names[3:]
    assert packaging.foreign_wheels(
        armv7,
        ["tflite_runtime-2.14.0-cp311-cp311-manylinux_2_34_armv7l.whl", names[1]],
    ) == [names[1]]


def test_platforms_agree_with_the_platform_check() -> None:
    """The package command builds for what scripts/check_platforms.py checks (README table)."""
    spec = importlib.util.spec_from_file_location(
        "check_platforms_for_packaging", ROOT / "scripts" / "check_platforms.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    checked = {p.key: p for p in module.PLATFORMS}
    assert set(checked) == set(packaging.PLATFORMS)
    for key, ours in packaging.PLATFORMS.items():
        theirs = checked[key]
        assert (ours.arch, ours.glibc_minor, ours.os_provided) == (
            theirs.arch,
            theirs.glibc_minor,
            theirs.os_provided,
        ), key
        for runtime, extra in packaging.RUNTIMES.items():
            assert (runtime in ours.unavailable) == (extra not in theirs.extras), (key, runtime)
        if ours.default_python is not None:
            assert ours.default_python in theirs.pythons
        assert module.manylinux_tags(ours.arch, ours.glibc_minor) == packaging.manylinux_tags(
            ours.arch, ours.glibc_minor
        )


def test_the_unit_of_an_enrolled_device_loads_no_credential() -> None:
    text = UNIT.read_text()
    assert "LoadCredential=enrollment.json" in text  # else this test checks nothing
    enrolled = packaging.packaged_unit(text, "enrolled")
    assert not [ln for ln in enrolled.splitlines() if ln.startswith("LoadCredential=")]
    assert "ProtectSystem=strict" in enrolled
    assert packaging.packaged_unit(text, "token") == text


# ------------------------------------------------------------------ the archive (local index)
def test_archive_layout_and_modes(tmp_path: Path) -> None:
    options = _local_options(tmp_path, _token_dir(tmp_path / "cfg"))
    result = packaging.build_package(options)
    top = "edgefleet-agent-linux-x86_64-onnx"
    members = _members(result.out)
    assert set(members) == {
        f"{top}/install.sh", f"{top}/manifest.json", f"{top}/SHA256SUMS",
        f"{top}/systemd/edgefleet-agent.service",
        f"{top}/config/agent.toml", f"{top}/config/enrollment.json",
        f"{top}/wheelhouse/edgefleet-0.1.0-py3-none-any.whl",
        f"{top}/wheelhouse/fakedep-1.2-py3-none-any.whl",
    }  # fmt: skip
    assert members[f"{top}/install.sh"].mode == 0o755
    assert members[f"{top}/config/enrollment.json"].mode == 0o600
    assert members[f"{top}/config/agent.toml"].mode == 0o644
    manifest = json.loads(_read(result.out, f"{top}/manifest.json"))
    assert manifest["platform"] == "linux-x86_64"
    assert manifest["extra"] == "agent-onnx"
    assert manifest["device_id"] == "gw-0002"
    assert manifest["first_boot"] == "token"
    assert manifest["system_site_packages"] is False
    sums = _read(result.out, f"{top}/SHA256SUMS")
    assert {line.split()[1] for line in sums.splitlines()} == {
        w["file"] for w in manifest["wheels"]
    }
    # The token flow keeps LoadCredential (the unit as in deploy/).
    assert _read(result.out, f"{top}/systemd/edgefleet-agent.service") == UNIT.read_text()
    script = _read(result.out, f"{top}/install.sh")
    assert "--no-index" in script
    assert '"edgefleet[agent-onnx]"' in script
    assert "@" + "PYTHON@" not in script  # every placeholder was filled
    assert result.downloaded == 1  # fakedep into the cache; edgefleet was given
    again = packaging.build_package(options)
    assert again.downloaded == 0  # from the cache


def test_install_script_refuses_a_foreign_python_and_bad_options(tmp_path: Path) -> None:
    options = _local_options(tmp_path, _enrolled_dir(tmp_path / "cfg"), "linux-aarch64")
    result = packaging.build_package(options)
    with tarfile.open(result.out) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    script = tmp_path / "x" / "edgefleet-agent-linux-aarch64-onnx" / "install.sh"
    done = subprocess.run(
        [str(script), "--prefix", str(tmp_path / "p"), "--no-systemd", "--python", sys.executable],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    if sys.version_info[:2] == (3, 11):
        assert "this package is for linux-aarch64" in done.stderr
    else:
        assert "holds wheels for CPython 3.11" in done.stderr
    assert not (tmp_path / "p" / "opt").exists()
    done = subprocess.run(
        [str(script), "--bogus"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert "unknown option --bogus" in done.stderr
    done = subprocess.run(
        [str(script), "--prefix", str(tmp_path / "p")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "add --no-systemd" in done.stderr


# ------------------------------------------------------------------ slow: the real index
@pytest.fixture(scope="module")
def cache_dir() -> Path:
    """Downloads kept across runs (``$EDGEFLEET_PACKAGE_CACHE`` or a fixed temp directory)."""
    explicit = os.environ.get(packaging.CACHE_ENV)
    path = Path(explicit) if explicit else Path(tempfile.gettempdir()) / "edgefleet-test-packages"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def edgefleet_wheel(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """The edgefleet wheel of this tree, built once for the slow tests."""
    work = tmp_path_factory.mktemp("wheel")
    options = packaging.PackageOptions(
        target=packaging.resolve_target("linux-x86_64", "onnx"),
        config_dir=work, out=work / "unused", cache_dir=cache_dir, unit_file=UNIT,
    )  # fmt: skip
    try:
        return packaging.build_edgefleet_wheel(ROOT, work, options)
    except packaging.PackagingError as exc:
        if "unreachable" in str(exc) or "Connection" in str(exc):
            pytest.skip(f"no package index reachable to build the wheel: {exc}")
        raise


def _build_or_skip(options: packaging.PackageOptions) -> packaging.PackageResult:
    try:
        return packaging.build_package(options)
    except packaging.IndexUnreachableError as exc:
        pytest.skip(f"needs this machine's package index: {exc}")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("platform", "runtime"), [("linux-aarch64", "onnx"), ("linux-armv7l", "tflite")]
)
def test_arm_archives_hold_only_wheels_for_their_platform(
    tmp_path: Path, cache_dir: Path, edgefleet_wheel: Path, platform: str, runtime: str
) -> None:
    target = packaging.resolve_target(platform, runtime)
    result = _build_or_skip(
        packaging.PackageOptions(
            target=target,
            config_dir=_enrolled_dir(tmp_path / "cfg"),
            out=tmp_path / "gw.tgz",
            cache_dir=cache_dir,
            unit_file=UNIT,
            edgefleet_wheel=edgefleet_wheel,
        )
    )
    wheels = [Path(n).name for n in _members(result.out) if "/wheelhouse/" in n]
    assert len(wheels) == len(result.wheels) >= 6
    assert packaging.foreign_wheels(target, wheels) == []
    arch = target.platform.arch
    native = [w for w in wheels if not w.endswith("-none-any.whl")]
    assert native and all(w.endswith(f"_{arch}.whl") for w in native), native
    names = {w.split("-")[0].lower() for w in wheels}
    if platform == "linux-armv7l":
        # numpy and cffi come from the OS; no onnxruntime anywhere.
        assert {"tflite_runtime", "cryptography"} <= names
        assert names.isdisjoint({"numpy", "cffi", "onnxruntime", "ai_edge_litert"})
        assert (
            json.loads(_read(result.out, "edgefleet-agent-linux-armv7l-tflite/manifest.json"))[
                "system_site_packages"
            ]
            is True
        )
    else:
        assert {"onnxruntime", "numpy", "cryptography"} <= names
        assert "tflite_runtime" not in names


def _no_network_prefix() -> list[str]:
    """``unshare --net`` (no interfaces but a down loopback) where this machine allows it."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    probe = subprocess.run([unshare, "--net", "true"], capture_output=True, check=False)
    return [unshare, "--net"] if probe.returncode == 0 else []


@pytest.fixture
def mosquitto_harness(tmp_path: Path, mosquitto: BrokerSettings) -> Iterator[Harness]:
    h = Harness(tmp_path, mosquitto, f"sqlite:///{tmp_path / 'registry.db'}")
    yield h
    h.close()


@pytest.mark.slow
@pytest.mark.mosquitto
@pytest.mark.timeout(900)
def test_x86_package_installs_offline_and_serves(
    tmp_path: Path, cache_dir: Path, mosquitto_harness: Harness
) -> None:
    h = mosquitto_harness
    device_id = h.enroll("pkg")
    http_port = free_port()
    config = _enrolled_dir(
        tmp_path / "cfg", device_id,
        state_dir=str(tmp_path / "state"), telemetry_interval_s="0.5", retry_backoff_s="0.5",
    )  # fmt: skip
    shutil.copy(h.root_file, config / "root.json")
    with (config / "agent.toml").open("a") as f:
        f.write(
            f'\n[broker]\nhost = "{h.broker.host}"\nport = {h.broker.port}\n'
            f'\n[http]\nhost = "127.0.0.1"\nport = {http_port}\n'
        )
    out = tmp_path / "gw.tar.gz"
    # The real command, building the edgefleet wheel from this tree.
    done = CliRunner().invoke(
        cli,
        [
            "agent",
            "package",
            "--platform",
            "linux-x86_64",
            "--runtime",
            "onnx",
            "--config-dir",
            str(config),
            "--out",
            str(out),
            "--cache-dir",
            str(cache_dir),
            "--json",
        ],
    )
    if done.exit_code != 0 and "[index_unreachable]" in done.output:
        pytest.skip(f"needs this machine's package index: {done.output.strip()}")
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)
    assert report["platform"] == "linux-x86_64"
    assert {"onnxruntime", "edgefleet"} <= {w["file"].split("-")[0] for w in report["wheels"]}

    unpacked = tmp_path / "unpacked"
    with tarfile.open(out) as tar:
        tar.extractall(unpacked, filter="data")
    script = unpacked / "edgefleet-agent-linux-x86_64-onnx" / "install.sh"
    prefix = tmp_path / "gateway"
    closed = free_port()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        # If anything still tried an index, it would meet a closed port.
        "PIP_INDEX_URL": f"http://127.0.0.1:{closed}/simple",
        "PIP_EXTRA_INDEX_URL": f"http://127.0.0.1:{closed}/simple",
        "no_proxy": "*",
    }
    python = shutil.which("python3", path=os.environ["PATH"])
    assert python is not None
    done_install = subprocess.run(
        [*_no_network_prefix(), str(script), "--prefix", str(prefix), "--no-systemd",
         "--python", python],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert done_install.returncode == 0, done_install.stdout + done_install.stderr
    venv = prefix / "opt" / "edgefleet"
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import importlib.util as u; print(bool(u.find_spec('onnxruntime')), "
         "bool(u.find_spec('ai_edge_litert')), bool(u.find_spec('sqlalchemy')))"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert probe.stdout.split() == ["True", "False", "False"]
    installed_config = prefix / "etc" / "edgefleet" / "agent.toml"
    assert installed_config.is_file()

    log = (tmp_path / "agent.log").open("w")
    agent = subprocess.Popen(
        [str(venv / "bin" / "edgefleet-agent"), "--config", str(installed_config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
    )
    try:
        wait_for(lambda: h.summary("pkg").online, 60, "the installed agent to come online")
        h.register("1.0.0")
        h.deploy("1.0.0", "pkg")
        wait_for(
            lambda: h.summary("pkg").active_version == "1.0.0", 90,
            "the installed agent to install 1.0.0",
        )  # fmt: skip
        model = build_demo_model()
        inputs, _ = inspect_onnx(model)
        width = inputs[0].shape[1]
        assert isinstance(width, int)
        features = [[0.25 * (i % 4) for i in range(width)]]
        body = json.dumps({"inputs": {"features": features}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/v1/infer", data=body,
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
        import onnxruntime as ort

        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        expected = session.run(None, {"features": np.asarray(features, dtype=np.float32)})
        (name,) = answer["outputs"]
        np.testing.assert_allclose(np.asarray(answer["outputs"][name]), expected[0], rtol=1e-5)
        wait_for(lambda: h.summary("pkg").inferences >= 1, 30, "telemetry with the inference")
        info = h.registry.get_device(device_id)
        assert info is not None and info.arch == "x86_64"
        assert "onnxruntime" in info.runtimes
    except AssertionError as exc:
        log.flush()
        agent_log = (tmp_path / "agent.log").read_text()[-4000:]
        raise AssertionError(f"{exc}\nagent log:\n{agent_log}") from None
    finally:
        agent.terminate()
        try:
            agent.wait(30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(10)
        log.close()
    assert agent.returncode == 0, (tmp_path / "agent.log").read_text()[-3000:]
