"""What every recipe shares, whatever runtime it builds for.

The ONNX recipes (:mod:`~edgefleet.controller.compiler.recipes`) and the
TFLite ones (:mod:`~edgefleet.controller.compiler.tflite`) both build on the
:class:`Recipe` interface, the :class:`BuildInput` they build from and the
:class:`Built` they return, and both run third-party quantizers that print,
log and warn. Those parts live here, below both, so that ``recipes`` can
offer the TFLite recipes and ``tflite`` can subclass :class:`Recipe` without
importing each other both ways.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.controller.compiler.data import SampleSet
from edgefleet.controller.compiler.errors import RecipeError
from edgefleet.controller.compiler.profiles import Profile
from edgefleet.controller.compiler.source import SourceModel

__all__ = [
    "BuildInput",
    "Built",
    "Recipe",
    "SourceRecipe",
    "capture_notes",
    "dedupe_notes",
]

# A note is one line of a report; longer quantizer messages are cut here.
_NOTE_CHARS = 200


@dataclass(frozen=True)
class BuildInput:
    """What every recipe builds from.

    Attributes:
        source: the fp32 source.
        prepared: the source after shape inference and basic (portable) graph
            optimisation, as the quantizers want it; ``None`` when that failed.
        prepare_error: why preparation failed, for the candidates that need it.
        calibration: calibration samples, if any.
        work_dir: a directory that lives as long as the compile; static int8
            recipes keep one calibration cache per method there, so the
            per-channel, per-tensor and retry candidates calibrate once.
    """

    source: SourceModel
    prepared: bytes | None
    prepare_error: str | None = None
    calibration: SampleSet | None = None
    work_dir: Path | None = None

    def need_prepared(self) -> bytes:
        if self.prepared is None:
            raise RecipeError(f"pre-processing failed: {self.prepare_error or 'unknown error'}")
        return self.prepared


@dataclass(frozen=True)
class Built:
    """One recipe's output: the model and what the user should know about it."""

    model: bytes
    notes: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def capture_notes(
    notes: list[str],
    *,
    tool: str,
    mute_stderr: bool = False,
    ignore: Sequence[str] = (),
) -> Iterator[None]:
    """Collect a quantizer's warnings and log warnings into ``notes``; mute its console output.

    The quantization tools print advice through the root logger, emit Python
    (often numpy) warnings and print progress. Inside a compile those belong
    in the candidate's report or nowhere, not on the terminal: a CLI emitting
    JSON must not get progress mixed in, and a test run with
    warnings-as-errors must not turn advice into a failed candidate.

    Args:
        notes: where the first line of each message is appended.
        tool: prefix of the notes that come from log records (``onnxruntime``, ``litert``).
        mute_stderr: also swallow what the tool writes to ``sys.stderr`` (progress bars).
        ignore: warnings whose text contains one of these are dropped: the
            tool's own chatter, not about the model.
    """

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage().strip()
            if text:
                notes.append(f"{tool}: {text.splitlines()[0][:_NOTE_CHARS]}")

    handler = _Collect(level=logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with contextlib.ExitStack() as muted:
            caught = muted.enter_context(warnings.catch_warnings(record=True))
            muted.enter_context(contextlib.redirect_stdout(io.StringIO()))
            if mute_stderr:
                muted.enter_context(contextlib.redirect_stderr(io.StringIO()))
            warnings.simplefilter("always")
            yield
        for w in caught:
            text = str(w.message).strip()
            if not text or any(fragment in text for fragment in ignore):
                continue
            notes.append(f"warning: {text.splitlines()[0][:_NOTE_CHARS]}")
    finally:
        root.removeHandler(handler)


def dedupe_notes(notes: Sequence[str], limit: int = 8) -> tuple[str, ...]:
    """The notes in first-seen order without repeats, at most ``limit`` of them (plus a count)."""
    out: list[str] = []
    for n in notes:
        if n not in out:
            out.append(n)
    if len(out) > limit:
        out = [*out[:limit], f"... and {len(out) - limit} more notes"]
    return tuple(out)


class Recipe(ABC):
    """One way of turning the source into a candidate.

    Subclasses set ``name`` (unique, shown in the report), ``precision``
    (``fp32``/``fp16``/``int8``) and ``description``, and implement
    :meth:`build`. ``static_int8`` marks recipes whose failures the pipeline
    may retry with sensitive nodes excluded.
    """

    name: str
    precision: str
    description: str = ""
    needs_calibration: bool = False
    static_int8: bool = False

    def options(self) -> dict[str, Any]:
        """The settings that distinguish this recipe, recorded in the report."""
        return {}

    def quantizable_ops(self) -> frozenset[str]:
        """Op types this recipe quantizes (empty for float recipes)."""
        return frozenset()

    def skip_reason(
        self, profile: Profile, source: SourceModel, *, has_calibration: bool = True
    ) -> str | None:
        """Why this recipe does not apply to ``profile``/``source``, or ``None`` if it does."""
        if self.precision not in profile.precisions:
            return f"profile {profile.name} does not allow {self.precision}"
        if self.needs_calibration and not has_calibration:
            return "needs calibration data (pass --calibration)"
        return None

    def applies_to(
        self, profile: Profile, source: SourceModel, *, has_calibration: bool = True
    ) -> bool:
        return self.skip_reason(profile, source, has_calibration=has_calibration) is None

    @abstractmethod
    def build(self, inp: BuildInput, *, nodes_to_exclude: Sequence[str] = ()) -> Built:
        """Build the candidate.

        Raises:
            RecipeError: with the reason the report should show. Any other
                exception is also caught by the pipeline and recorded.
        """

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class SourceRecipe(Recipe):
    """The source model unchanged: the reference every other candidate must beat.

    The same for every runtime: an ONNX source stays ONNX, a TFLite one TFLite.
    """

    name = "fp32"
    precision = "fp32"
    description = "source model as given"

    def build(self, inp: BuildInput, *, nodes_to_exclude: Sequence[str] = ()) -> Built:
        return Built(inp.source.data)
