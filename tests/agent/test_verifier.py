"""The TUF verifier child (agent/verifier.py): its failures are clean install failures.

The install path through it (every attack, resume, ENOSPC) is exercised by
the install and end-to-end tests; here: a child that cannot start, and the
error codes that cross the pipe.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.agent.verifier import Verifier, rebuild_error
from edgefleet.protocols import errors
from edgefleet.protocols.errors import AgentError


def test_a_child_that_dies_fails_the_install_with_an_agent_error(tmp_path: Path) -> None:
    # No trusted root in metadata_dir: the child's Updater cannot even start.
    verifier = Verifier(None, tmp_path / "no-metadata", tmp_path)  # type: ignore[arg-type]
    try:
        with pytest.raises(AgentError, match="TUF verifier process failed") as info:
            verifier.target_info("m/1.0/bundle.tar")
        assert type(info.value) is AgentError
    finally:
        verifier.close()


def _agent_error_classes() -> list[type[AgentError]]:
    return [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, AgentError)]


@pytest.mark.parametrize("cls", _agent_error_classes(), ids=lambda c: c.__name__)
def test_every_agent_error_crosses_the_pipe_as_itself(cls: type[AgentError]) -> None:
    rebuilt = rebuild_error(cls.code, "why")
    assert type(rebuilt) is cls
    assert str(rebuilt) == "why"


def test_an_unknown_code_is_a_plain_agent_error() -> None:
    assert type(rebuild_error("from_the_future", "x")) is AgentError
