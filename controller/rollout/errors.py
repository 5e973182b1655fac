"""Errors of the rollout feature.

::

    EdgefleetError
    └── RolloutError             a rollout cannot be created, started or changed
        ├── RolloutConfigError   a strategy setting is invalid (names the setting)
        └── RolloutStateError    the operation does not fit the rollout's status
"""

from __future__ import annotations

from edgefleet.protocols.errors import EdgefleetError

__all__ = ["RolloutConfigError", "RolloutError", "RolloutStateError"]


class RolloutError(EdgefleetError):
    """A rollout cannot be created, started or changed."""


class RolloutConfigError(RolloutError):
    """A rollout setting is invalid."""


class RolloutStateError(RolloutError):
    """The operation does not fit the rollout's current status (e.g. resume a completed one)."""
