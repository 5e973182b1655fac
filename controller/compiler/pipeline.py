"""``compile_model``: build every candidate a profile allows, measure, gate, choose.

The steps, and why they are in this order:

1. Check the job (tolerance, profile runtime), load the source and the data.
   Anything wrong here raises before minutes are spent quantizing.
2. Run the fp32 source on the validation samples: the reference outputs.
3. Pre-process once (shape inference + basic optimisation) for the quantizers.
4. Build each applicable recipe. A recipe that raises, or whose model
   onnxruntime cannot load or run, becomes a *failed* candidate with the
   reason; the compile goes on.
5. Score each candidate against the reference (the accuracy gate).
6. If static int8 failed the gate, rank its most sensitive nodes, keep them
   in float, and retry a bounded number of times (a ``+exclude`` candidate).
7. Time fp32 and every candidate in interleaved rounds on this machine.
8. Apply the selection rule (:func:`~edgefleet.controller.compiler.report.select`).

Nothing that failed the gate can be chosen; if nothing passes, the compile
raises :class:`ToleranceError` naming the closest candidates.

Objectives (:func:`apply_objective`): ``latency`` ships the fastest passing
candidate and never one slower than fp32; ``size`` ships the smallest
passing candidate whose p50 is at most 1.1x fp32's. The report's notes say
which objective chose what.

Cost, and why it scales with the model rather than with the recipe count:

* Candidates are built one after another from one pre-processed model; only
  the live sessions of built candidates are kept.
* Static int8 calibrates once per method (minmax, percentile, entropy):
  onnxruntime's calibration cache in a per-compile work directory is
  reused by the per-channel, per-tensor, node-fallback and sensitivity-retry
  candidates. Calibration runs in strides of <= 8 samples
  (``CalibStridedMinMax``), so the histogram calibrators hold the
  activations of 8 samples at a time, not of every sample.
* Weight-only int8 and int4 need no calibration: one pass over the weights.
* Timing is interleaved rounds of every candidate; the number of rounds is
  cut so the rounds fit a 12 s budget (never fewer than 10), from a probe of
  the fp32 latency.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import platform
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgefleet.controller.compiler.data import (
    DataSource,
    Feed,
    SampleSet,
    check_state,
    load_samples,
    synthetic_feed,
)
from edgefleet.controller.compiler.errors import (
    CompileError,
    DataError,
    NoVariantError,
    RecipeError,
    SourceModelError,
    ToleranceError,
)
from edgefleet.controller.compiler.evaluate import (
    Accuracy,
    LatencyStats,
    check_labels,
    check_metrics,
    compare_outputs,
    measure_latency,
    record_stream_states,
    run_samples,
)
from edgefleet.controller.compiler.profiles import SIZE_MAX_LATENCY_RATIO, Profile
from edgefleet.controller.compiler.recipe_base import BuildInput, Built, Recipe, SourceRecipe
from edgefleet.controller.compiler.recipes import (
    DynamicInt8Recipe,
    WeightOnlyInt8Recipe,
    default_recipes,
    prepare_for_quantization,
)
from edgefleet.controller.compiler.report import (
    Attempt,
    CandidateReport,
    CompileReport,
    CompileResult,
    Variant,
    select,
)
from edgefleet.controller.compiler.sensitivity import NodeSensitivity, rank_sensitive_nodes
from edgefleet.controller.compiler.source import (
    SourceModel,
    first_line,
    load_onnx_source,
    make_session,
    read_source,
)
from edgefleet.controller.compiler.tflite import (
    litert_versions,
    load_tflite_source,
    make_tflite_session,
)
from edgefleet.protocols.hardware import normalize_arch, normalize_features
from edgefleet.shared.hardware import read_cpuinfo
from edgefleet.shared.runtime import is_tflite, onnx_session_config

# Timing every candidate in interleaved rounds is budgeted: rounds are cut
# (to no fewer than MIN_TIMING_ROUNDS) when they would take longer than this.
TIMING_BUDGET_S = 12.0
MIN_TIMING_ROUNDS = 10
# Scoring runs up to this many validation samples per call, and at most this
# many bytes of input per call (activation memory grows with the batch).
SCORE_BATCH_MAX = 8
SCORE_BATCH_BYTES = 2 << 20
# After the per-node sensitivity attempts: how many whole op types may be kept float.
OP_FALLBACK_ATTEMPTS = 2

__all__ = ["apply_objective", "compile_model", "host_info", "load_source", "make_onnx_session"]


def load_source(source: Path | str | bytes) -> SourceModel:
    """Read, parse, check and trial-load the fp32 source model.

    A file with the TFLite identifier (``TFL3`` at bytes 4..8) is loaded as a
    TFLite source (:func:`~edgefleet.controller.compiler.tflite.load_tflite_source`);
    anything else must be ONNX (:func:`~edgefleet.controller.compiler.source.load_onnx_source`).
    The choice is made here, above both loaders, so that neither imports the other.

    Raises:
        SourceModelError: the file cannot be read, is empty, is not an ONNX
            model, fails the ONNX checker, stores weights externally, has no
            inputs, or onnxruntime cannot load it (for TFLite: the flatbuffer
            is corrupt or the interpreter refuses it).
    """
    data, where = read_source(source)
    if is_tflite(data):
        return load_tflite_source(data, where)
    return load_onnx_source(data, where)


def host_info(profile: Profile | None = None) -> dict[str, Any]:
    """The machine latencies are measured on, and whether it has ``profile``'s features."""
    import onnxruntime as ort

    # The same /proc/cpuinfo reading as the agent's hardware report (flags
    # common to all cores), so "matches_profile" means what match_profile means.
    cpuinfo = read_cpuinfo()
    cpu = cpuinfo.model or platform.processor() or platform.machine()
    arch = normalize_arch(platform.machine())
    features = normalize_features(cpuinfo.flags, arch)
    interesting = {"avx2", "avx512f", "vnni", "avx512_vnni", "avx_vnni", "neon", "dotprod"}
    interesting |= {"asimddp", "fp16arith", "i8mm"}
    info: dict[str, Any] = {
        "cpu": cpu,
        "arch": arch,
        "features": sorted(features & interesting),
        "onnxruntime": ort.__version__,
    }
    if profile is not None and profile.runtime == "tflite":
        info.update(litert_versions())
    if profile is not None:
        # Extra int8 instructions matter as much as missing ones: a VNNI host
        # times int8 far faster than an AVX2-only device would run it.
        host_dot = bool({"vnni", "dotprod"} & features)
        info["matches_profile"] = (
            profile.arch in ("any", arch)
            and profile.features <= features
            and (profile.arch == "any" or host_dot == profile.int8_dot)
        )
    return info


