"""Fixtures of the CLI tests: a controller config that points at the session's broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.shared.link import BrokerSettings


@pytest.fixture
def home(tmp_path: Path, embedded_broker: BrokerSettings) -> Path:
    config = tmp_path / "controller.toml"
    config.write_text(
        f'home = "state"\n[broker]\nhost = "{embedded_broker.host}"\n'
        f"port = {embedded_broker.port}\n"
    )
    return config
