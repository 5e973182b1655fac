"""What the layer contracts cannot see: what importing a module loads at run time.

import-linter (``scripts/lint-imports``) checks the import graph, but importing
``edgefleet.controller.compiler.profiles`` also runs the package's
``__init__``, which is not an edge in that graph. These tests import in a
fresh interpreter and look at ``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _loaded_after(module: str, watch: tuple[str, ...]) -> list[str]:
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        f"print(json.dumps(sorted(m for m in {list(watch)!r} if m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120
    )
    loaded: list[str] = json.loads(out.stdout)
    return loaded


@pytest.mark.parametrize(
    "module",
    [
        "edgefleet.controller.service",
        "edgefleet.controller.catalog",
        "edgefleet.controller.config",
        "edgefleet.controller.compiler",
    ],
)
def test_the_service_side_does_not_load_the_cli(module: str) -> None:
    assert _loaded_after(module, ("click",)) == []


def test_the_agent_loads_nothing_of_the_controller() -> None:
    watch = ("edgefleet.controller", "sqlalchemy", "alembic", "click", "onnx")
    assert _loaded_after("edgefleet.agent.daemon", watch) == []
    assert _loaded_after("edgefleet.agent.cli", watch) == []


def test_the_shared_layer_loads_neither_side() -> None:
    watch = ("edgefleet.controller", "edgefleet.agent", "sqlalchemy", "click")
    for module in (
        "edgefleet.shared.link",
        "edgefleet.shared.runtime",
        "edgefleet.shared.hardware",
    ):
        assert _loaded_after(module, watch) == []