@dataclass
class _Live:
    """A built candidate with what is needed to measure it (not part of the report)."""

    recipe: Recipe
    built: Built
    report: CandidateReport


def _resolve_recipes(profile: Profile, recipes: Sequence[str | Recipe] | None) -> list[Recipe]:
    defaults = default_recipes(profile)
    if recipes is None:
        return defaults
    by_name = {r.name: r for r in defaults}
    out: list[Recipe] = []
    for r in recipes:
        if isinstance(r, Recipe):
            out.append(r)
        elif r == "auto":
            out.extend(defaults)
        elif r in by_name:
            out.append(by_name[r])
        else:
            raise CompileError(f"unknown recipe {r!r}; known recipes: auto, {', '.join(by_name)}")
    seen: set[str] = set()
    unique = []
    for r in out:
        if r.name not in seen:
            seen.add(r.name)
            unique.append(r)
    return unique


def _check_reference(outputs: list[list[Any]], names: Sequence[str]) -> None:
    for i, sample in enumerate(outputs):
        for name, value in zip(names, sample, strict=True):
            arr = np.asarray(value)
            if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
                raise SourceModelError(
                    f"the fp32 source outputs NaN or infinity for {name!r} on validation "
                    f"sample {i}; nothing can be compared against it"
                )


def _session_factory(src: SourceModel) -> Callable[[bytes], Any]:
    """How candidates of this source are loaded for measuring: onnxruntime or TFLite."""
    if src.format == "tflite":
        return make_tflite_session
    return make_onnx_session


def make_onnx_session(model: bytes) -> Any:
    """An onnxruntime session opened the way the agent will open this model.

    Like :func:`~edgefleet.controller.compiler.source.make_session`, plus the
    session config entries the model asks for in its metadata (weight-only
    int8 asks for ``session.disable_quant_qdq=1``), read by the same
    :func:`~edgefleet.shared.runtime.onnx_session_config` as the agent's
    backend: a candidate is timed exactly as the gateway will run it.
    """
    config = onnx_session_config(model)
    if not config:
        return make_session(model)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for key, value in config.items():
        so.add_session_config_entry(key, value)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def apply_objective(
    reports: Sequence[CandidateReport], profile: Profile
) -> tuple[list[CandidateReport], str]:
    """The objective's own limits, applied before the shared selection rule; and what it means.

    ``latency`` (the default): the fastest candidate that passes the gate,
    never slower than fp32 (:func:`~edgefleet.controller.compiler.report.select`
    rejects p50 > fp32). ``size``, for bandwidth-bound fleets: the smallest
    candidate that passes the gate *and* runs within
    :data:`~edgefleet.controller.compiler.profiles.SIZE_MAX_LATENCY_RATIO` of
    fp32's p50; slower ones are rejected here with that reason, the rest are
    ranked smallest first by ``select``.

    Returns:
        The candidates (over-slow ones rejected) and a sentence for the
        report's notes saying how the objective chooses.
    """
    if profile.objective == "latency":
        return list(reports), (
            f"objective latency (profile {profile.name}): the fastest candidate that passes "
            "the accuracy gate, never slower than fp32; within 5% of the fastest, the smaller wins"
        )
    cap = SIZE_MAX_LATENCY_RATIO
    out: list[CandidateReport] = []
    for cand in reports:
        # A candidate failing the gate keeps that reason (select gives it).
        gated_out = cand.accuracy is not None and not cand.accuracy.passed
        too_slow = cand.latency_ratio is None or cand.latency_ratio > cap
        if cand.status != "measured" or gated_out or not too_slow:
            out.append(cand)
            continue
        what = (
            "latency not measured"
            if cand.latency_ratio is None
            else f"p50 {cand.latency_ratio:.2f}x fp32"
        )
        reason = f"objective size allows at most {cap:g}x fp32 latency: {what}"
        out.append(dataclasses.replace(cand, status="rejected", reason=reason, rank=None))
    return out, (
        f"objective size (profile {profile.name}): the smallest candidate that passes the "
        f"accuracy gate with p50 latency <= {cap:g}x fp32"
    )


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, RecipeError):
        return str(exc)
    return f"{type(exc).__name__}: {first_line(exc)}"


