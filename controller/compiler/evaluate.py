"""Measuring candidates: accuracy against the fp32 source, and interleaved latency.

Accuracy rule (the gate)
------------------------
Every candidate runs on the same validation samples as the fp32 source and
each model output gets a score in ``[0, 1]`` by its metric. The metric is
chosen from the output's dtype, shape and values, or given by the user
(``--metric NAME=SPEC``, ``metrics={name: spec}``):

* ``top1`` (default for 2-D float outputs whose last dimension is > 1, i.e.
  classifiers): the fraction of rows whose arg-max equals the source's.
* ``topk:K``: per row, the share of the source's K highest classes that are
  also among the candidate's K highest, averaged over rows (the top-K list a
  product shows is preserved).
* ``threshold:T`` (default for a single probability per row: float, last
  dimension 1, every reference value in ``[0, 1]``, ``T`` = 0.5): the
  fraction of values on the same side of ``T`` as the source's, i.e.
  decision agreement. Cosine similarity of one positive number is always
  1, so it cannot see a variant that flips decisions.
* ``mae:X``: the fraction of samples whose mean absolute error against the
  source is at most ``X`` (regression outputs with a known error budget).
* ``exact`` (default for integer or boolean outputs): the fraction of
  samples whose output is identical.
* ``cosine`` (default otherwise): the cosine similarity of the flattened
  output and the source's, per sample, averaged over samples. A sample with
  NaN or infinity in the candidate's output scores 0; two all-zero outputs
  score 1.

The relative L2 error ``||y - y_fp32|| / ||y_fp32||`` over all samples is
reported alongside float outputs for information but does not gate.

A candidate passes when **every** output's score is at least
``1 - tolerance`` (default tolerance 0.01: top-1 agreement >= 99 %, or mean
cosine >= 0.99). The candidate's score is its worst output's score.

Streams (stateful models)
-------------------------
With a state mapping (``--state IN=OUT``, see
:mod:`~edgefleet.controller.compiler.data`), :func:`run_samples` runs each
stream step by step and feeds every model its *own* state output back, so
the error a candidate builds up through the state is measured, as on a
device. Every step is scored as above. For ``threshold`` outputs the report
also gives whole-stream agreement: the share of streams in which every
step's decision equals the source's (information; the per-step score gates).

Labels
------
``label:<output>`` arrays in the validation data give the true answers. The
report then shows real accuracy for fp32 and for every candidate (``top1``
and ``topk:K``: the label is the arg-max / among the K highest; ``threshold``:
the decision equals the 0/1 label; ``exact``: the value equals the label).
With ``max_accuracy_drop`` a candidate also fails the gate when its accuracy
is more than that below fp32's.

Latency rule
------------
All sessions use one intra-op thread. After a warm-up, the timed runs go
round-robin over fp32 and every candidate, rotating the order each round, so
a burst of load from another process on a shared machine hits all models
alike. p50 and p95 are per-model percentiles of the same rounds, by nearest
rank (:mod:`edgefleet.shared.latency`), the definition the agent reports.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.controller.compiler.data import Feed, SampleSet
from edgefleet.protocols.bundle import TensorSpec
from edgefleet.shared.latency import percentiles

__all__ = [
    "METRICS",
    "METRIC_SYNTAX",
    "Accuracy",
    "LatencyStats",
    "OutputScore",
    "check_labels",
    "check_metrics",
    "choose_metric",
    "compare_outputs",
    "measure_latency",
    "parse_metric",
    "record_stream_states",
    "run_samples",
]

METRICS = ("top1", "topk", "cosine", "mae", "threshold", "exact", "ignore")
METRIC_SYNTAX = "top1, topk:K, cosine, mae:X, threshold:T, exact or ignore"
# The decision threshold of a probability output when none is given.
DEFAULT_THRESHOLD = 0.5
Outputs = list[list[npt.NDArray[Any]]]
_EPS = 1e-12
# Metrics whose score is a plain agreement fraction (shown as a percentage).
_FRACTION_KINDS = ("top1", "topk", "threshold", "exact", "mae")


@dataclass(frozen=True)
class OutputScore:
    """The score of one model output.

    Attributes:
        name: output name.
        metric: ``top1``, ``topk:K``, ``cosine``, ``mae:X``, ``exact``, ``threshold:T``
            or ``ignore`` (scored by cosine for the report, left out of the gate:
            an output nobody reads, such as a padded hidden state).
        score: agreement fraction, share of samples within the MAE bound, or
            mean cosine similarity.
        worst: the lowest per-sample (per-row for top-k) score.
        rel_error: relative L2 error over all samples (float outputs only).
        chosen_by: ``"user"`` or ``"default: <why>"``: how the metric was picked.
        mae: mean absolute error against the source over all values (float outputs).
        streams: number of streams scored (0 when samples are independent).
        stream_score: for ``threshold`` outputs over streams, the share of
            streams whose every decision equals the source's.
        label_accuracy: accuracy against ``label:<name>`` (``None`` without labels).
        reference_label_accuracy: the fp32 source's accuracy on the same labels.
    """

    name: str
    metric: str
    score: float
    worst: float
    rel_error: float | None = None
    chosen_by: str = "default"
    mae: float | None = None
    streams: int = 0
    stream_score: float | None = None
    label_accuracy: float | None = None
    reference_label_accuracy: float | None = None

    @property
    def kind(self) -> str:
        return self.metric.partition(":")[0]

    @property
    def gated(self) -> bool:
        """Whether this output counts in the accuracy gate (not ``ignore``)."""
        return self.kind != "ignore"

    def score_text(self) -> str:
        """``decisions@0.5 97.00%``, ``cos 0.99871``, ``top1 99.50%``..."""
        if self.kind == "ignore":
            return f"not gated (cos {self.score:.5f})"
        if self.kind == "cosine":
            return f"cos {self.score:.5f}"
        label = {
            "threshold": f"decisions@{self.metric.partition(':')[2]}",
            "mae": f"mae<={self.metric.partition(':')[2]}",
        }.get(self.kind, self.metric)
        return f"{label} {self.score * 100:.2f}%"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "metric": self.metric,
            "score": self.score,
            "worst": self.worst,
            "rel_error": self.rel_error,
            "chosen_by": self.chosen_by,
            "mae": self.mae,
            "streams": self.streams,
            "stream_score": self.stream_score,
            "label_accuracy": self.label_accuracy,
            "reference_label_accuracy": self.reference_label_accuracy,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OutputScore:
        def opt(key: str) -> float | None:
            v = d.get(key)
            return None if v is None else float(v)

        return cls(
            name=str(d["name"]),
            metric=str(d["metric"]),
            score=float(d["score"]),
            worst=float(d["worst"]),
            rel_error=opt("rel_error"),
            chosen_by=str(d.get("chosen_by", "default")),
            mae=opt("mae"),
            streams=int(d.get("streams", 0)),
            stream_score=opt("stream_score"),
            label_accuracy=opt("label_accuracy"),
            reference_label_accuracy=opt("reference_label_accuracy"),
        )


@dataclass(frozen=True)
class Accuracy:
    """Scores of all outputs of one candidate, and the threshold they were held to.

    Attributes:
        outputs: one score per model output.
        threshold: the gate, ``1 - tolerance``.
        samples: validation samples (steps, for streams) scored.
        max_accuracy_drop: when set, an output with labels also fails when its
            label accuracy is more than this below the fp32 source's.
    """

    outputs: tuple[OutputScore, ...]
    threshold: float
    samples: int
    max_accuracy_drop: float | None = None

    @property
    def score(self) -> float:
        """The worst gated output's score: what the gate compares with ``threshold``."""
        gated = [o.score for o in self.outputs if o.gated]
        return min(gated) if gated else 0.0

    def label_failure(self) -> OutputScore | None:
        """The output whose label accuracy dropped too far below fp32's, if any."""
        if self.max_accuracy_drop is None:
            return None
        for o in self.outputs:
            if not o.gated or o.label_accuracy is None or o.reference_label_accuracy is None:
                continue
            if o.label_accuracy < o.reference_label_accuracy - self.max_accuracy_drop - 1e-9:
                return o
        return None

    @property
    def passed(self) -> bool:
        # The slack absorbs float rounding of 1 - tolerance (0.99 is not exact).
        return self.score >= self.threshold - 1e-9 and self.label_failure() is None

    @property
    def summary(self) -> str:
        worst = min((o for o in self.outputs if o.gated), key=lambda o: o.score)
        return worst.score_text()

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "passed": self.passed,
            "threshold": self.threshold,
            "samples": self.samples,
            "max_accuracy_drop": self.max_accuracy_drop,
            "outputs": [o.to_dict() for o in self.outputs],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Accuracy:
        drop = d.get("max_accuracy_drop")
        return cls(
            outputs=tuple(OutputScore.from_dict(o) for o in d["outputs"]),
            threshold=float(d["threshold"]),
            samples=int(d["samples"]),
            max_accuracy_drop=None if drop is None else float(drop),
        )


