"""The pure parts of ``scripts/check_platforms.py`` (issue 12), no index needed.

The script's verdict rests on two things pip gets wrong for a foreign platform:
markers evaluated for the *target* (pip uses the host's, pypa/pip#11664) and the
full manylinux tag list of the target's glibc. Both are checked here against the
real pyproject.toml, so a change to the agent extras that breaks the documented
armv7l or TFLite-only promise fails here even where no index is reachable.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "check_platforms.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_platforms", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_platforms"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


cp = _load()


@pytest.fixture(scope="module")
def extras() -> dict[str, list[str]]:
    result: dict[str, list[str]] = cp.read_extras(ROOT / "pyproject.toml")
    return result


def _names(reqs: list[str]) -> list[str]:
    return [r.split("<")[0].split(">")[0].split("=")[0].split("!")[0] for r in reqs]


def test_manylinux_tags_include_every_older_glibc() -> None:
    tags = cp.manylinux_tags("aarch64", 28)
    assert tags[0] == "manylinux_2_28_aarch64"
    assert "manylinux_2_17_aarch64" in tags
    assert tags[-1] == "manylinux2014_aarch64"
    assert not any("2_29" in t or "2_16" in t for t in tags)
    x86 = cp.manylinux_tags("x86_64", 28)
    assert {"manylinux2010_x86_64", "manylinux1_x86_64", "manylinux_2_5_x86_64"} <= set(x86)


def test_agent_core_has_no_runtime_on_any_platform(extras: dict[str, list[str]]) -> None:
    for arch in ("x86_64", "aarch64", "armv7l"):
        names = _names(cp.extra_requirements(extras, "agent", cp.marker_env(arch, "3.11")))
        assert {"paho-mqtt", "tuf", "cryptography", "numpy"} <= set(names)
        assert not {"onnxruntime", "ai-edge-litert", "tflite-runtime"} & set(names)


def test_tflite_extra_markers_are_evaluated_for_the_target(extras: dict[str, list[str]]) -> None:
    arm32 = cp.extra_requirements(extras, "agent-tflite", cp.marker_env("armv7l", "3.11"))
    assert "tflite-runtime>=2.14" in arm32
    assert "numpy<2" in arm32
    assert "cryptography<46.0.1" in arm32  # the last one that accepts the OS's cffi 1.15
    assert "ai-edge-litert" not in _names(arm32)
    assert "onnxruntime" not in _names(arm32)
    arm64 = cp.extra_requirements(extras, "agent-tflite", cp.marker_env("aarch64", "3.11"))
    assert "ai-edge-litert>=1.0" in arm64
    assert not {"tflite-runtime", "onnxruntime"} & set(_names(arm64))
    assert "numpy<2" not in arm64 and "cryptography<46.0.1" not in arm64


def test_onnx_extra_expands_the_core(extras: dict[str, list[str]]) -> None:
    reqs = cp.extra_requirements(extras, "agent-onnx", cp.marker_env("aarch64", "3.12"))
    assert "onnxruntime>=1.18" in reqs
    assert "tuf<8,>=6.0" in reqs or "tuf>=6.0,<8" in reqs
    assert not any(r.startswith("edgefleet") for r in reqs)


def test_all_extra_keeps_both_runtimes(extras: dict[str, list[str]]) -> None:
    names = _names(cp.extra_requirements(extras, "all", cp.marker_env("x86_64", "3.11")))
    assert {"onnxruntime", "ai-edge-litert", "sqlalchemy", "amqtt"} <= set(names)


def test_missing_for_target_re_evaluates_dependency_markers() -> None:
    """The real case: cryptography needs typing-extensions only below Python 3.11."""
    installs = [
        {
            "metadata": {
                "name": "cryptography",
                "version": "50.0.2",
                "requires_dist": [
                    "cffi>=2.0.0; platform_python_implementation != 'PyPy'",
                    "typing-extensions>=4.13.2; python_full_version < '3.11'",
                    "pytest>=7; extra == 'test'",
                ],
            }
        },
        {"metadata": {"name": "CFFI", "version": "2.1.1", "requires_dist": ["pycparser"]}},
        {"metadata": {"name": "pycparser", "version": "2.22"}},
    ]
    assert cp.missing_for_target(installs, cp.marker_env("x86_64", "3.10")) == [
        "typing-extensions>=4.13.2"
    ]
    assert cp.missing_for_target(installs, cp.marker_env("x86_64", "3.11")) == []


def test_stub_wheel_is_a_valid_metadata_only_wheel(tmp_path: Path) -> None:
    path = cp.stub_wheel(tmp_path, "numpy", "1.24.2")
    assert path.name == "numpy-1.24.2-py3-none-any.whl"
    with zipfile.ZipFile(path) as archive:
        meta = archive.read("numpy-1.24.2.dist-info/METADATA").decode()
        assert "Name: numpy\nVersion: 1.24.2" in meta
        assert "numpy-1.24.2.dist-info/RECORD" in archive.namelist()


def test_missing_extra_exits_2_and_unreadable_file_too(tmp_path: Path) -> None:
    bad = tmp_path / "pyproject.toml"
    bad.write_text('[project]\nname = "x"\n[project.optional-dependencies]\nagent = []\n')
    assert cp.main(["--pyproject", str(bad)]) == 2
    assert cp.main(["--pyproject", str(tmp_path / "absent.toml")]) == 2


def test_unreachable_index_is_a_clear_skip(tmp_path: Path) -> None:
    """Offline-tolerant: no index -> exit 0 with 'skipped: no package index reachable'."""
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--probe-timeout", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        # Port 9 on loopback: nothing listens, so the probe fails at once.
        env={"EDGEFLEET_PLATFORM_INDEX": "http://127.0.0.1:9/simple/", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("skipped: no package index reachable (http://127.0.0.1:9/simple/")
