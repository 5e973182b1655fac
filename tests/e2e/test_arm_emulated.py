"""The agent on 64-bit ARM, emulated: the offline package installed and run under qemu-user.

An arm64 Debian root (made by ``scripts/arm_env.sh`` with debootstrap) runs through
the kernel's binfmt_misc and Debian's ``qemu-user-static``. Into it goes the
``linux-aarch64`` package of this tree, installed with no network (``unshare
--net``), and the installed agent then runs, an arm64 process, against a
Mosquitto and a controller on this machine: it installs a bundle, answers an
inference (checked against onnxruntime on this x86 host) and reports
telemetry. ``QEMU_CPU`` picks the emulated core, so CPU-feature detection is
checked on a real (emulated) ARM CPU: a Cortex-A76 has the dot-product
instructions (profile ``arm64-dotprod``), a Cortex-A53 has not (``arm64-basic``).

The 32-bit test does the same for the ``linux-armv7l`` TFLite package in an
armhf root with Debian's numpy and cffi: offline install, TFLite inference on
the emulated core (checked against LiteRT on this host), no onnxruntime, and
the agent reporting ``armv7l``/``neon``/``tflite`` to the controller.

Skipped, with the reason, when this machine cannot emulate (not root, no
binfmt_misc entry, no ARM root, ``EDGEFLEET_ARM_EMULATION=0``);
``scripts/arm_env.sh [arm64] [armhf]`` sets it up, and ``.ci/run`` calls it
for both.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgefleet.controller import packaging
from edgefleet.controller.broker import free_port
from edgefleet.controller.bundle import inspect_onnx
from edgefleet.controller.compiler.profiles import match_profile
from edgefleet.controller.demo_model import build_demo_model
from edgefleet.protocols.messages import HardwareInfo
from edgefleet.shared.link import BrokerSettings
from tests.e2e.harness import Harness, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto]

REPO = Path(__file__).resolve().parents[2]
ROOT_ENV = "EDGEFLEET_ARM64_ROOT"
DEFAULT_ROOT = Path("/var/cache/edgefleet-arm/bookworm-arm64")
ARMHF_ROOT_ENV = "EDGEFLEET_ARMHF_ROOT"
DEFAULT_ARMHF_ROOT = Path("/var/cache/edgefleet-arm/bookworm-armhf")
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")


def emulation_unavailable(qemu: str = "qemu-aarch64", root: Path | None = None) -> str | None:
    """Why this machine cannot run the ARM root, or None when it can."""
    if os.environ.get("EDGEFLEET_ARM_EMULATION") == "0":
        return "EDGEFLEET_ARM_EMULATION=0"
    if platform.system() != "Linux":
        return f"needs Linux (binfmt_misc), this is {platform.system()}"
    if os.geteuid() != 0:
        return "needs root (chroot into the ARM root, unshare for /proc and no network)"
    for tool in ("unshare", "chroot"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    entry = BINFMT_DIR / qemu
    if not entry.exists():
        return (
            f"no binfmt_misc entry {entry} (qemu-user-static not installed or binfmt_misc "
            "not mounted); run scripts/arm_env.sh"
        )
    if "enabled" not in entry.read_text():
        return f"{entry} is disabled"
    root = root or arm_root()
    if not (root / "usr" / "bin" / "python3").exists():
        return f"no ARM root with python3 at {root}; run scripts/arm_env.sh"
    return None


def arm_root() -> Path:
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def armhf_root() -> Path:
    return Path(os.environ.get(ARMHF_ROOT_ENV) or DEFAULT_ARMHF_ROOT)


def in_root(root: Path, argv: list[str], *, network: bool = True) -> list[str]:
    """Run ``argv`` inside ``root``, with a private /proc (never /sys) and maybe no network."""
    flags = ["--mount", "--propagation", "private"] + ([] if network else ["--net"])
    quoted = " ".join(f"'{a}'" for a in argv)
    script = f"mount -t proc proc '{root}/proc' && exec chroot '{root}' {quoted}"
    return ["unshare", *flags, "sh", "-c", script]


def _workdir(root: Path) -> Iterator[tuple[Path, Path]]:
    # A path inside the root (as the emulated programs see it), unique per test.
    work = Path("/srv") / f"edgefleet-e2e-{secrets.token_hex(4)}"
    (root / work.relative_to("/")).mkdir(parents=True)
    try:
        yield root, work
    finally:
        shutil.rmtree(root / work.relative_to("/"), ignore_errors=True)


@pytest.fixture
def arm64() -> Iterator[tuple[Path, Path]]:
    """``(root, workdir)``: a fresh directory inside the arm64 root, removed afterwards."""
    why = emulation_unavailable()
    if why is not None:
        pytest.skip(f"ARM emulation unavailable: {why}")
    yield from _workdir(arm_root())


@pytest.fixture
def armhf() -> Iterator[tuple[Path, Path]]:
    """The same in the armhf (32-bit, armv7l) root (``scripts/arm_env.sh armhf``)."""
    why = emulation_unavailable("qemu-arm", armhf_root())
    if why is not None:
        pytest.skip(f"32-bit ARM emulation unavailable: {why} (scripts/arm_env.sh armhf)")
    yield from _workdir(armhf_root())


@pytest.fixture
def mosquitto_harness(tmp_path: Path, mosquitto: BrokerSettings) -> Iterator[Harness]:
    h = Harness(tmp_path, mosquitto, f"sqlite:///{tmp_path / 'registry.db'}")
    yield h
    h.close()


def _cache_dir() -> Path:
    explicit = os.environ.get(packaging.CACHE_ENV)
    path = Path(explicit) if explicit else Path(tempfile.gettempdir()) / "edgefleet-test-packages"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _hardware_in_root(root: Path, python: str, cpu: str) -> HardwareInfo:
    """What the installed agent's hardware detection says on the emulated ``cpu``."""
    code = (
        "import json, dataclasses; from edgefleet.shared.hardware import detect_hardware; "
        "print(json.dumps(dataclasses.asdict(detect_hardware())))"
    )
    done = subprocess.run(
        in_root(root, [python, "-c", code]),
        capture_output=True,
        text=True,
        env={**os.environ, "QEMU_CPU": cpu},
        timeout=300,
        check=True,
    )
    raw = json.loads(done.stdout.strip().splitlines()[-1])
    return HardwareInfo(
        arch=raw["arch"],
        cpu_features=tuple(raw["cpu_features"]),
        runtimes=tuple(raw["runtimes"]),
        hardware_class=raw["hardware_class"],
    )