def run_samples(
    session: Any, samples: SampleSet, output_names: Sequence[str], *, batch: int = 1
) -> Outputs:
    """Run every sample through ``session``; per sample, the outputs in ``output_names`` order.

    ``batch`` > 1 runs that many samples per call (:func:`_run_batched`);
    only for models whose inputs and outputs all have a dynamic batch axis,
    and never with a state mapping (streams run step by step).

    With a state mapping (``samples.state``) the samples are steps of
    streams: each step after a stream's first gets the state outputs of the
    step before, from this same session (see the module docstring).

    Raises:
        ValueError: a state output whose shape or dtype cannot feed its input.
        Exception: whatever the runtime raises on a sample it cannot run.
    """
    names = list(output_names)
    if samples.state:
        return _run_streams(session, samples, names)[0]
    if batch > 1:
        return _run_batched(session, samples, names, batch)
    return [list(session.run(names, feed)) for feed in samples.feeds()]


def _run_batched(session: Any, samples: SampleSet, names: list[str], batch: int) -> Outputs:
    """Run ``batch`` samples per call and split the outputs back into batches of one.

    One call per sample pays onnxruntime's per-run overhead (feed checks,
    allocation, thread hand-off) for every sample; a compile scores every
    candidate on every validation sample, so for small models that overhead
    is most of the scoring time. The split rows are views of the batch
    output, shaped exactly like a batch-of-one run's.

    Raises:
        ValueError: an output's axis 0 is not the batch (it does not have
            one row per sample), so the outputs cannot be split per sample.
    """
    import onnxruntime as ort

    # The session stays alive for the latency rounds (batches of one); a
    # batch grows its memory arena to the batch's activations, so the last
    # batched run hands the unused arena chunks back (measured on PP-OCRv4
    # rec: ~55 MB kept per session after a batch of 8, ~30 MB with this,
    # ~24 MB one by one).
    shrink = ort.RunOptions()
    shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    results: Outputs = []
    for start in range(0, samples.count, batch):
        stop = min(start + batch, samples.count)
        last = stop >= samples.count
        outs = session.run(names, samples.batch_feed(start, stop), shrink if last else None)
        for name, out in zip(names, outs, strict=True):
            arr = np.asarray(out)
            if arr.ndim == 0 or arr.shape[0] != stop - start:
                raise ValueError(
                    f"output {name!r} has shape {arr.shape} for a batch of {stop - start}: "
                    "its axis 0 is not the batch axis"
                )
        results.extend([np.asarray(out)[j : j + 1] for out in outs] for j in range(stop - start))
    return results


