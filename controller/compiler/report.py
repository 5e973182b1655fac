"""The compile report, the selection rule, and the variants a compile hands back.

The report is the compiler's evidence: for every candidate it records what
was built, how big it is, how accurate and how fast it was *on this
machine*, and why it was chosen or refused. It round-trips through JSON
(``to_dict``/``from_dict``) so the registry can store it next to the variants
and ``edgefleet`` can show it again later.

Selection rule (:func:`select`)
-------------------------------
A measured candidate is **rejected** when any of these holds, checked in
this order:

1. its accuracy score is below ``1 - tolerance`` (only with validation data);
2. its model file is larger than the profile's ``max_bundle_bytes``;
3. objective ``latency``: its p50 latency was not measured, or is above the
   fp32 source's p50 from the same interleaved rounds (ratio > 1.0).

The rest are **eligible** and ranked. Objective ``latency``: fastest first,
but candidates within 5 % of the fastest remaining p50 count as tied
(measurement noise on a shared machine) and the smallest of those goes
first. Objective ``size``: smallest first, then fastest. Rank 1 is
**chosen**. Without validation data candidates are ranked all the same and
flagged unverified.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgefleet.controller.compiler.errors import ReportFormatError
from edgefleet.controller.compiler.evaluate import Accuracy, LatencyStats, OutputScore
from edgefleet.controller.compiler.profiles import Profile
from edgefleet.controller.compiler.sensitivity import NodeSensitivity
from edgefleet.protocols.bundle import TensorSpec

__all__ = [
    "LATENCY_TIE",
    "REPORT_FORMAT",
    "STATUSES",
    "Attempt",
    "CandidateReport",
    "CompileReport",
    "CompileResult",
    "Variant",
    "select",
]

REPORT_FORMAT = 1
LATENCY_TIE = 0.05
# measured: built and run, not yet judged (only inside the pipeline).
STATUSES = ("chosen", "eligible", "rejected", "failed", "skipped", "measured")


@dataclass(frozen=True)
class Attempt:
    """One sensitivity retry of a static int8 candidate.

    Attributes:
        excluded_nodes: nodes kept in float in this attempt (cumulative).
        score: accuracy score reached (``None`` if the build failed).
        passed: whether the gate passed.
        sensitive: the ranking that chose the newly excluded nodes (top few).
        error: why the attempt failed to build or run, if it did.
    """

    excluded_nodes: tuple[str, ...]
    score: float | None
    passed: bool
    sensitive: tuple[NodeSensitivity, ...] = ()
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "excluded_nodes": list(self.excluded_nodes),
            "score": self.score,
            "passed": self.passed,
            "sensitive": [s.to_dict() for s in self.sensitive],
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Attempt:
        score = d.get("score")
        return cls(
            excluded_nodes=tuple(d.get("excluded_nodes", ())),
            score=None if score is None else float(score),
            passed=bool(d.get("passed", False)),
            sensitive=tuple(NodeSensitivity.from_dict(s) for s in d.get("sensitive", ())),
            error=d.get("error"),
        )


@dataclass(frozen=True)
class CandidateReport:
    """Everything measured about one candidate, and the verdict.

    Attributes:
        name: unique candidate name (recipe name, ``+exclude`` for a
            sensitivity retry).
        recipe: the recipe that built it.
        precision: ``fp32``, ``fp16`` or ``int8``.
        status: ``chosen``, ``eligible``, ``rejected``, ``failed`` or ``skipped``.
        reason: why (for chosen/eligible: the rank and what decided it).
        description: what the recipe does.
        options: recipe settings (per-channel, calibration, reduce_range...).
        size_bytes / size_ratio: model file size and its ratio to the fp32 source.
        accuracy: scores against fp32, or ``None`` when unverified.
        latency: p50/p95 on this machine; ``latency_ratio`` and
            ``latency_ratio_p95`` are the candidate's over fp32's.
        excluded_nodes: nodes kept in float by the sensitivity retry.
        attempts: the sensitivity retries that led to this candidate.
        notes: fall-backs and tool warnings worth knowing.
        rank: 1 for the chosen candidate, 2... for other eligible ones.
        sha256: of the model bytes.
    """

    name: str
    recipe: str
    precision: str
    status: str
    reason: str = ""
    description: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    size_bytes: int | None = None
    size_ratio: float | None = None
    accuracy: Accuracy | None = None
    latency: LatencyStats | None = None
    latency_ratio: float | None = None
    latency_ratio_p95: float | None = None
    excluded_nodes: tuple[str, ...] = ()
    attempts: tuple[Attempt, ...] = ()
    notes: tuple[str, ...] = ()
    rank: int | None = None
    sha256: str | None = None

    @property
    def verified(self) -> bool:
        return self.accuracy is not None

    @property
    def score(self) -> float | None:
        return None if self.accuracy is None else self.accuracy.score

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "recipe": self.recipe,
            "precision": self.precision,
            "status": self.status,
            "reason": self.reason,
            "description": self.description,
            "options": dict(self.options),
            "size_bytes": self.size_bytes,
            "size_ratio": self.size_ratio,
            "verified": self.verified,
            "accuracy": None if self.accuracy is None else self.accuracy.to_dict(),
            "latency": None if self.latency is None else self.latency.to_dict(),
            "latency_ratio": self.latency_ratio,
            "latency_ratio_p95": self.latency_ratio_p95,
            "excluded_nodes": list(self.excluded_nodes),
            "attempts": [a.to_dict() for a in self.attempts],
            "notes": list(self.notes),
            "rank": self.rank,
            "sha256": self.sha256,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CandidateReport:
        acc = d.get("accuracy")
        lat = d.get("latency")
        return cls(
            name=str(d["name"]),
            recipe=str(d.get("recipe", d["name"])),
            precision=str(d["precision"]),
            status=str(d["status"]),
            reason=str(d.get("reason", "")),
            description=str(d.get("description", "")),
            options=dict(d.get("options") or {}),
            size_bytes=d.get("size_bytes"),
            size_ratio=d.get("size_ratio"),
            accuracy=None if acc is None else Accuracy.from_dict(acc),
            latency=None if lat is None else LatencyStats.from_dict(lat),
            latency_ratio=d.get("latency_ratio"),
            latency_ratio_p95=d.get("latency_ratio_p95"),
            excluded_nodes=tuple(d.get("excluded_nodes", ())),
            attempts=tuple(Attempt.from_dict(a) for a in d.get("attempts", ())),
            notes=tuple(d.get("notes", ())),
            rank=d.get("rank"),
            sha256=d.get("sha256"),
        )


def _pct(x: float) -> str:
    return f"{x * 100:.2f}%"


def _metric_words(o: OutputScore) -> str:
    """What an output's score measures, in words: ``decision agreement at 0.5``."""
    kind, _, arg = o.metric.partition(":")
    words = {
        "cosine": "cosine",
        "threshold": f"decision agreement at {arg}",
        "mae": f"share of samples with mean abs error <= {arg}",
        "topk": f"top-{arg} overlap",
    }.get(kind, f"{o.metric} agreement")
    if o.streams:
        words += f" over {o.streams} stream(s) with fed-back state"
    return words


