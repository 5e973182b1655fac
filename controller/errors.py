"""Errors the controller raises.

::

    EdgefleetError
    ├── RegistryError
    │   ├── NotFoundError        a model, version, device or deployment does not exist
    │   ├── DuplicateError       it exists already (model version, device id)
    │   └── NoMatchingBundleError a device's hardware class has no bundle of that version
    ├── TrustError               the TUF repository cannot be opened, signed or written
    │   └── KeyPermissionError   a private key file is readable by group or others
    ├── ModelError               a model file is corrupt, not ONNX, or cannot run
    └── BrokerError              (re-exported from edgefleet.protocols.errors)
"""

from __future__ import annotations

from edgefleet.protocols.errors import BrokerError, EdgefleetError

__all__ = [
    "BrokerError",
    "DuplicateError",
    "KeyPermissionError",
    "ModelError",
    "NoMatchingBundleError",
    "NotFoundError",
    "RegistryError",
    "TrustError",
]


class RegistryError(EdgefleetError):
    """The registry refused an operation."""


class NotFoundError(RegistryError):
    """The named model, version, device or deployment does not exist."""


class DuplicateError(RegistryError):
    """The model version or device already exists."""


class NoMatchingBundleError(RegistryError):
    """No bundle of the model version fits the device's hardware class."""


class TrustError(EdgefleetError):
    """The TUF repository cannot be opened, signed or written."""


class KeyPermissionError(TrustError):
    """A private key file is readable or writable by someone but its owner."""


class ModelError(EdgefleetError):
    """A model file is corrupt, not a model, or fails to run."""
