"""Errors the controller raises, with their stable codes.

The whole tree is drawn in :mod:`edgefleet.protocols.errors`; this is the part
defined here::

    EdgefleetError
    ├── RegistryError            "registry"
    │   ├── NotFoundError        "not_found"    a model, version, device or deployment is unknown
    │   ├── DuplicateError       "duplicate"    it exists already (model version, device id)
    │   ├── NoMatchingBundleError "no_matching_bundle"
    │   │                        a device's hardware class has no bundle of that version
    │   └── InvalidNameError     "bad_name"     a model name, version or hardware class is unsafe
    ├── TrustError               "trust"        the TUF repository cannot be opened, signed
    │                                           or written
    │   └── KeyPermissionError   "key_permissions"
    │                            a private key file is readable by group or others
    ├── ModelError               "bad_model"    a model file is corrupt, not ONNX, or cannot run
    └── BrokerError              "broker"       (re-exported from edgefleet.protocols.errors)
"""

from __future__ import annotations

from edgefleet.protocols.errors import BrokerError, EdgefleetError

__all__ = [
    "BrokerError",
    "DuplicateError",
    "InvalidNameError",
    "KeyPermissionError",
    "ModelError",
    "NoMatchingBundleError",
    "NotFoundError",
    "RegistryError",
    "TrustError",
]


class RegistryError(EdgefleetError):
    """The registry refused an operation."""

    code = "registry"


class NotFoundError(RegistryError):
    """The named model, version, device or deployment does not exist."""

    code = "not_found"


class DuplicateError(RegistryError):
    """The model version or device already exists."""

    code = "duplicate"


class NoMatchingBundleError(RegistryError):
    """No bundle of the model version fits the device's hardware class."""

    code = "no_matching_bundle"


class InvalidNameError(RegistryError):
    """A model name, version or hardware class is not a safe identifier.

    They become TUF target paths and directory names, so only letters, digits,
    ``.``, ``_`` and ``-`` are accepted.
    """

    code = "bad_name"


class TrustError(EdgefleetError):
    """The TUF repository cannot be opened, signed or written."""

    code = "trust"


class KeyPermissionError(TrustError):
    """A private key file is readable or writable by someone but its owner."""

    code = "key_permissions"


class ModelError(EdgefleetError):
    """A model file is corrupt, not a model, or fails to run."""

    code = "bad_model"
