"""Errors of the rollout feature.

::

    EdgefleetError
    └── RolloutError             "rollout"         a rollout cannot be created, started or changed
        ├── RolloutConfigError   "rollout_config"  a strategy setting is invalid (names the setting)
        └── RolloutStateError    "rollout_state"   the operation does not fit the rollout's status
"""

from __future__ import annotations

from edgefleet.protocols.errors import EdgefleetError

__all__ = ["RolloutConfigError", "RolloutError", "RolloutStateError"]


class RolloutError(EdgefleetError):
    """A rollout cannot be created, started or changed."""

    code = "rollout"


class RolloutConfigError(RolloutError):
    """A rollout setting is invalid."""

    code = "rollout_config"


class RolloutStateError(RolloutError):
    """The operation does not fit the rollout's current status (e.g. resume a completed one)."""

    code = "rollout_state"