def record_stream_states(session: Any, samples: SampleSet) -> SampleSet:
    """``samples`` with each state input set to the state ``session`` really had at that step.

    Calibration of a stateful model needs the states a stream produces, not
    the zeros or whatever the data file holds: this runs the streams through
    ``session`` (the fp32 source) and stores what was fed. Without a state
    mapping the samples are returned unchanged.
    """
    if not samples.state:
        return samples
    _, fed = _run_streams(session, samples, [])
    arrays = dict(samples.arrays)
    batched = dict(samples.batched)
    for name, values in fed.items():
        arrays[name] = np.stack(values)
        batched[name] = False
    return dataclasses.replace(samples, arrays=arrays, batched=batched)


def _run_streams(
    session: Any, samples: SampleSet, names: list[str]
) -> tuple[Outputs, dict[str, list[npt.NDArray[Any]]]]:
    state = dict(samples.state)
    run_names = names + [o for o in dict.fromkeys(state.values()) if o not in names]
    index = {n: k for k, n in enumerate(run_names)}
    results: Outputs = []
    fed: dict[str, list[npt.NDArray[Any]]] = {name: [] for name in state}
    for start, stop in samples.streams:
        carried: dict[str, npt.NDArray[Any]] = {}
        for i in range(start, stop):
            feed = samples.feed(i)
            for inp, value in carried.items():
                want = feed[inp]
                if value.shape != want.shape or value.dtype != want.dtype:
                    raise ValueError(
                        f"state output {state[inp]!r} ({value.dtype} {list(value.shape)}) "
                        f"cannot feed input {inp!r} ({want.dtype} {list(want.shape)}) "
                        f"at step {i}"
                    )
                feed[inp] = value
            for inp in state:
                fed[inp].append(np.asarray(feed[inp]))
            outs = session.run(run_names, feed)
            carried = {inp: np.asarray(outs[index[out]]) for inp, out in state.items()}
            results.append(list(outs[: len(names)]))
    return results, fed