# Under emulation the offline install alone takes 2-4 minutes on a busy 2-core machine.
@pytest.mark.timeout(1800)
def test_aarch64_package_runs_under_emulation(
    tmp_path: Path, arm64: tuple[Path, Path], mosquitto_harness: Harness
) -> None:
    root, work = arm64
    host_work = root / work.relative_to("/")
    h = mosquitto_harness
    device_id = h.enroll("arm64")
    http_port = free_port()

    config = tmp_path / "cfg"
    config.mkdir()
    shutil.copy(h.root_file, config / "root.json")
    (config / "agent.toml").write_text(
        f'device_id = "{device_id}"\nstate_dir = "{work}/state"\ntrust_root = "root.json"\n'
        "telemetry_interval_s = 0.5\nretry_backoff_s = 0.5\n\n"
        f'[broker]\nhost = "127.0.0.1"\nport = {h.broker.port}\nconnect_timeout_s = 30\n\n'
        f'[http]\nhost = "127.0.0.1"\nport = {http_port}\n\n'
        "[transfer]\nrequest_timeout_s = 20\n"
    )
    target = packaging.resolve_target("linux-aarch64", "onnx")
    try:
        result = packaging.build_package(
            packaging.PackageOptions(
                target=target,
                config_dir=config,
                out=tmp_path / "gw.tar.gz",
                cache_dir=_cache_dir(),
                unit_file=REPO / "deploy" / "edgefleet-agent.service",
                source_dir=REPO,
            )
        )
    except packaging.IndexUnreachableError as exc:
        pytest.skip(f"needs this machine's package index to build the package: {exc}")
    assert packaging.foreign_wheels(target, [w.file for w in result.wheels]) == []
    with tarfile.open(result.out) as tar:
        tar.extractall(host_work, filter="data")

    # Offline: a network namespace with no interfaces; pip has only the wheelhouse.
    installed = subprocess.run(
        in_root(
            root,
            [
                f"{work}/edgefleet-agent-linux-aarch64-onnx/install.sh",
                "--prefix",
                f"{work}/gw",
                "--no-systemd",
            ],
            network=False,
        ),
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    python = f"{work}/gw/opt/edgefleet/bin/python"
    machine = subprocess.run(
        in_root(root, [python, "-c", "import platform; print(platform.machine())"]),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert machine.stdout.strip() == "aarch64"  # really the arm64 interpreter

    # CPU features of two emulated cores, and the profile the controller picks from them.
    a53 = _hardware_in_root(root, python, "cortex-a53")
    assert a53.arch == "arm64"
    assert "asimd" in a53.cpu_features and "asimddp" not in a53.cpu_features
    assert match_profile(a53).name == "arm64-basic"

    log_path = tmp_path / "agent.log"
    with log_path.open("w") as log:
        agent = subprocess.Popen(
            in_root(
                root,
                [
                    f"{work}/gw/opt/edgefleet/bin/edgefleet-agent",
                    "--config",
                    f"{work}/gw/etc/edgefleet/agent.toml",
                ],
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "QEMU_CPU": "cortex-a76"},
        )
        try:
            wait_for(lambda: h.summary("arm64").online, 180, "the emulated agent to come online")
            wait_for(
                lambda: h.summary("arm64").profile is not None,
                60,
                "the emulated agent's hardware report",
            )
            info = h.registry.get_device(device_id)
            assert info is not None
            assert info.arch == "arm64"
            assert {"asimd", "asimddp", "asimdhp"} <= set(info.cpu_features)
            assert not {"avx2", "sse4_2", "i8mm"} & set(info.cpu_features)
            assert info.runtimes == ("onnxruntime",)
            assert h.summary("arm64").profile == "arm64-dotprod"

            h.register("1.0.0")
            h.deploy("1.0.0", "arm64")
            wait_for(
                lambda: h.summary("arm64").active_version == "1.0.0",
                300,
                "the emulated agent to install 1.0.0",
            )
            model = build_demo_model()
            inputs, _ = inspect_onnx(model)
            width = inputs[0].shape[1]
            assert isinstance(width, int)
            features = [[0.1 * i for i in range(width)], [1.0] * width]
            request = urllib.request.Request(
                f"http://127.0.0.1:{http_port}/v1/infer",
                data=json.dumps({"inputs": {"features": features}}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=120) as response:
                answer = json.loads(response.read())
            import onnxruntime as ort

            session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
            expected = session.run(None, {"features": np.asarray(features, dtype=np.float32)})
            (name,) = answer["outputs"]
            got = np.asarray(answer["outputs"][name])
            np.testing.assert_allclose(got, expected[0], rtol=1e-4, atol=1e-6)
            wait_for(lambda: h.summary("arm64").inferences >= 1, 120, "telemetry from ARM")
        except AssertionError as exc:
            log.flush()
            raise AssertionError(f"{exc}\nagent log:\n{log_path.read_text()[-4000:]}") from None
        finally:
            agent.terminate()
            try:
                agent.wait(60)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait(10)
    assert agent.returncode == 0, log_path.read_text()[-4000:]


_ARMV7_PROBE = """
import dataclasses, importlib.util, json, sys
import numpy as np
from pathlib import Path
from edgefleet.shared.hardware import detect_hardware
from edgefleet.shared.runtime import get_backend
images = np.load(sys.argv[2])
model = get_backend("tflite").load(Path(sys.argv[1]))
out = model.run({model.inputs[0].name: images})
print(json.dumps({
    "hardware": dataclasses.asdict(detect_hardware()),
    "numpy": [np.__version__, np.__file__],
    "onnxruntime": importlib.util.find_spec("onnxruntime") is not None,
    "outputs": {k: v.tolist() for k, v in out.items()},
}))
"""


@pytest.mark.timeout(1800)
def test_armv7l_tflite_package_installs_offline_and_runs(
    tmp_path: Path, armhf: tuple[Path, Path], mosquitto_harness: Harness
) -> None:
    from edgefleet.shared.runtime import get_backend
    from tests.tflite_fixture import FIXTURE, quadrant_images

    root, work = armhf
    host_work = root / work.relative_to("/")
    h = mosquitto_harness
    device_id = h.enroll("armv7")
    config = tmp_path / "cfg"
    config.mkdir()
    shutil.copy(h.root_file, config / "root.json")
    (config / "agent.toml").write_text(
        f'device_id = "{device_id}"\nstate_dir = "{work}/state"\ntrust_root = "root.json"\n'
        "telemetry_interval_s = 0.5\n\n"
        f'[broker]\nhost = "127.0.0.1"\nport = {h.broker.port}\nconnect_timeout_s = 30\n\n'
        f'[http]\nhost = "127.0.0.1"\nport = {free_port()}\n'
    )
    target = packaging.resolve_target("linux-armv7l", "tflite")
    try:
        result = packaging.build_package(
            packaging.PackageOptions(
                target=target,
                config_dir=config,
                out=tmp_path / "gw.tar.gz",
                cache_dir=_cache_dir(),
                unit_file=REPO / "deploy" / "edgefleet-agent.service",
                source_dir=REPO,
            )
        )
    except packaging.IndexUnreachableError as exc:
        pytest.skip(f"needs this machine's package index to build the package: {exc}")
    with tarfile.open(result.out) as tar:
        tar.extractall(host_work, filter="data")
    installed = subprocess.run(
        in_root(
            root,
            [
                f"{work}/edgefleet-agent-linux-armv7l-tflite/install.sh",
                "--prefix",
                f"{work}/gw",
                "--no-systemd",
            ],
            network=False,
        ),
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr

    # TFLite inference on the emulated 32-bit core, against LiteRT on this host.
    images, _labels = quadrant_images(16, seed=12)
    np.save(host_work / "images.npy", images)
    shutil.copy(FIXTURE, host_work / "model.tflite")
    probe = subprocess.run(
        in_root(
            root,
            [
                f"{work}/gw/opt/edgefleet/bin/python",
                "-c",
                _ARMV7_PROBE,
                f"{work}/model.tflite",
                f"{work}/images.npy",
            ],
        ),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert found["hardware"]["arch"] == "armv7l"
    assert "neon" in found["hardware"]["cpu_features"]
    assert found["hardware"]["runtimes"] == ["tflite"]
    assert found["onnxruntime"] is False
    assert found["numpy"][0] == "1.24.2"  # Debian's, through --system-site-packages
    assert found["numpy"][1].startswith("/usr/lib/python3/dist-packages/")
    host = get_backend("tflite").load(FIXTURE)
    expected = host.run({host.inputs[0].name: images})
    for name, value in expected.items():
        np.testing.assert_allclose(np.asarray(found["outputs"][name]), value, atol=1e-5)

    # The installed agent connects and reports its hardware and runtimes.
    log_path = tmp_path / "agent.log"
    with log_path.open("w") as log:
        agent = subprocess.Popen(
            in_root(
                root,
                [
                    f"{work}/gw/opt/edgefleet/bin/edgefleet-agent",
                    "--config",
                    f"{work}/gw/etc/edgefleet/agent.toml",
                ],
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(
                lambda: (
                    (info := h.registry.get_device(device_id)) is not None and info.arch == "armv7l"
                ),
                180,
                "the emulated armv7l agent's hardware report",
            )
            info = h.registry.get_device(device_id)
            assert info is not None
            assert info.runtimes == ("tflite",)
            assert "neon" in info.cpu_features
            assert h.summary("armv7").online
        except AssertionError as exc:
            log.flush()
            raise AssertionError(f"{exc}\nagent log:\n{log_path.read_text()[-4000:]}") from None
        finally:
            agent.terminate()
            try:
                agent.wait(60)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait(10)
    assert agent.returncode == 0, log_path.read_text()[-4000:]
