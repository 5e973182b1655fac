"""``edgefleet agent run``: the agent's own entry point, in this process, without importing it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edgefleet.controller.cli.agent import AGENT_MODULE, agent_argv


def test_agent_run_becomes_the_agent_process(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("device_id = [")  # invalid: the agent itself must say so
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from edgefleet.controller.cli import main; main()",
            "agent",
            "run",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("edgefleet-agent: error: "), done.stderr
    assert "Traceback" not in done.stderr


def test_agent_run_refuses_a_missing_config_as_a_usage_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from edgefleet.controller.cli import main; main()",
            "agent",
            "run",
            "--config",
            str(tmp_path / "missing.toml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert "does not exist" in done.stderr


def test_agent_argv_runs_the_agent_module_with_this_interpreter() -> None:
    assert agent_argv(Path("agent.toml")) == [
        sys.executable,
        "-m",
        AGENT_MODULE,
        "--config",
        "agent.toml",
    ]
    assert agent_argv(Path("agent.toml"), verbose=1)[-1] == "agent.toml"
    assert agent_argv(Path("agent.toml"), verbose=2)[-1] == "-v"
