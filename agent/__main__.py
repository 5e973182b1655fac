"""``python -m edgefleet.agent --config FILE``: the same entry point as ``edgefleet-agent``.

The controller's demo runs each agent this way, as its own process, so the
controller never imports the agent (docs/architecture.md, layers).
"""

from __future__ import annotations

import sys

from edgefleet.agent.cli import main

if __name__ == "__main__":
    sys.exit(main())