def parse_metric(metric: str) -> tuple[str, float | None]:
    """Split a metric spec into its kind and parameter: ``threshold:0.3`` -> (``threshold``, 0.3).

    ``threshold`` alone means :data:`DEFAULT_THRESHOLD`; ``topk:K`` needs a
    whole ``K >= 1`` and ``mae:X`` a bound ``X >= 0``; the other metrics take
    no parameter.

    Raises:
        ValueError: an unknown metric, a missing parameter, or a parameter
            that is not a finite number of the right kind.
    """
    kind, sep, arg = metric.strip().partition(":")
    if kind not in METRICS:
        raise ValueError(f"{metric!r} is not a metric: must be one of {METRIC_SYNTAX}")
    if kind in ("top1", "cosine", "exact", "ignore"):
        if sep:
            raise ValueError(f"metric {metric!r}: {kind} takes no parameter")
        return kind, None
    if not sep and kind == "threshold":
        return kind, DEFAULT_THRESHOLD
    if not sep or not arg.strip():
        what = {"topk": "topk:K (e.g. topk:5)", "mae": "mae:X (e.g. mae:0.01)"}[kind]
        raise ValueError(f"metric {metric!r} needs a parameter: {what}")
    try:
        value = float(arg)
    except ValueError:
        noun = {"threshold": "the threshold", "topk": "K", "mae": "the MAE bound"}[kind]
        raise ValueError(f"metric {metric!r}: {noun} must be a number") from None
    if not np.isfinite(value):
        raise ValueError(f"metric {metric!r}: the parameter must be finite")
    if kind == "topk" and (value < 1 or value != int(value)):
        raise ValueError(f"metric {metric!r}: K must be a whole number >= 1")
    if kind == "mae" and value < 0:
        raise ValueError(f"metric {metric!r}: the MAE bound must be >= 0")
    return kind, value


