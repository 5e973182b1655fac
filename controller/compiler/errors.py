"""Errors the model compiler raises.

::

    EdgefleetError
    └── CompileError                 the compiler refused the job
        ├── SourceModelError         the source is unreadable, not ONNX, or cannot run
        ├── DataError                calibration/validation data do not fit the model
        ├── ProfileError             a profile (or profile file) is invalid or unknown
        │                            (also a ConfigError: it is configuration)
        ├── RecipeError              one recipe could not build its candidate
        └── NoVariantError           no candidate survived gate, budget and latency rules
            └── ToleranceError       no candidate met the accuracy tolerance

A failing *recipe* never aborts a compile: the pipeline records the candidate
as failed and carries on. :class:`RecipeError` exists so recipes can state a
reason the report shows verbatim. The errors that do abort a compile are the
ones about the *job* (source, data, profile, tolerance), because no variant
can be trusted when those are wrong.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgefleet.protocols.errors import ConfigError, EdgefleetError

if TYPE_CHECKING:
    from edgefleet.controller.compiler.report import CompileReport

__all__ = [
    "CompileError",
    "DataError",
    "NoVariantError",
    "ProfileError",
    "RecipeError",
    "SourceModelError",
    "ToleranceError",
]


class CompileError(EdgefleetError):
    """The model compiler refused the job."""


class SourceModelError(CompileError):
    """The source model is unreadable, not ONNX, invalid, or onnxruntime cannot run it."""


class DataError(CompileError):
    """Calibration or validation data are unreadable or do not match the model's inputs."""


class ProfileError(CompileError, ConfigError):
    """A device profile is invalid, a profile file is malformed, or no profile matches."""


class RecipeError(CompileError):
    """A recipe cannot build its candidate; the message is shown in the report."""


class NoVariantError(CompileError):
    """Every candidate was rejected; ``report`` says why for each one.

    Attributes:
        report: the full compile report, so a caller (or the CLI) can still
            show the measurements that led to the refusal.
    """

    def __init__(self, message: str, report: CompileReport | None = None) -> None:
        super().__init__(message)
        self.report = report


class ToleranceError(NoVariantError):
    """No candidate met the accuracy tolerance.

    Attributes:
        closest: ``(candidate name, score)`` pairs, best first, where the score
            is the candidate's worst per-output accuracy score (the gate needs
            ``score >= 1 - tolerance``).
    """

    def __init__(
        self,
        message: str,
        report: CompileReport | None = None,
        closest: tuple[tuple[str, float], ...] = (),
    ) -> None:
        super().__init__(message, report)
        self.closest = closest