def _reject_reason(c: CandidateReport, profile: Profile, tolerance: float) -> str | None:
    acc = c.accuracy
    if acc is not None and not acc.passed:
        failing = [o for o in acc.outputs if o.gated and o.score < acc.threshold - 1e-9]
        if failing:
            parts = []
            for o in sorted(failing, key=lambda o: o.score):
                cos = o.metric == "cosine"
                shown = f"{o.score:.5f}" if cos else _pct(o.score)
                need = f"{acc.threshold:.5f}" if cos else _pct(acc.threshold)
                part = f"output {o.name!r} {_metric_words(o)} {shown} < {need}"
                if o.stream_score is not None:
                    part += f" (whole streams agreeing: {_pct(o.stream_score)})"
                parts.append(part)
            return f"failed accuracy gate: {'; '.join(parts)} (tolerance {tolerance:g})"
        lab = acc.label_failure()
        if lab is not None and lab.label_accuracy is not None:
            ref = lab.reference_label_accuracy or 0.0
            return (
                f"failed accuracy gate: output {lab.name!r} accuracy against labels "
                f"{_pct(lab.label_accuracy)} is {(ref - lab.label_accuracy) * 100:.2f} points "
                f"below fp32's {_pct(ref)} (max drop {(acc.max_accuracy_drop or 0) * 100:g} points)"
            )
    if (
        profile.max_bundle_bytes is not None
        and c.size_bytes is not None
        and c.size_bytes > profile.max_bundle_bytes
    ):
        return (
            f"{c.size_bytes} bytes exceeds the profile's max_bundle_bytes "
            f"{profile.max_bundle_bytes}"
        )
    if profile.objective == "latency":
        if c.latency is None or c.latency_ratio is None:
            return "latency could not be measured"
        if c.latency_ratio > 1.0:
            # Three decimals: "1.00x" would read as a tie when it is just above.
            return f"slower than fp32: p50 {c.latency_ratio:.3f}x fp32"
    return None