def check_metrics(
    outputs: Sequence[TensorSpec], metrics: Mapping[str, str] | None
) -> dict[str, str]:
    """Validate user metric overrides against the model's outputs.

    Returns:
        The overrides, specs stripped of spaces.

    Raises:
        ValueError: an unknown output name (the message lists the outputs), a
            bad metric spec, ``top1``/``topk`` on a scalar output, or ``K``
            larger than an output's fixed last dimension.
    """
    specs = {o.name: o for o in outputs}
    checked: dict[str, str] = {}
    for name, metric in (metrics or {}).items():
        if name not in specs:
            raise ValueError(
                f"metric for unknown output {name!r}; the model's outputs are "
                f"{', '.join(map(repr, specs))}"
            )
        try:
            kind, param = parse_metric(metric)
        except ValueError as exc:
            raise ValueError(f"metric for {name!r}: {exc}") from None
        shape = specs[name].shape
        if kind in ("top1", "topk") and not shape:
            raise ValueError(
                f"metric for {name!r}: {kind} needs classes along the last axis, "
                "but the output is a scalar"
            )
        last = shape[-1] if shape else None
        if kind == "topk" and param is not None and last is not None and int(param) > last:
            raise ValueError(
                f"metric for {name!r}: K={int(param)} is more than the output's {last} classes"
            )
        checked[name] = metric.strip()
    if specs and all(parse_metric(checked.get(n, "cosine"))[0] == "ignore" for n in specs):
        raise ValueError("every output is ignored: at least one output must be judged")
    return checked


def _is_probability(samples: Sequence[npt.NDArray[Any]]) -> bool:
    """One float value in [0, 1] per row, on every sample: a sigmoid-style probability."""
    first = samples[0]
    if first.dtype.kind != "f" or first.ndim == 0 or first.shape[-1] != 1:
        return False
    return all(a.size and float(np.min(a)) >= 0.0 and float(np.max(a)) <= 1.0 for a in samples)


def choose_metric(
    reference: npt.NDArray[Any], samples: Sequence[npt.NDArray[Any]] | None = None
) -> str:
    """The metric for an output, from the source's output on the first sample.

    ``samples`` (the source's output on every validation sample) lets a
    probability output be recognised by its values: one number per row,
    always in ``[0, 1]``, is judged by decision agreement at 0.5.
    """
    return _choose(reference, samples)[0]


def _choose(
    reference: npt.NDArray[Any], samples: Sequence[npt.NDArray[Any]] | None
) -> tuple[str, str]:
    if reference.dtype.kind in "biu":
        return "exact", f"default: {reference.dtype} output"
    if reference.ndim == 2 and reference.shape[-1] > 1:
        return "top1", f"default: 2-D output with {reference.shape[-1]} classes"
    if samples is not None and _is_probability(samples):
        return (
            f"threshold:{DEFAULT_THRESHOLD:g}",
            "default: one value in [0, 1] per row (a probability)",
        )
    return "cosine", f"default: {reference.dtype} output of shape {list(reference.shape)}"


def _decisions(
    ref: list[npt.NDArray[Any]], cand: list[npt.NDArray[Any]], threshold: float
) -> tuple[float, float, list[bool]]:
    """Fraction of values on the same side of ``threshold`` as the source's (NaN never agrees).

    Also returns, per sample, whether all its decisions agree.
    """
    agree = 0
    total = 0
    per_sample: list[bool] = []
    for r, c in zip(ref, cand, strict=True):
        a = np.asarray(r, dtype=np.float64).ravel()
        b = np.asarray(c, dtype=np.float64).ravel()
        total += a.size
        if a.shape != b.shape:
            per_sample.append(False)
            continue
        same = int(np.sum(((a >= threshold) == (b >= threshold)) & np.isfinite(b)))
        agree += same
        per_sample.append(same == a.size)
    score = agree / total if total else 0.0
    return score, score, per_sample


def _rows(r: npt.NDArray[Any], c: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], ...]:
    r2 = np.asarray(r).reshape(-1, r.shape[-1])
    return r2, np.asarray(c).reshape(-1, r.shape[-1])