class _Compiler:
    """State of one compile; :func:`compile_model` is its only user."""

    def __init__(
        self,
        src: SourceModel,
        profile: Profile,
        *,
        tolerance: float,
        validation: SampleSet | None,
        calibration: SampleSet | None,
        metrics: Mapping[str, str] | None,
        max_accuracy_drop: float | None = None,
    ) -> None:
        self.src = src
        self.profile = profile
        self.tolerance = tolerance
        self.validation = validation
        self.calibration = calibration
        self.metrics = metrics
        self.max_accuracy_drop = max_accuracy_drop
        self.output_names = [o.name for o in src.outputs]
        self.reference: list[list[Any]] | None = None
        self.batch = 1  # validation samples per call (choose_batch)
        self.notes: list[str] = []
        self.reports: list[CandidateReport] = []
        self.lives: dict[str, _Live] = {}
        self.session = _session_factory(src)
        # Lives as long as the compile: the shared calibration caches.
        self._work = tempfile.TemporaryDirectory(prefix="edgefleet-compile-")
        self.work_dir = Path(self._work.name)
        self.iterations_used = 0
        self.runtime = "tflite" if src.format == "tflite" else "onnxruntime"

    def prepare(self) -> BuildInput:
        """Pre-process once for the quantizers; a failure only fails the recipes needing it.

        TFLite sources are quantized as they are (litert-quantizer reads the
        flatbuffer directly), so there is nothing to prepare.
        """
        if self.src.format == "tflite":
            return BuildInput(self.src, None, None, self.calibration)
        prepared: bytes | None = None
        error: str | None = None
        try:
            prepared = prepare_for_quantization(self.src)
        except Exception as exc:  # noqa: BLE001 - recorded; the compile goes on
            error = _describe_error(exc)
            self.notes.append(f"pre-processing failed ({error}); recipes needing it fail")
        return BuildInput(self.src, prepared, error, self.calibration, work_dir=self.work_dir)

    def build_all(self, recipes: Sequence[Recipe], inp: BuildInput) -> None:
        for recipe in recipes:
            reason = recipe.skip_reason(
                self.profile, self.src, has_calibration=self.calibration is not None
            ) or self.calibration_settled(recipe)
            if reason is not None:
                self.reports.append(
                    CandidateReport(
                        name=recipe.name,
                        recipe=recipe.name,
                        precision=recipe.precision,
                        status="skipped",
                        reason=reason,
                        description=recipe.description,
                        options=recipe.options(),
                    )
                )
                continue
            live, rep = self.build_one(recipe, inp)
            self.reports.append(rep)
            if live is not None:
                self.lives[rep.name] = live

    def calibration_settled(self, recipe: Recipe) -> str | None:
        """Why an alternative calibration of int8 is not worth building, or ``None``.

        Per-channel dynamic int8 builds the same graph as per-tensor dynamic
        int8 with finer weight scales: once per-tensor passes, it is skipped.

        Percentile and entropy calibration build the same graph as minmax
        with other activation ranges: they can only change accuracy, not size
        or speed, and their histogram calibration is the costliest step of a
        compile. Once a minmax candidate with the same weight granularity
        passes the gate, they are skipped.
        """
        if self.validation is None:
            return None
        if isinstance(recipe, DynamicInt8Recipe) and recipe.per_channel:
            for lv in self.lives.values():
                if (
                    isinstance(lv.recipe, DynamicInt8Recipe)
                    and not lv.recipe.per_channel
                    and lv.report.accuracy is not None
                    and lv.report.accuracy.passed
                ):
                    return (
                        f"{lv.report.name} already passes the accuracy gate; per-channel "
                        "weight scales run the same int8 kernels and could only change "
                        "accuracy (skipped to save compile time)"
                    )
            return None
        method = getattr(recipe, "method", None)
        if not recipe.static_int8 or method in (None, "minmax"):
            return None
        per_channel = getattr(recipe, "per_channel", None)
        for lv in self.lives.values():
            if (
                lv.recipe.static_int8
                and getattr(lv.recipe, "method", None) == "minmax"
                and getattr(lv.recipe, "per_channel", None) == per_channel
                and lv.report.accuracy is not None
                and lv.report.accuracy.passed
            ):
                return (
                    f"{lv.report.name} already passes the accuracy gate; {method} calibration "
                    "builds the same graph and could only change accuracy (skipped to save "
                    "compile time)"
                )
        return None

    def retry_closest_static(self, inp: BuildInput, attempts: int) -> None:
        """Sensitivity retries: the closest failing static int8, weight-only and dynamic int8.

        Retrying one static candidate keeps the cost bounded however many
        static recipes failed; the closest one needs the fewest nodes kept in
        float. Weight-only int8 is retried the same way (its error comes
        from a few weight tensors, which the same ranking finds), and so is
        dynamic int8: a transformer encoder's int8 MatMuls are fast on VNNI,
        but the one or two that read outlier activations (the FFN output
        projection after GELU is the usual one) cost the accuracy gate.

        Compile cost: at most ``attempts`` trial builds per kind (plus
        :data:`OP_FALLBACK_ATTEMPTS` per-operator ones for static and
        weight-only), each after one ranking pass of two runs over <= 16
        calibration samples; independent of the number of nodes, linear in
        the model's size.
        """
        self.retry_closest(inp, attempts, lambda r: r.static_int8)
        self.retry_closest(inp, attempts, lambda r: isinstance(r, WeightOnlyInt8Recipe))
        if not any(
            isinstance(lv.recipe, DynamicInt8Recipe)
            and lv.report.accuracy
            and lv.report.accuracy.passed
            for lv in self.lives.values()
        ):
            # (a passing dynamic candidate, e.g. per-channel, needs no fallback)
            self.retry_closest(inp, attempts, lambda r: isinstance(r, DynamicInt8Recipe))

    def retry_closest(self, inp: BuildInput, attempts: int, kind: Callable[[Recipe], bool]) -> None:
        failing = [
            lv
            for lv in self.lives.values()
            if kind(lv.recipe)
            and lv.report.accuracy is not None
            and not lv.report.accuracy.passed
            and not lv.report.excluded_nodes
        ]
        if not failing:
            return
        closest = max(failing, key=lambda lv: lv.report.score or 0.0)
        retried = self.retry_sensitive(closest, inp, attempts)
        if retried is not None:
            new_live, rep = retried
            self.reports.append(rep)
            if new_live is not None:
                self.lives[rep.name] = new_live

    def latency_feed(self) -> tuple[Feed, str]:
        if self.validation is not None:
            return self.validation.feed(0), "validation sample 0"
        if self.calibration is not None:
            return self.calibration.feed(0), "calibration sample 0"
        return synthetic_feed(self.src), "synthetic (no data given)"

    def measure(self, iterations: int, warmup: int) -> tuple[LatencyStats, str]:
        """Time fp32 and every live candidate interleaved; fill in the latency fields."""
        feed, feed_name = self.latency_feed()
        baseline_key = "\x00fp32-baseline"
        sessions: dict[str, Any] = {baseline_key: self.session(self.src.data)}
        # Fresh sessions, opened only now: the scoring sessions were closed
        # after scoring, so the build phase holds one candidate's session
        # at a time, and these never see a batch (their memory arenas stay
        # at a batch of one's size).
        open_errors: dict[str, str] = {}
        for name, live in self.lives.items():
            if isinstance(live.recipe, SourceRecipe):
                continue
            try:
                sessions[name] = self.session(live.built.model)
            except Exception as exc:  # noqa: BLE001 - it loaded for scoring; report, go on
                open_errors[name] = first_line(exc)
        iterations = self.bounded_iterations(
            sessions[baseline_key], feed, len(sessions), iterations
        )
        stats, errors = measure_latency(sessions, feed, iterations=iterations, warmup=warmup)
        errors = {**errors, **open_errors}
        baseline = stats.get(baseline_key)
        if baseline is None:
            hint = ""
            if self.validation is None and self.calibration is None:
                # Made-up input: dynamic axes of size 1 and zero integers may be
                # shapes or values the model cannot take; real data names them.
                hint = (
                    " (made-up input: dynamic axes set to 1, integer inputs to 0; pass "
                    "--validation data with real shapes and values)"
                )
            raise SourceModelError(
                f"the fp32 source cannot run on {feed_name}: {errors.get(baseline_key)}{hint}"
            )
        updated: list[CandidateReport] = []
        for rep in self.reports:
            lv = self.lives.get(rep.name)
            if lv is None:
                updated.append(rep)
                continue
            # The unchanged source *is* the baseline: same model, same rounds.
            st = baseline if isinstance(lv.recipe, SourceRecipe) else stats.get(rep.name)
            notes = rep.notes
            if rep.name in errors:
                notes = (*notes, f"latency run failed: {errors[rep.name]}")
            updated.append(
                dataclasses.replace(
                    rep,
                    latency=st,
                    latency_ratio=None if st is None else st.p50_ms / baseline.p50_ms,
                    latency_ratio_p95=None if st is None else st.p95_ms / baseline.p95_ms,
                    notes=notes,
                )
            )
        self.reports = updated
        return baseline, feed_name

    def bounded_iterations(self, baseline: Any, feed: Feed, sessions: int, asked: int) -> int:
        """Timing rounds, fewer when ``asked`` rounds of every candidate would exceed the budget.

        A few probe runs of the fp32 source estimate one round's cost
        (``sessions`` x fp32 latency); the rounds are then cut to fit
        :data:`TIMING_BUDGET_S`, but never below :data:`MIN_TIMING_ROUNDS`,
        so timing scales with model size instead of multiplying it by 50.
        """
        self.iterations_used = asked
        try:
            baseline.run(None, feed)  # first run allocates: not a round's cost
            started = time.perf_counter()
            for _ in range(3):
                baseline.run(None, feed)
            per_run = (time.perf_counter() - started) / 3
        except Exception:  # noqa: BLE001 - measure() reports the fp32 failure itself
            return asked
        fits = int(TIMING_BUDGET_S / max(per_run * sessions, 1e-9))
        used = min(asked, max(MIN_TIMING_ROUNDS, fits))
        if used < asked:
            self.notes.append(
                f"latency: {used} interleaved rounds instead of {asked} (fp32 runs "
                f"{per_run * 1e3:.1f} ms, {sessions} models, {TIMING_BUDGET_S:g} s timing budget)"
            )
        self.iterations_used = used
        return used

    def close(self) -> None:
        """Remove the compile's working files (calibration caches)."""
        self._work.cleanup()

    def reference_outputs(self) -> None:
        session = self.session(self.src.data)
        if self.calibration is not None:
            try:
                session.run(None, self.calibration.feed(0))
            except Exception as exc:  # noqa: BLE001 - the runtimes raise RuntimeError subclasses
                raise DataError(
                    f"the fp32 source cannot run calibration sample 0: {first_line(exc)}"
                ) from None
            try:
                self.calibration = record_stream_states(session, self.calibration)
            except Exception as exc:  # noqa: BLE001 - as above
                raise DataError(
                    f"the fp32 source cannot run the calibration streams: {first_line(exc)}"
                ) from None
        if self.validation is None:
            return
        try:
            self.reference = run_samples(session, self.validation, self.output_names)
        except Exception as exc:  # noqa: BLE001 - as above
            raise DataError(
                f"the fp32 source cannot run the validation data: {first_line(exc)}"
            ) from None
        self.batch = self.choose_batch(session)
        _check_reference(self.reference, self.output_names)
        try:
            check_labels(self.reference, self.output_names, self.validation, self.metrics)
        except ValueError as exc:
            raise DataError(f"validation labels: {exc}") from None

    def choose_batch(self, session: Any) -> int:
        """How many validation samples each candidate runs per call; 1 when batching is unsafe.

        Batched only for ONNX models whose every input and output has a
        dynamic axis 0 that the data uses as the batch axis, without a state
        mapping, and only when the fp32 source's batched outputs equal its
        one-by-one outputs (the reference, already computed): a model that
        mixes samples across axis 0 keeps one sample per call. The batch
        holds at most :data:`SCORE_BATCH_MAX` samples and
        :data:`SCORE_BATCH_BYTES` of input, so activation memory stays a
        few samples' worth.
        """
        val = self.validation
        if val is None or self.reference is None or val.state or val.count < 2:
            return 1
        if self.src.format != "onnx" or not all(val.batched.values()):
            return 1
        specs = (*self.src.inputs, *self.src.outputs)
        if any(not s.shape or s.shape[0] is not None for s in specs):
            return 1
        per_sample = sum(int(a[0:1].nbytes) for a in val.arrays.values())
        batch = min(SCORE_BATCH_MAX, val.count, SCORE_BATCH_BYTES // max(per_sample, 1))
        if batch < 2:
            return 1
        try:
            head = dataclasses.replace(val, count=batch)
            batched = run_samples(session, head, self.output_names, batch=batch)
        except Exception as exc:  # noqa: BLE001 - any failure means: do not batch
            self.notes.append(f"validation runs one sample per call ({first_line(exc)})")
            return 1
        for ref, got in zip(self.reference[:batch], batched, strict=True):
            for r, g in zip(ref, got, strict=True):
                r_arr, g_arr = np.asarray(r), np.asarray(g)
                scale = float(np.max(np.abs(r_arr))) if r_arr.size else 0.0
                if r_arr.shape != g_arr.shape or not np.allclose(
                    r_arr, g_arr, rtol=1e-3, atol=1e-5 * max(scale, 1.0)
                ):
                    self.notes.append(
                        "validation runs one sample per call: the fp32 source's outputs for a "
                        "batch differ from its one-by-one outputs"
                    )
                    return 1
        self.notes.append(
            f"validation runs {batch} samples per call (every input and output has a dynamic "
            "batch axis, and the fp32 source's batched outputs match its one-by-one outputs)"
        )
        return batch

    def score(self, session: Any) -> Accuracy | None:
        if self.validation is None or self.reference is None:
            return None
        outputs = None
        if self.batch > 1:
            try:
                outputs = run_samples(session, self.validation, self.output_names, batch=self.batch)
            except Exception:  # noqa: BLE001 - retried one by one, which reports the failure
                outputs = None
        if outputs is None:
            outputs = run_samples(session, self.validation, self.output_names)
        return compare_outputs(
            self.reference,
            outputs,
            self.output_names,
            tolerance=self.tolerance,
            metrics=self.metrics,
            samples=self.validation,
            max_accuracy_drop=self.max_accuracy_drop,
        )

    def build_one(
        self,
        recipe: Recipe,
        inp: BuildInput,
        *,
        name: str | None = None,
        exclude: Sequence[str] = (),
    ) -> tuple[_Live | None, CandidateReport]:
        """Build, load and score one candidate; failures become a failed report."""
        base = CandidateReport(
            name=name or recipe.name,
            recipe=recipe.name,
            precision=recipe.precision,
            status="failed",
            description=recipe.description,
            options=recipe.options(),
            excluded_nodes=tuple(exclude),
        )
        try:
            built = recipe.build(inp, nodes_to_exclude=exclude)
        except Exception as exc:  # noqa: BLE001 - any recipe failure is recorded, not raised
            return None, dataclasses.replace(base, reason=f"build failed: {_describe_error(exc)}")
        base = dataclasses.replace(
            base,
            options=dict(built.options) or base.options,
            notes=built.notes,
            size_bytes=len(built.model),
            size_ratio=len(built.model) / self.src.size_bytes,
            sha256=hashlib.sha256(built.model).hexdigest(),
        )
        try:
            session = self.session(built.model)
        except Exception as exc:  # noqa: BLE001 - the runtimes raise RuntimeError subclasses
            return None, dataclasses.replace(
                base, reason=f"{self.runtime} cannot load it: {first_line(exc)}"
            )
        try:
            accuracy = self.score(session)
        except Exception as exc:  # noqa: BLE001 - as above
            return None, dataclasses.replace(
                base, reason=f"{self.runtime} failed running it: {first_line(exc)}"
            )
        report = dataclasses.replace(base, status="measured", accuracy=accuracy)
        # Closed now (measure() opens a fresh one): keeping every candidate's
        # scoring session alive until timing cost PP-OCRv4 rec ~1.5 GB.
        del session
        return _Live(recipe, built, report), report

    def op_type_fallback(
        self,
        recipe: Recipe,
        inp: BuildInput,
        name: str,
        excluded: list[str],
        ranking: Sequence[NodeSensitivity],
        history: list[Attempt],
        result: tuple[_Live | None, CandidateReport],
    ) -> tuple[_Live | None, CandidateReport]:
        """Per-operator fallback after the per-node attempts failed.

        When the error is spread over many nodes of one op type (every
        MatMul of a block, every LayerNorm Mul), excluding nodes one by one
        runs out of attempts. The op types are ranked by the error their
        nodes add in total (the last sensitivity ranking), and all nodes of
        the worst type, then of the next, stay float, at most
        :data:`OP_FALLBACK_ATTEMPTS` times; it stops at the first pass.
        """
        assert inp.prepared is not None
        totals: dict[str, float] = {}
        for sens in ranking:
            if sens.node not in excluded and math.isfinite(sens.added):
                totals[sens.op_type] = totals.get(sens.op_type, 0.0) + sens.added
        graph = onnx.load_model_from_string(inp.prepared).graph
        worst = sorted(totals, key=lambda op: (-totals[op], op))[:OP_FALLBACK_ATTEMPTS]
        for op in worst:
            excluded.extend(
                n.name for n in graph.node if n.op_type == op and n.name not in excluded
            )
            new_live, rep = self.build_one(recipe, inp, name=name, exclude=excluded)
            passed = bool(rep.accuracy and rep.accuracy.passed)
            history.append(
                Attempt(
                    tuple(excluded),
                    rep.score,
                    passed,
                    sensitive=tuple(s for s in ranking if s.op_type == op)[:5],
                    error=None if new_live else rep.reason,
                )
            )
            result = (new_live, rep)
            if new_live is None or passed:
                break
        return result

    def retry_sensitive(
        self, live: _Live, inp: BuildInput, attempts: int
    ) -> tuple[_Live | None, CandidateReport] | None:
        """Exclude the most sensitive nodes of a failing static int8 candidate and rebuild.

        Attempt *k* (0-based) adds the ``2**k`` most sensitive nodes not yet
        excluded, re-ranking on the latest model each time, and stops at the
        first attempt that passes. If none does, whole op types follow
        (:meth:`op_type_fallback`). Ranking uses the calibration samples, so
        the validation samples stay an independent check.
        """
        if inp.prepared is None or self.calibration is None:
            return None
        excluded: list[str] = []
        history: list[Attempt] = []
        current = live
        result: tuple[_Live | None, CandidateReport] | None = None
        name = f"{live.recipe.name}+exclude"
        last_ranking: list[NodeSensitivity] = []
        cap, total = _fallback_cap(live.recipe, inp.prepared)
        for k in range(attempts):
            try:
                ranking = rank_sensitive_nodes(
                    inp.prepared,
                    current.built.model,
                    self.calibration,
                    quantizable=live.recipe.quantizable_ops(),
                )
            except Exception as exc:  # noqa: BLE001 - analysis failure ends the retries
                history.append(
                    Attempt(
                        tuple(excluded),
                        None,
                        False,
                        error=f"sensitivity analysis failed: {_describe_error(exc)}",
                    )
                )
                break
            last_ranking = ranking
            room = 2**k if cap is None else min(2**k, cap - len(excluded))
            # A node adding no error of its own (its output is no worse than
            # its input) gains nothing in float; keeping it there only costs.
            fresh = [s for s in ranking if s.node not in excluded and s.added > 0.0]
            fresh = fresh[: max(room, 0)]
            if not fresh:
                if cap is not None and len(excluded) >= cap:
                    self.notes.append(
                        f"{name}: stopped after keeping {len(excluded)} of {total} quantizable "
                        "nodes in float: keeping more would leave little of the int8 speed-up"
                    )
                break
            excluded.extend(s.node for s in fresh)
            new_live, rep = self.build_one(live.recipe, inp, name=name, exclude=excluded)
            passed = bool(rep.accuracy and rep.accuracy.passed)
            history.append(
                Attempt(
                    tuple(excluded),
                    rep.score,
                    passed,
                    sensitive=tuple(ranking[:5]),
                    error=None if new_live else rep.reason,
                )
            )
            result = (new_live, rep)
            if new_live is None or passed:
                break
            current = new_live
            last_ranking = ranking
        if cap is None and result is not None and result[0] is not None and not history[-1].passed:
            result = self.op_type_fallback(
                live.recipe, inp, name, excluded, last_ranking, history, result
            )
        if result is None:
            return None
        new_live, rep = result
        rep = dataclasses.replace(rep, attempts=tuple(history))
        if new_live is not None:
            new_live.report = rep
        return new_live, rep


def _fallback_cap(recipe: Recipe, prepared: bytes) -> tuple[int | None, int]:
    """How many nodes a dynamic int8 retry may keep in float (``None``: no cap), of how many.

    Dynamic int8 pays off only in speed (its MatMulInteger kernels), and a
    MatMul kept in float also pays a float-to-int8 round trip around it, so
    once half of its quantizable nodes are float the speed-up is mostly
    gone: the retries stop there (and skip the per-operator fallback, which
    would keep every MatMul float). Static and weight-only int8 also win on
    size, so they keep the per-operator fallback.
    """
    ops = recipe.quantizable_ops()
    graph = onnx.load_model_from_string(prepared).graph
    # Only nodes with a constant operand are quantized (MatMulConstBOnly):
    # an attention MatMul of two activations stays float either way.
    weights = {i.name for i in graph.initializer}
    total = sum(1 for n in graph.node if n.op_type in ops and weights & set(n.input))
    if not isinstance(recipe, DynamicInt8Recipe):
        return None, total
    return max(total // 2, 1), total


def compile_model(
    source: Path | str | bytes,
    profile: Profile,
    *,
    calibration: DataSource | None = None,
    validation: DataSource | None = None,
    tolerance: float = 0.01,
    recipes: Sequence[str | Recipe] | None = None,
    metrics: Mapping[str, str] | None = None,
    state: Mapping[str, str] | None = None,
    max_accuracy_drop: float | None = None,
    latency_iterations: int = 50,
    latency_warmup: int = 5,
    max_calibration_samples: int = 128,
    max_validation_samples: int = 500,
    sensitivity_attempts: int = 3,
) -> CompileResult:
    """Compile an fp32 model into accuracy-gated variants for one device profile.

    An ``onnxruntime`` profile compiles an ONNX source; a ``tflite`` profile
    compiles a float ``.tflite`` source with the TFLite recipes
    (:mod:`~edgefleet.controller.compiler.tflite`). The gate, the latency
    rounds and the report are the same for both.

    Args:
        source: the fp32 ONNX or ``.tflite`` model (path or bytes).
        profile: the device class to compile for.
        calibration: ``.npz`` path or mapping of input name to samples, for
            static int8 (see :mod:`~edgefleet.controller.compiler.data`).
        validation: same format; every candidate is compared with the fp32
            source on these. Without it accuracy is unverified.
        tolerance: the gate passes at score ``>= 1 - tolerance`` (top-1
            agreement for classifier outputs, mean cosine otherwise).
        recipes: recipe names or objects to try; ``None`` (or ``"auto"``) is
            every built-in recipe the profile and op mix call for.
        metrics: per output name, force ``top1``, ``topk:K``, ``cosine``,
            ``mae:X``, ``exact`` or ``threshold:T`` (decision agreement at ``T``);
            see :mod:`~edgefleet.controller.compiler.evaluate`.
        state: state input name to the output fed back into it: validation
            (and calibration) samples are then consecutive steps of streams,
            each model runs its own state through them and every step is
            scored (see :mod:`~edgefleet.controller.compiler.data`).
        max_accuracy_drop: with ``label:<output>`` arrays in the validation
            data, also fail a candidate whose label accuracy is more than
            this below fp32's.
        latency_iterations: interleaved timing rounds.
        latency_warmup: untimed runs per model first.
        max_calibration_samples / max_validation_samples: use at most this
            many samples (the first ones).
        sensitivity_attempts: bounded retries that keep sensitive nodes of a
            failing static int8 candidate in float (0 disables).

    Returns:
        The report and the eligible variants, best first.

    Raises:
        CompileError: bad tolerance, a source format the profile's runtime
            cannot use, unknown recipe or metric.
        SourceModelError: the source is unreadable, not ONNX or TFLite, or cannot run.
        DataError: calibration/validation data do not fit the model.
        ToleranceError: with validation data, no candidate met the tolerance.
        NoVariantError: candidates passed the gate but none fits the budget or
            is at least as fast as fp32 (latency objective).
    """
    _check_job(profile, tolerance, latency_iterations, latency_warmup, sensitivity_attempts)
    started = time.time()
    src = load_source(source)
    _check_format(src, profile)
    metrics = _check_metrics(src, metrics)
    state = check_state(src, state)
    if max_accuracy_drop is not None and not (0.0 <= max_accuracy_drop <= 1.0):
        raise CompileError(f"max_accuracy_drop must be in [0, 1], got {max_accuracy_drop!r}")
    chosen_recipes = _resolve_recipes(profile, recipes)
    val = (
        None
        if validation is None
        else load_samples(
            validation, src, role="validation", max_samples=max_validation_samples, state=state
        )
    )
    cal = (
        None
        if calibration is None
        else load_samples(
            calibration, src, role="calibration", max_samples=max_calibration_samples, state=state
        )
    )
    if max_accuracy_drop is not None and (val is None or not val.labels):
        raise CompileError("max_accuracy_drop needs 'label:<output>' arrays in the validation data")
    comp = _Compiler(
        src,
        profile,
        tolerance=float(tolerance),
        validation=val,
        calibration=cal,
        metrics=metrics,
        max_accuracy_drop=max_accuracy_drop,
    )
    comp.reference_outputs()
    if src.lifted_constants:
        comp.notes.append(
            f"{src.lifted_constants} Constant node(s) lifted to initializers so the quantizers "
            "and the fp16 converter see the weights they hold (the fp32 candidate is the "
            "source as given)"
        )
    for s in (val, cal):
        if s is not None and s.count < s.total:
            comp.notes.append(f"{s.role}: used the first {s.count} of {s.total} samples")
    inp = comp.prepare()
    comp.build_all(chosen_recipes, inp)
    if sensitivity_attempts > 0:
        comp.retry_closest_static(inp, sensitivity_attempts)
    baseline, feed_name = comp.measure(latency_iterations, latency_warmup)
    comp.close()
    capped, objective_note = apply_objective(comp.reports, profile)
    judged = select(capped, profile, tolerance=float(tolerance))
    ranked = sorted((c for c in judged if c.rank is not None), key=lambda c: c.rank or 0)
    comp.notes.append(objective_note + _chosen_note(ranked))
    host = host_info(profile)
    if not host.get("matches_profile", True):
        comp.notes.append(
            f"this machine ({host['cpu']}, {host['arch']}, {'/'.join(host['features'])}) is not "
            f"a {profile.name} device: accuracy and latency were measured here and may "
            "differ on the devices"
        )
    comp.notes.append(f"model kind: {src.kind}; compile took {time.time() - started:.1f} s")
    report = CompileReport(
        source={
            "sha256": src.sha256,
            "size_bytes": src.size_bytes,
            "weight_bytes": src.weight_bytes,
            "kind": src.kind,
            "opset": src.opset,
            "lifted_constants": src.lifted_constants,
            "op_counts": dict(sorted(src.op_counts.items())),
            "inputs": [s.to_dict() for s in src.inputs],
            "outputs": [s.to_dict() for s in src.outputs],
        },
        profile=profile,
        tolerance=float(tolerance),
        verified=val is not None,
        validation_samples=0 if val is None else val.count,
        calibration_samples=0 if cal is None else cal.count,
        baseline_latency=baseline,
        latency_config={
            "iterations": comp.iterations_used or latency_iterations,
            "warmup": latency_warmup,
            "intra_op_threads": 1,
            "runtime": comp.runtime,
            "input": feed_name,
            "interleaved": True,
        },
        host=host,
        candidates=tuple(judged),
        chosen=tuple(c.name for c in ranked),
        notes=tuple(comp.notes),
        created_at=time.time(),
    )
    if not ranked:
        _raise_nothing_chosen(report)
    variants = [
        Variant(
            name=c.name,
            recipe=c.recipe,
            precision=c.precision,
            model=comp.lives[c.name].built.model,
            metrics=c,
            profile=profile.name,
            inputs=src.inputs,
            outputs=src.outputs,
        )
        for c in ranked
    ]
    return CompileResult(report=report, chosen=variants)


def _chosen_note(ranked: Sequence[CandidateReport]) -> str:
    if not ranked:
        return "; nothing qualified"
    best = ranked[0]
    size = f"{1 / best.size_ratio:.2f}x smaller" if best.size_ratio else "size n/a"
    lat = f"p50 {best.latency_ratio:.2f}x fp32" if best.latency_ratio is not None else "latency n/a"
    return f"; chose {best.name} ({size}, {lat})"


def _check_job(
    profile: Profile, tolerance: float, iterations: int, warmup: int, attempts: int
) -> None:
    if (
        isinstance(tolerance, bool)
        or not isinstance(tolerance, int | float)
        or not math.isfinite(tolerance)
        or not (0.0 <= tolerance < 1.0)
    ):
        raise CompileError(f"tolerance must be a number in [0, 1), got {tolerance!r}")
    if profile.runtime not in ("onnxruntime", "tflite"):
        raise CompileError(
            f"profile {profile.name!r} targets {profile.runtime}; this compiler builds "
            "onnxruntime and tflite variants only"
        )
    if iterations < 1 or warmup < 0 or attempts < 0:
        raise CompileError("latency_iterations must be >= 1, warmup and attempts >= 0")


def _check_format(src: SourceModel, profile: Profile) -> None:
    """Refuse a source the profile's runtime cannot run; there is no converter in between."""
    if profile.runtime == "tflite" and src.format != "tflite":
        raise CompileError(
            f"profile {profile.name!r} targets tflite, but the source is an ONNX model: "
            "converting ONNX to TFLite needs full TensorFlow and is not built in; convert "
            "it to a float .tflite first (for example with onnx2tf) and compile that"
        )
    if profile.runtime == "onnxruntime" and src.format != "onnx":
        raise CompileError(
            f"profile {profile.name!r} targets onnxruntime, but the source is a TFLite "
            "model; compile it for a tflite profile (such as arm64-litert) instead"
        )


def _check_metrics(src: SourceModel, metrics: Mapping[str, str] | None) -> dict[str, str]:
    try:
        return check_metrics(src.outputs, metrics)
    except ValueError as exc:
        raise CompileError(str(exc)) from None


def _raise_nothing_chosen(report: CompileReport) -> None:
    scored = [c for c in report.candidates if c.accuracy is not None]
    if report.verified and scored and not any(c.accuracy and c.accuracy.passed for c in scored):
        best = sorted(scored, key=lambda c: -(c.score or 0.0))[:3]
        closest = tuple((c.name, c.score or 0.0) for c in best)
        listing = ", ".join(f"{n} {s:.4f}" for n, s in closest)
        raise ToleranceError(
            f"no candidate meets tolerance {report.tolerance:g} (needs score >= "
            f"{1 - report.tolerance:.4f}); closest: {listing}",
            report,
            closest,
        )
    reasons = [f"{c.name}: {c.reason}" for c in report.candidates if c.status != "skipped"]
    if not reasons:
        reasons = [f"{c.name}: {c.reason}" for c in report.candidates]
    raise NoVariantError(
        f"no variant for profile {report.profile.name}: " + "; ".join(reasons)[:600],
        report,
    )