def _rank_latency(pool: list[CandidateReport]) -> list[CandidateReport]:
    out: list[CandidateReport] = []
    rest = sorted(pool, key=lambda c: (c.latency.p50_ms if c.latency else float("inf"), c.name))
    while rest:
        fastest = rest[0].latency.p50_ms if rest[0].latency else float("inf")
        band = [c for c in rest if c.latency and c.latency.p50_ms <= fastest * (1 + LATENCY_TIE)]
        if not band:
            band = [rest[0]]
        pick = min(
            band,
            key=lambda c: (
                c.size_bytes if c.size_bytes is not None else float("inf"),
                c.latency.p50_ms if c.latency else float("inf"),
                c.name,
            ),
        )
        out.append(pick)
        rest.remove(pick)
    return out


def _rank_size(pool: list[CandidateReport]) -> list[CandidateReport]:
    return sorted(
        pool,
        key=lambda c: (
            c.size_bytes if c.size_bytes is not None else float("inf"),
            c.latency.p50_ms if c.latency else float("inf"),
            c.name,
        ),
    )


def select(
    candidates: Sequence[CandidateReport], profile: Profile, *, tolerance: float
) -> list[CandidateReport]:
    """Judge measured candidates and rank the eligible ones (see the module docstring).

    Candidates whose status is not ``measured`` (failed, skipped) pass
    through unchanged. Returns the candidates in their original order with
    status, reason and rank filled in.
    """
    judged: dict[str, CandidateReport] = {}
    pool: list[CandidateReport] = []
    for c in candidates:
        if c.status != "measured":
            continue
        reason = _reject_reason(c, profile, tolerance)
        if reason is not None:
            judged[c.name] = dataclasses.replace(c, status="rejected", reason=reason, rank=None)
        else:
            pool.append(c)
    ranked = _rank_latency(pool) if profile.objective == "latency" else _rank_size(pool)
    for i, c in enumerate(ranked, start=1):
        lat = f"p50 {c.latency_ratio:.2f}x fp32" if c.latency_ratio is not None else "latency n/a"
        size = f"size {c.size_ratio:.2f}x fp32" if c.size_ratio is not None else "size n/a"
        why = f"{lat}, {size}" if profile.objective == "latency" else f"{size}, {lat}"
        flag = "" if c.verified else "; accuracy UNVERIFIED (no validation data)"
        if i == 1:
            reason = f"best by {profile.objective}: {why}{flag}"
            judged[c.name] = dataclasses.replace(c, status="chosen", reason=reason, rank=1)
        else:
            reason = f"rank {i} by {profile.objective}: {why}{flag}"
            judged[c.name] = dataclasses.replace(c, status="eligible", reason=reason, rank=i)
    return [judged.get(c.name, c) for c in candidates]