def _top1(ref: list[npt.NDArray[Any]], cand: list[npt.NDArray[Any]]) -> tuple[float, float]:
    agree = 0
    rows = 0
    for r, c in zip(ref, cand, strict=True):
        r2, c2 = _rows(r, c)
        # NaN rows never agree: argmax of NaN is 0, which could match by luck.
        finite = np.all(np.isfinite(c2), axis=1)
        agree += int(np.sum((np.argmax(r2, axis=1) == np.argmax(c2, axis=1)) & finite))
        rows += r2.shape[0]
    score = agree / rows if rows else 0.0
    return score, score


def _topk_indices(a: npt.NDArray[Any], k: int) -> npt.NDArray[Any]:
    return np.argsort(-a, axis=1, kind="stable")[:, :k]


def _topk(ref: list[npt.NDArray[Any]], cand: list[npt.NDArray[Any]], k: int) -> tuple[float, float]:
    per_row: list[float] = []
    for r, c in zip(ref, cand, strict=True):
        if r.shape[-1] < k:
            raise ValueError(f"topk:{k} needs at least {k} classes, the output has {r.shape[-1]}")
        r2, c2 = _rows(r, c)
        finite = np.all(np.isfinite(c2), axis=1)
        rk = _topk_indices(r2.astype(np.float64), k)
        ck = _topk_indices(c2.astype(np.float64), k)
        for row in range(r2.shape[0]):
            shared = len(set(rk[row].tolist()) & set(ck[row].tolist())) if finite[row] else 0
            per_row.append(shared / k)
    if not per_row:
        return 0.0, 0.0
    return float(np.mean(per_row)), float(np.min(per_row))


def _mae(
    ref: list[npt.NDArray[Any]], cand: list[npt.NDArray[Any]], bound: float
) -> tuple[float, float, float]:
    """Share of samples with mean |error| <= bound, worst per-sample verdict, overall MAE."""
    within = 0
    abs_sum = 0.0
    count = 0
    for r, c in zip(ref, cand, strict=True):
        a = np.asarray(r, dtype=np.float64).ravel()
        b = np.asarray(c, dtype=np.float64).ravel()
        if a.shape != b.shape or not np.all(np.isfinite(b)):
            abs_sum = float("inf")
            count += max(a.size, 1)
            continue
        err = np.abs(a - b)
        abs_sum += float(np.sum(err))
        count += a.size
        if (float(np.mean(err)) if a.size else 0.0) <= bound:
            within += 1
    score = within / len(ref) if ref else 0.0
    return score, float(within == len(ref)), abs_sum / count if count else 0.0


def _cosine(
    ref: list[npt.NDArray[Any]], cand: list[npt.NDArray[Any]]
) -> tuple[float, float, float]:
    scores = []
    diff_sq = 0.0
    ref_sq = 0.0
    for r, c in zip(ref, cand, strict=True):
        a = np.asarray(r, dtype=np.float64).ravel()
        b = np.asarray(c, dtype=np.float64).ravel()
        if a.shape != b.shape or not np.all(np.isfinite(b)):
            scores.append(0.0)
            diff_sq = float("inf")
            continue
        na = float(np.linalg.norm(a))
        nb = float(np.linalg.norm(b))
        if na < _EPS and nb < _EPS:
            scores.append(1.0)
        elif na < _EPS or nb < _EPS:
            scores.append(0.0)
        else:
            scores.append(float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0)))
        diff_sq += float(np.sum((a - b) ** 2))
        ref_sq += na * na
    rel = (
        float(np.sqrt(diff_sq / ref_sq)) if ref_sq > 0 else (0.0 if diff_sq == 0 else float("inf"))
    )
    return float(np.mean(scores)), float(np.min(scores)), rel


def _exact(ref: list[npt.NDArray[Any]], cand: list[npt.NDArray[Any]]) -> tuple[float, float]:
    same = sum(
        1 for r, c in zip(ref, cand, strict=True) if r.shape == c.shape and np.array_equal(r, c)
    )
    score = same / len(ref) if ref else 0.0
    return score, score


