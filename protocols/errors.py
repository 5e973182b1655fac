"""edgefleet's exception tree, drawn once, and the errors both sides share.

Every error edgefleet raises on purpose derives from :class:`EdgefleetError`,
so a caller can catch "anything edgefleet refused" in one place. Every class
carries a stable machine-readable ``code``: the agent reports it to the
controller (``ReportedState.last_error``, events), the CLI prints it with
``--json``, and operators filter on it. Codes are part of the protocol: never
rename one, add a new class instead.

Classes defined here are the ones whose codes cross the wire (transfer,
verification, install and inference refusals) plus the roots each side
derives from. Side-specific subclasses live next to the code that raises them,
in the module named in brackets::

    EdgefleetError                         "error"
    ├── ConfigError                        "config"        a config file or value is wrong
    │   ├── EnrollmentFailedError          "enrollment_failed"   [agent.enroll]
    │   ├── HttpAddressError               "http_address"        [agent.serving] port taken
    │   ├── HomeMissingError               "home_missing"        [controller.cli.context]
    │   └── ProfileError                   "bad_profile"         [controller.compiler.errors]
    ├── BrokerError                        "broker"        the broker is unreachable or refused us
    ├── ProtocolError                      "protocol"      something received breaks the protocol
    │   ├── MessageError                   "bad_message"   a JSON message failed validation
    │   ├── TopicError                     "bad_topic"     a topic is not one of ours
    │   └── FrameError                     "bad_frame"     a binary block frame is malformed
    ├── AgentError                         "agent_error"   an agent-side refusal
    │   ├── TransferError                  "transfer_failed"
    │   │   ├── TransferTimeoutError       "transfer_timeout"   the controller stopped answering
    │   │   └── FileNotFoundOnServerError  "not_found"          the repository has no such file
    │   ├── VerificationError              "verification_failed"
    │   │   ├── OversizedTransferError     "endless_data"       more bytes than TUF promised
    │   │   ├── TamperedBundleError        "tampered"           length or hash mismatch
    │   │   ├── ExpiredMetadataError       "expired_metadata"   freeze attack or stale repository
    │   │   ├── MetadataRollbackError      "metadata_rollback"  metadata version went backwards
    │   │   ├── UntrustedMetadataError     "untrusted_metadata" bad signatures, mix-and-match
    │   │   ├── UnknownTargetError         "unknown_target"     desired bundle is not in targets
    │   │   ├── ReleaseRollbackError       "release_rollback"   release counter went backwards
    │   │   └── WrongHardwareError         "wrong_hardware"     bundle built for another class
    │   ├── InstallError                   "install_failed"
    │   │   ├── BundleFormatError          "bad_bundle"         archive or manifest unusable
    │   │   ├── UnsupportedRuntimeError    "unsupported_runtime"
    │   │   ├── ModelLoadError             "model_load_failed"
    │   │   ├── SmokeTestError             "smoke_test_failed"
    │   │   ├── SlotError                  "bad_slot"           install slot state on disk unusable
    │   │   └── InsufficientSpaceError     "insufficient_space" too little free disk for a bundle
    │   ├── InferenceInputError            "bad_input"          inputs don't fit the model
    │   └── InferenceError                 "inference_failed"   the runtime failed on valid input
    ├── RegistryError                      "registry"      [controller.errors]
    │   ├── NotFoundError                  "not_found"
    │   ├── DuplicateError                 "duplicate"
    │   ├── NoMatchingBundleError          "no_matching_bundle"
    │   └── InvalidNameError               "bad_name"      a model, version or class name
    ├── TrustError                         "trust"         [controller.errors]
    │   ├── KeyPermissionError             "key_permissions"
    │   └── CertificateError               "certificate"   [controller.ca]
    ├── ApiClientError                     "api"           [controller.api_client] the API refused
    │   ├── ApiUnreachableError            "api_unreachable"    no answer from the API URL
    │   └── ApiRequestError                "api_request"        an error status (401, 404, ...)
    ├── ModelError                         "bad_model"     [controller.errors]
    ├── EnrollmentError                    "enrollment"    [controller.enrollment]
    ├── RolloutError                       "rollout"       [controller.rollout.errors]
    │   ├── RolloutConfigError             "rollout_config"
    │   └── RolloutStateError              "rollout_state"
    ├── PackagingError                     "packaging"     [controller.packaging] offline installer
    │   ├── UnsupportedTargetError         "unsupported_target"  e.g. onnx on armv7l
    │   ├── PackageConfigError             "package_config"      enrollment files missing
    │   ├── IndexUnreachableError          "index_unreachable"
    │   ├── UnsatisfiableError             "unsatisfiable"       a package has no wheel there
    │   └── ForeignWheelError              "foreign_wheel"       a wheel for another platform
    └── CompileError                       "compile"       [controller.compiler.errors]
        ├── SourceModelError               "bad_source_model"
        ├── DataError                      "bad_data"
        ├── ProfileError                   "bad_profile"   (also a ConfigError, drawn above)
        ├── RecipeError                    "recipe_failed"
        ├── ReportFormatError              "bad_report"    a stored compile report is unreadable
        └── NoVariantError                 "no_variant"
            └── ToleranceError             "tolerance"

Codes are unique per class, with one deliberate exception: ``"not_found"`` is
both :class:`FileNotFoundOnServerError` (the agent asked the repository for a
file it does not have) and the controller's ``NotFoundError`` (a registry
lookup found nothing). Both mean "no such thing"; the class tells them apart.
``tests/protocols/test_errors.py`` checks this tree against the code.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AgentError",
    "BrokerError",
    "BundleFormatError",
    "ConfigError",
    "EdgefleetError",
    "ExpiredMetadataError",
    "FileNotFoundOnServerError",
    "FrameError",
    "InferenceError",
    "InferenceInputError",
    "InstallError",
    "InsufficientSpaceError",
    "MessageError",
    "MetadataRollbackError",
    "ModelLoadError",
    "OversizedTransferError",
    "ProtocolError",
    "ReleaseRollbackError",
    "SlotError",
    "SmokeTestError",
    "TamperedBundleError",
    "TopicError",
    "TransferError",
    "TransferTimeoutError",
    "UnknownTargetError",
    "UnsupportedRuntimeError",
    "UntrustedMetadataError",
    "VerificationError",
    "WrongHardwareError",
]


class EdgefleetError(Exception):
    """Base class of every error edgefleet raises deliberately."""

    code: ClassVar[str] = "error"


class ConfigError(EdgefleetError):
    """A configuration file or value is missing or wrong."""

    code = "config"


class BrokerError(EdgefleetError):
    """The MQTT broker cannot be reached, refused the connection, or dropped us."""

    code = "broker"


class ProtocolError(EdgefleetError):
    """Something received over the wire does not follow the protocol."""

    code = "protocol"


class MessageError(ProtocolError):
    """A JSON message is not valid: bad JSON, wrong types, missing fields."""

    code = "bad_message"


class TopicError(ProtocolError):
    """A topic string is not an edgefleet topic, or names an invalid device."""

    code = "bad_topic"


class FrameError(ProtocolError):
    """A binary transfer frame is truncated, oversized or inconsistent."""

    code = "bad_frame"


# ---------------------------------------------------------------- agent refusals
class AgentError(EdgefleetError):
    """An agent-side refusal with a stable machine-readable ``code``."""

    code = "agent_error"


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


class SlotError(InstallError):
    """The agent's install slots on disk cannot be used as asked.

    A slot name or bundle hash that is unsafe as a directory name, a staging
    directory that is not ours, or a slot that should be installed but is not.
    The agent reports it like any failed install, so the code reaches the
    controller instead of a bare "agent_error".
    """

    code = "bad_slot"


class InsufficientSpaceError(InstallError):
    """The state directory has too little free space for this bundle.

    Checked against the signed length before a byte is downloaded, and raised
    when the disk fills up anyway (another process wrote to it) - in which
    case the partial download has already been removed, so one oversized
    bundle cannot leave the disk full for every later install. Unlike other
    install refusals it is retried after a backoff: space can be freed.
    """

    code = "insufficient_space"


class InferenceInputError(AgentError, ValueError):
    """The caller's inputs do not fit the model (names, dtypes, ranks, values).

    It is a :class:`ValueError` too, so generic callers that treat "bad
    argument" uniformly still catch it.
    """

    code = "bad_input"


class InferenceError(AgentError):
    """The runtime failed while running a model on inputs that passed validation."""

    code = "inference_failed"
