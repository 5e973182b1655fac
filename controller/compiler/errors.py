"""Errors the model compiler raises.

::

    EdgefleetError
    └── CompileError                 "compile"           the compiler refused the job
        ├── SourceModelError         "bad_source_model"  the source is unreadable, not ONNX,
        │                                                or cannot run
        ├── DataError                "bad_data"          calibration/validation data do not fit
        ├── ProfileError             "bad_profile"       a profile (or profile file) is invalid
        │                                                or unknown (also a ConfigError)
        ├── RecipeError              "recipe_failed"     one recipe could not build its candidate
        ├── ReportFormatError        "bad_report"        a stored compile report is unreadable
        └── NoVariantError           "no_variant"        no candidate survived gate, budget and
            │                                            latency rules
            └── ToleranceError       "tolerance"         no candidate met the accuracy tolerance

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
    "ReportFormatError",
    "SourceModelError",
    "ToleranceError",
]


class CompileError(EdgefleetError):
    """The model compiler refused the job."""

    code = "compile"


class SourceModelError(CompileError):
    """The source model is unreadable, not ONNX, invalid, or onnxruntime cannot run it."""

    code = "bad_source_model"


class DataError(CompileError):
    """Calibration or validation data are unreadable or do not match the model's inputs."""

    code = "bad_data"


class ProfileError(CompileError, ConfigError):
    """A device profile is invalid, a profile file is malformed, or no profile matches."""

    code = "bad_profile"


class RecipeError(CompileError):
    """A recipe cannot build its candidate; the message is shown in the report."""

    code = "recipe_failed"


class ReportFormatError(CompileError):
    """A stored compile report is not a report of a known format.

    Reports are stored as JSON with the bundles; one written by a newer
    controller, or damaged in the database, is refused rather than half-shown.
    """

    code = "bad_report"


class NoVariantError(CompileError):
    """Every candidate was rejected; ``report`` says why for each one.

    Attributes:
        report: the full compile report, so a caller (or the CLI) can still
            show the measurements that led to the refusal.
    """

    code = "no_variant"

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

    code = "tolerance"

    def __init__(
        self,
        message: str,
        report: CompileReport | None = None,
        closest: tuple[tuple[str, float], ...] = (),
    ) -> None:
        super().__init__(message, report)
        self.closest = closest
