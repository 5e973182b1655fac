"""The agent core is runtime-neutral (issue 12): ``edgefleet[agent]`` has no inference runtime.

A TFLite-only gateway must not need onnxruntime, and a gateway with no runtime at all
must still start, report that it has none, and refuse a bundle it cannot load with
``unsupported_runtime`` instead of crashing. The runtimes are hidden in a child
interpreter (``sys.modules[name] = None`` makes both ``import`` and
``importlib.util.find_spec`` see them as absent), so this runs on a full dev install.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgefleet.agent.install import Installer
from edgefleet.agent.serving import ModelHolder
from edgefleet.agent.slots import SlotStore
from edgefleet.protocols.bundle import TargetCustom, TensorSpec
from edgefleet.protocols.errors import UnsupportedRuntimeError
from edgefleet.protocols.messages import HardwareInfo, ModelRef

RUNTIME_MODULES = ("onnxruntime", "ai_edge_litert", "tflite_runtime")

_CHILD = """
import json, sys
for name in {hide!r}:
    sys.modules[name] = None
import edgefleet.agent.daemon, edgefleet.agent.install, edgefleet.agent.serving
from edgefleet.protocols.errors import UnsupportedRuntimeError
from edgefleet.shared.hardware import detect_hardware
from edgefleet.shared.runtime import available_runtimes, get_backend
available, hardware = list(available_runtimes()), list(detect_hardware().runtimes)
loaded = sorted(m for m in {all_runtimes!r} if sys.modules.get(m) is not None)
refusals = {{}}
for runtime in ("onnxruntime", "tflite"):
    try:
        get_backend(runtime)
    except UnsupportedRuntimeError as exc:
        refusals[runtime] = [exc.code, str(exc)]
print(json.dumps({{
    "available": available,
    "hardware": hardware,
    "refusals": refusals,
    "loaded": loaded,
}}))
"""


def _child(hide: tuple[str, ...]) -> dict[str, object]:
    code = _CHILD.format(hide=hide, all_runtimes=RUNTIME_MODULES)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout.splitlines()[-1])
    return result


def test_agent_imports_and_reports_no_runtime_when_none_is_installed() -> None:
    result = _child(RUNTIME_MODULES)
    assert result["available"] == []
    assert result["hardware"] == []
    refusals = result["refusals"]
    assert isinstance(refusals, dict)
    assert refusals["onnxruntime"][0] == "unsupported_runtime"
    assert "edgefleet[agent-onnx]" in refusals["onnxruntime"][1]
    assert refusals["tflite"][0] == "unsupported_runtime"
    assert "edgefleet[agent-tflite]" in refusals["tflite"][1]


def test_tflite_only_agent_does_not_need_onnxruntime() -> None:
    pytest.importorskip("ai_edge_litert")
    result = _child(("onnxruntime",))
    assert result["available"] == ["tflite"]
    assert result["hardware"] == ["tflite"]


def test_importing_the_agent_loads_no_runtime() -> None:
    """Only the runtime a bundle needs is imported, when it is loaded (footprint)."""
    assert _child(())["loaded"] == []


def _custom(runtime: str) -> dict[str, object]:
    spec = TensorSpec("x", "float32", (1, 4))
    return TargetCustom(
        "m", "1.0", 1, runtime, "fp32", "generic", (spec,), (spec,)
    ).to_dict()


@pytest.mark.parametrize("runtimes", [(), ("tflite",)])
def test_bundle_for_a_missing_runtime_is_refused(tmp_path: Path, runtimes: tuple[str, ...]) -> None:
    hardware = HardwareInfo("armv7l", (), runtimes)
    # The check runs before any download, so no fetcher (and no broker) is needed.
    installer = Installer(tmp_path, None, SlotStore(tmp_path), ModelHolder(), hardware)  # type: ignore[arg-type]
    want = ModelRef("m", "1.0", 1, "m/1.0/bundle.tar")
    with pytest.raises(UnsupportedRuntimeError, match="needs runtime 'onnxruntime'") as info:
        installer._check_custom(want, _custom("onnxruntime"))
    assert info.value.code == "unsupported_runtime"
    if runtimes:
        assert installer._check_custom(want, _custom("tflite")).runtime == "tflite"
