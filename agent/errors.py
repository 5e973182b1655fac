"""Errors the agent raises, each naming one way an update can be refused.

Every error here maps to a stable ``code`` (the class attribute) that the
agent reports to the controller in ``ReportedState.last_error`` and in
events, so an operator can tell a tampered bundle from a full disk::

    EdgefleetError
    ├── TransferError (code "transfer_failed")
    │   ├── TransferTimeoutError      "transfer_timeout"   the controller stopped answering
    │   └── FileNotFoundOnServerError "not_found"          the repository has no such file
    ├── VerificationError (code "verification_failed")
    │   ├── OversizedTransferError    "endless_data"       more bytes than TUF promised
    │   ├── TamperedBundleError       "tampered"           length or hash mismatch
    │   ├── ExpiredMetadataError      "expired_metadata"   freeze attack or stale repository
    │   ├── MetadataRollbackError     "metadata_rollback"  metadata version went backwards
    │   ├── UntrustedMetadataError    "untrusted_metadata" bad signatures, mix-and-match
    │   ├── UnknownTargetError        "unknown_target"     desired bundle is not in targets
    │   ├── ReleaseRollbackError      "release_rollback"   release counter went backwards
    │   └── WrongHardwareError        "wrong_hardware"     bundle built for another class
    └── InstallError (code "install_failed")
        ├── BundleFormatError         "bad_bundle"         archive or manifest unusable
        ├── UnsupportedRuntimeError   "unsupported_runtime"
        ├── ModelLoadError            "model_load_failed"
        └── SmokeTestError            "smoke_test_failed"
"""

from __future__ import annotations

from typing import ClassVar

from edgefleet.protocols.errors import EdgefleetError

__all__ = [
    "AgentError",
    "BundleFormatError",
    "ExpiredMetadataError",
    "FileNotFoundOnServerError",
    "InstallError",
    "MetadataRollbackError",
    "ModelLoadError",
    "OversizedTransferError",
    "ReleaseRollbackError",
    "SmokeTestError",
    "TamperedBundleError",
    "TransferError",
    "TransferTimeoutError",
    "UnknownTargetError",
    "UnsupportedRuntimeError",
    "UntrustedMetadataError",
    "VerificationError",
    "WrongHardwareError",
]


class AgentError(EdgefleetError):
    """An agent-side refusal with a stable machine-readable ``code``."""

    code: ClassVar[str] = "agent_error"


class TransferError(AgentError):
    code = "transfer_failed"


class TransferTimeoutError(TransferError):
    code = "transfer_timeout"


class FileNotFoundOnServerError(TransferError):
    code = "not_found"


class VerificationError(AgentError):
    code = "verification_failed"


class OversizedTransferError(VerificationError):
    """The server sent (or announced) more bytes than the signed length: an attack."""

    code = "endless_data"


class TamperedBundleError(VerificationError):
    code = "tampered"


class ExpiredMetadataError(VerificationError):
    code = "expired_metadata"


class MetadataRollbackError(VerificationError):
    code = "metadata_rollback"


class UntrustedMetadataError(VerificationError):
    code = "untrusted_metadata"


class UnknownTargetError(VerificationError):
    code = "unknown_target"


class ReleaseRollbackError(VerificationError):
    code = "release_rollback"


class WrongHardwareError(VerificationError):
    code = "wrong_hardware"


class InstallError(AgentError):
    code = "install_failed"


class BundleFormatError(InstallError):
    code = "bad_bundle"


class UnsupportedRuntimeError(InstallError):
    code = "unsupported_runtime"


class ModelLoadError(InstallError):
    code = "model_load_failed"


class SmokeTestError(InstallError):
    code = "smoke_test_failed"