def _label_rows(name: str, out: npt.NDArray[Any], label: npt.NDArray[Any], i: int) -> Any:
    rows = int(np.prod(out.shape[:-1])) if out.ndim > 1 else 1
    flat = np.asarray(label).ravel()
    if flat.size != rows or flat.dtype.kind not in "biu":
        raise ValueError(
            f"label:{name} sample {i} must be {rows} integer class index(es) "
            f"(the output has shape {list(out.shape)}), got {flat.dtype} {list(np.shape(label))}"
        )
    return flat


def _label_accuracy(
    name: str,
    kind: str,
    param: float | None,
    outs: list[npt.NDArray[Any]],
    labels: npt.NDArray[Any] | None,
) -> float | None:
    """Accuracy of ``outs`` against the true answers; ``None`` without labels or for
    metrics that have no notion of a correct answer (cosine, mae)."""
    if labels is None or kind in ("cosine", "mae", "ignore"):
        return None
    correct = 0
    total = 0
    for i, out in enumerate(outs):
        o = np.asarray(out)
        label = np.asarray(labels[i])
        if kind in ("top1", "topk"):
            truth = _label_rows(name, o, label, i)
            k = 1 if kind == "top1" else int(param or 1)
            rows = o.reshape(-1, o.shape[-1]).astype(np.float64)
            finite = np.all(np.isfinite(rows), axis=1)
            top = _topk_indices(rows, k)
            correct += int(np.sum(np.any(top == truth[:, None], axis=1) & finite))
            total += rows.shape[0]
            continue
        flat = o.ravel()
        truth = label.ravel()
        if truth.size != flat.size:
            raise ValueError(
                f"label:{name} sample {i} has {truth.size} value(s), the output has "
                f"{flat.size} (shape {list(o.shape)})"
            )
        if kind == "threshold":
            values = flat.astype(np.float64)
            cut = DEFAULT_THRESHOLD if param is None else param
            predicted = (values >= cut) & np.isfinite(values)
            correct += int(np.sum(predicted == (truth != 0)))
        else:
            correct += int(np.sum(flat == truth))
        total += flat.size
    return correct / total if total else None


def check_labels(
    reference: Outputs,
    output_names: Sequence[str],
    samples: SampleSet,
    metrics: Mapping[str, str] | None = None,
) -> None:
    """Check the validation labels against the source's outputs, once, before any candidate.

    Raises:
        ValueError: a label array whose shape or dtype does not fit its output.
    """
    overrides = metrics or {}
    for k, name in enumerate(output_names):
        if name not in samples.labels:
            continue
        ref = [sample[k] for sample in reference]
        metric = overrides.get(name) or choose_metric(ref[0], ref)
        if name not in overrides and name in samples.state.values():
            metric = "cosine"
        kind, param = parse_metric(metric)
        _label_accuracy(name, kind, param, ref, samples.labels[name])


