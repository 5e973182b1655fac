"""The registry stands below the rollout package: importing it never loads ``rollout``.

``RolloutStore`` used to live in ``registry/rollouts.py`` and import the
rollout engine while the rollout runner imported it back - a cycle. The
rollout package may build on the registry; this keeps the reverse edge out.
A fresh interpreter is used because this test process has imported both.
"""

from __future__ import annotations

import subprocess
import sys

# Every module of the registry package; migrations/env.py runs Alembic when
# imported, so the migrations subpackage is only imported, not walked.
_PROBE = """
import importlib
import pkgutil
import sys
import edgefleet.controller.registry as registry
for info in pkgutil.iter_modules(registry.__path__, registry.__name__ + "."):
    importlib.import_module(info.name)
loaded = sorted(m for m in sys.modules if m.startswith("edgefleet.controller.rollout"))
print(",".join(loaded))
"""


def test_importing_the_registry_loads_no_rollout_module() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""
