"""Fixtures of the CLI tests: a controller config that points at the session's broker.

``home`` is a config whose home ``edgefleet init`` created (every command but
``init`` refuses a missing home); ``bare_config`` is the same config before
``init``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.shared.link import BrokerSettings
from tests.controller.cli.runner import run


@pytest.fixture
def bare_config(tmp_path: Path, embedded_broker: BrokerSettings) -> Path:
    config = tmp_path / "controller.toml"
    config.write_text(
        f'home = "state"\n[broker]\nhost = "{embedded_broker.host}"\n'
        f"port = {embedded_broker.port}\n"
    )
    return config


@pytest.fixture
def home(bare_config: Path) -> Path:
    result = run(bare_config, "init")
    assert result.exit_code == 0, result.output
    return bare_config