def compare_outputs(
    reference: Outputs,
    candidate: Outputs,
    output_names: Sequence[str],
    *,
    tolerance: float,
    metrics: Mapping[str, str] | None = None,
    samples: SampleSet | None = None,
    max_accuracy_drop: float | None = None,
) -> Accuracy:
    """Score a candidate's outputs against the source's (see the module docstring).

    Args:
        reference: the source's outputs, per sample.
        candidate: the candidate's outputs on the same samples.
        output_names: names in the order of the per-sample lists.
        tolerance: the gate passes at ``score >= 1 - tolerance``.
        metrics: override the metric of named outputs (``top1``/``topk:K``/
            ``cosine``/``mae:X``/``exact``/``threshold:T``), e.g. ``cosine``
            for a 2-D embedding output that is not a classifier.
        samples: the validation samples: their labels and streams (if any)
            are scored too.
        max_accuracy_drop: fail an output whose label accuracy is more than
            this below the source's.
    """
    overrides = metrics or {}
    labels = {} if samples is None else samples.labels
    streams = () if samples is None or not samples.state else samples.streams
    state_outputs = set() if samples is None else set(samples.state.values())
    scores: list[OutputScore] = []
    for k, name in enumerate(output_names):
        ref = [sample[k] for sample in reference]
        cand = [sample[k] for sample in candidate]
        if name in overrides:
            metric, chosen_by = overrides[name], "user"
        elif name in state_outputs and ref[0].dtype.kind == "f":
            # A recurrent state is no classifier, whatever its shape.
            metric, chosen_by = "cosine", "default: recurrent state (fed back by --state)"
        else:
            metric, chosen_by = _choose(ref[0], ref)
        kind, param = parse_metric(metric)
        rel: float | None = None
        mae: float | None = None
        stream_score: float | None = None
        floating = ref[0].dtype.kind == "f"
        if kind == "threshold" and param is not None:
            score, worst, per_sample = _decisions(ref, cand, param)
            if streams:
                whole = [all(per_sample[a:b]) for a, b in streams]
                stream_score = sum(whole) / len(whole)
        elif kind == "top1":
            score, worst = _top1(ref, cand)
        elif kind == "topk":
            score, worst = _topk(ref, cand, int(param or 1))
        elif kind == "exact":
            score, worst = _exact(ref, cand)
        elif kind == "mae":
            score, worst, mae = _mae(ref, cand, float(param or 0.0))
        else:
            score, worst, rel = _cosine(ref, cand)
        if floating and kind != "exact":
            if rel is None:
                rel = _cosine(ref, cand)[2]
            if mae is None:
                mae = _mae(ref, cand, 0.0)[2]
        truth = labels.get(name)
        scores.append(
            OutputScore(
                name,
                metric,
                score,
                worst,
                rel,
                chosen_by=chosen_by,
                mae=mae,
                streams=len(streams),
                stream_score=stream_score,
                label_accuracy=_label_accuracy(name, kind, param, cand, truth),
                reference_label_accuracy=_label_accuracy(name, kind, param, ref, truth),
            )
        )
    return Accuracy(
        tuple(scores),
        threshold=1.0 - tolerance,
        samples=len(reference),
        max_accuracy_drop=max_accuracy_drop,
    )


@dataclass(frozen=True)
class LatencyStats:
    """Per-inference latency of one model over the interleaved rounds, milliseconds."""

    p50_ms: float
    p95_ms: float
    runs: int

    def to_dict(self) -> dict[str, Any]:
        return {"p50_ms": self.p50_ms, "p95_ms": self.p95_ms, "runs": self.runs}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LatencyStats:
        return cls(float(d["p50_ms"]), float(d["p95_ms"]), int(d["runs"]))


def measure_latency(
    sessions: Mapping[str, Any],
    feed: Feed,
    *,
    iterations: int = 50,
    warmup: int = 5,
) -> tuple[dict[str, LatencyStats], dict[str, str]]:
    """Time every session on ``feed``, interleaved round-robin.

    Args:
        sessions: name to onnxruntime session (include the fp32 baseline).
        feed: one input feed (a batch of one).
        iterations: timed rounds; each round runs every session once.
        warmup: untimed runs per session first (allocations, lazy init).

    Returns:
        Stats per session name, and an error message per session that failed
        to run (those are dropped from the rounds).
    """
    errors: dict[str, str] = {}
    live: list[str] = []
    for name, sess in sessions.items():
        try:
            for _ in range(max(warmup, 1)):
                sess.run(None, feed)
            live.append(name)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises RuntimeError subclasses
            errors[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
    times: dict[str, list[int]] = {name: [] for name in live}
    n = len(live)
    for r in range(max(iterations, 1)):
        order = live[r % n :] + live[: r % n] if n else []
        for name in order:
            sess = sessions[name]
            t0 = time.perf_counter_ns()
            sess.run(None, feed)
            times[name].append(time.perf_counter_ns() - t0)
    stats: dict[str, LatencyStats] = {}
    for name, t in times.items():
        p50_ns, p95_ns = percentiles(t, 50, 95)  # nearest rank, as the agent reports
        stats[name] = LatencyStats(p50_ms=p50_ns / 1e6, p95_ms=p95_ns / 1e6, runs=len(t))
    return stats, errors