@dataclass(frozen=True)
class CompileReport:
    """The evidence of one compile: the source, the profile, and every candidate.

    Attributes:
        source: sha256, size, op-mix kind, inputs/outputs of the fp32 source.
        profile: the profile compiled for.
        tolerance: the accuracy tolerance (gate at ``1 - tolerance``).
        verified: whether validation data were given (accuracy measured).
        validation_samples / calibration_samples: samples used.
        baseline_latency: the fp32 source's latency in the same rounds.
        latency_config: iterations, warm-up, threads, which input was timed.
        host: the machine latencies were measured on, and whether it has
            the profile's CPU features (if not, latencies are indicative only).
        candidates: every candidate, in recipe order.
        chosen: names of the eligible candidates, best first.
        notes: compile-level remarks.
    """

    source: Mapping[str, Any]
    profile: Profile
    tolerance: float
    verified: bool
    validation_samples: int
    calibration_samples: int
    baseline_latency: LatencyStats | None
    latency_config: Mapping[str, Any]
    host: Mapping[str, Any]
    candidates: tuple[CandidateReport, ...]
    chosen: tuple[str, ...]
    notes: tuple[str, ...] = ()
    created_at: float = 0.0
    format: int = REPORT_FORMAT

    def candidate(self, name: str) -> CandidateReport:
        """The candidate called ``name``.

        Raises:
            KeyError: no such candidate.
        """
        for c in self.candidates:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def best(self) -> CandidateReport | None:
        return self.candidate(self.chosen[0]) if self.chosen else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "created_at": self.created_at,
            "source": dict(self.source),
            "profile": self.profile.to_dict(),
            "tolerance": self.tolerance,
            "verified": self.verified,
            "validation_samples": self.validation_samples,
            "calibration_samples": self.calibration_samples,
            "baseline_latency": (
                None if self.baseline_latency is None else self.baseline_latency.to_dict()
            ),
            "latency_config": dict(self.latency_config),
            "host": dict(self.host),
            "candidates": [c.to_dict() for c in self.candidates],
            "chosen": list(self.chosen),
            "notes": list(self.notes),
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CompileReport:
        """Rebuild a report from :meth:`to_dict` output.

        Raises:
            ReportFormatError: the mapping is not a compile report of a known format.
        """
        try:
            fmt = int(d.get("format", 0))
            if fmt != REPORT_FORMAT:
                raise ReportFormatError(f"unsupported compile report format {fmt}")
            base = d.get("baseline_latency")
            return cls(
                source=dict(d["source"]),
                profile=Profile.from_dict(d["profile"]),
                tolerance=float(d["tolerance"]),
                verified=bool(d["verified"]),
                validation_samples=int(d["validation_samples"]),
                calibration_samples=int(d["calibration_samples"]),
                baseline_latency=None if base is None else LatencyStats.from_dict(base),
                latency_config=dict(d.get("latency_config") or {}),
                host=dict(d.get("host") or {}),
                candidates=tuple(CandidateReport.from_dict(c) for c in d["candidates"]),
                chosen=tuple(d.get("chosen", ())),
                notes=tuple(d.get("notes", ())),
                created_at=float(d.get("created_at", 0.0)),
                format=fmt,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ReportFormatError(f"not a compile report: {exc!r}") from None

    @classmethod
    def from_json(cls, text: str | bytes) -> CompileReport:
        return cls.from_dict(json.loads(text))

    def format_table(self) -> str:
        """A human-readable report: header lines, one row per candidate, then notes."""
        p = self.profile
        src = self.source
        base = self.baseline_latency
        lines = [
            f"profile {p.name}: {p.runtime}, {p.arch}, objective {p.objective}, "
            f"precisions {'/'.join(p.precisions)}, tolerance {self.tolerance:g}",
            f"source  {str(src.get('sha256', ''))[:12]}  {_size(src.get('size_bytes'))}  "
            f"kind {src.get('kind', '?')}  validation {self.validation_samples} samples  "
            f"calibration {self.calibration_samples} samples",
        ]
        host = self.host
        lat = self.latency_config
        base_text = f"fp32 p50 {base.p50_ms:.3f} ms p95 {base.p95_ms:.3f} ms" if base else "n/a"
        lines.append(
            f"latency {lat.get('iterations', '?')} interleaved rounds, "
            f"{lat.get('intra_op_threads', 1)} thread, input {lat.get('input', '?')}, "
            f"on {host.get('cpu', '?')}: {base_text}"
        )
        if host and not host.get("matches_profile", True):
            lines.append(
                "NOTE    this machine is not of the profile's CPU class: latencies are indicative"
            )
        if not self.verified:
            lines.append("NOTE    no validation data: accuracy is UNVERIFIED for every candidate")
        scored = next((c.accuracy for c in self.candidates if c.accuracy is not None), None)
        if scored is not None:
            lines.append(
                "metrics "
                + "; ".join(f"{o.name}: {o.metric} ({o.chosen_by})" for o in scored.outputs)
            )
            if scored.outputs and scored.outputs[0].streams:
                lines.append(
                    f"streams {scored.outputs[0].streams} stream(s), {scored.samples} steps, "
                    "each model fed its own state back"
                )
        header = (
            "candidate",
            "prec",
            "size",
            "xfp32",
            "accuracy",
            "p50 ms",
            "p95 ms",
            "xfp32",
            "status",
        )
        rows = [header]
        for c in self.candidates:
            acc = (
                "-"
                if c.status in ("failed", "skipped")
                else (c.accuracy.summary if c.accuracy else "unverified")
            )
            rows.append(
                (
                    c.name,
                    c.precision,
                    _size(c.size_bytes),
                    "-" if c.size_ratio is None else f"{c.size_ratio:.2f}",
                    acc,
                    "-" if c.latency is None else f"{c.latency.p50_ms:.3f}",
                    "-" if c.latency is None else f"{c.latency.p95_ms:.3f}",
                    "-" if c.latency_ratio is None else f"{c.latency_ratio:.2f}",
                    c.status.upper() if c.status == "chosen" else c.status,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for r in rows:
            lines.append(
                "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
            )
        lines.append("")
        for c in self.candidates:
            lines.append(f"{c.name}: {c.status}: {c.reason}")
            if c.excluded_nodes:
                lines.append(f"    kept in float: {', '.join(c.excluded_nodes)}")
            if c.accuracy is not None and c.status not in ("failed", "skipped"):
                lines.extend(f"    {_output_line(o)}" for o in c.accuracy.outputs)
            before: set[str] = set()
            for a in c.attempts:
                score = "build failed" if a.score is None else f"score {a.score:.5f}"
                verdict = "passed" if a.passed else "failed"
                lines.append(
                    f"    attempt excluding {len(a.excluded_nodes)} node(s): {score}, {verdict}"
                    + (f" ({a.error})" if a.error else "")
                    + _why_excluded(a, before)
                )
                before = set(a.excluded_nodes)
            lines.extend(f"    note: {n}" for n in c.notes)
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _why_excluded(attempt: Attempt, before: set[str]) -> str:
    """Why an attempt kept its new nodes in float: the error each adds on the calibration data.

    The ranking holds the top few nodes only; a node beyond it (a whole op
    type kept float) is named without a number.
    """
    new = [n for n in attempt.excluded_nodes if n not in before]
    if not new:
        return ""
    by_node = {s.node: s for s in attempt.sensitive}
    shown = []
    for n in new[:5]:
        s = by_node.get(n)
        shown.append(n if s is None else f"{n} ({s.op_type}, adds {s.added:.3g} relative error)")
    more = f" and {len(new) - 5} more" if len(new) > 5 else ""
    return f"; newly kept float: {', '.join(shown)}{more}"


def _output_line(o: OutputScore) -> str:
    """One output's scores: metric, stream agreement, labels, errors."""
    parts = [f"output {o.name!r}: {o.score_text()}"]
    if o.stream_score is not None:
        parts.append(f"whole streams {_pct(o.stream_score)}")
    if o.label_accuracy is not None:
        ref = o.reference_label_accuracy
        parts.append(
            f"accuracy {_pct(o.label_accuracy)}" + ("" if ref is None else f" (fp32 {_pct(ref)})")
        )
    if o.mae is not None and math.isfinite(o.mae):
        parts.append(f"mae {o.mae:.3g}")
    if o.rel_error is not None and math.isfinite(o.rel_error):
        parts.append(f"rel err {o.rel_error:.3g}")
    return ", ".join(parts)


def _size(n: Any) -> str:
    if not isinstance(n, int):
        return "-"
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.2f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} B"


@dataclass(frozen=True)
class Variant:
    """A chosen (or eligible) variant: what the registry stores and bundles.

    Attributes:
        name: candidate name in the report.
        recipe: recipe that built it.
        precision: ``fp32``/``fp16``/``int8`` (a ``BundleManifest`` precision).
        model: the ONNX model bytes.
        metrics: the candidate's row of the report.
        profile: the profile (hardware class) it was chosen for.
        inputs / outputs: tensor specs, the same as the source's.
    """

    name: str
    recipe: str
    precision: str
    model: bytes
    metrics: CandidateReport
    profile: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.model).hexdigest()

    @property
    def size_bytes(self) -> int:
        return len(self.model)

    @property
    def verified(self) -> bool:
        return self.metrics.verified


@dataclass(frozen=True)
class CompileResult:
    """What :func:`compile_model` returns.

    Attributes:
        report: the full report.
        chosen: the eligible variants, best first (``chosen[0]`` is the pick;
            the others are ranked fall-backs, e.g. to keep an fp32 variant).
    """

    report: CompileReport
    chosen: list[Variant]

    @property
    def best(self) -> Variant:
        """The chosen variant (``chosen[0]``)."""
        return self.chosen[0]
