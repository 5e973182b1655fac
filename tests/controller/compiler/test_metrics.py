"""Per-output metrics the user can choose (``--metric NAME=SPEC``) and accuracy against labels."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from edgefleet.controller.compiler import (
    BUILTIN_PROFILES,
    Built,
    CandidateReport,
    CompileError,
    CompileReport,
    CompileResult,
    DataError,
    Recipe,
    compile_model,
)
from edgefleet.controller.compiler.cli import compile_command
from edgefleet.controller.compiler.evaluate import compare_outputs, parse_metric
from edgefleet.controller.compiler.recipe_base import BuildInput
from edgefleet.controller.compiler.source import make_session

from . import models as tm

AVX2 = BUILTIN_PROFILES["x86-avx2"]
FAST: dict[str, Any] = {"latency_iterations": 3, "latency_warmup": 1, "sensitivity_attempts": 0}
F = np.float32


def _candidate(result: CompileResult, name: str) -> CandidateReport:
    return next(c for c in result.report.candidates if c.name == name)


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("topk:5", ("topk", 5.0)),
        ("topk: 3", ("topk", 3.0)),
        ("mae:0.02", ("mae", 0.02)),
        ("mae:0", ("mae", 0.0)),
    ],
)
def test_metric_specs_parse(spec: str, parsed: tuple[str, float | None]) -> None:
    assert parse_metric(spec) == parsed


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("f1", "must be one of top1, topk:K, cosine, mae:X, threshold:T, exact or ignore"),
        ("topk", "needs a parameter: topk:K"),
        ("topk:0", "K must be a whole number >= 1"),
        ("topk:2.5", "K must be a whole number >= 1"),
        ("topk:many", "K must be a number"),
        ("mae", "needs a parameter: mae:X"),
        ("mae:-1", "the MAE bound must be >= 0"),
        ("mae:nan", "must be finite"),
        ("top1:3", "top1 takes no parameter"),
        ("ignore:1", "ignore takes no parameter"),
    ],
)
def test_bad_metric_specs_are_refused(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_metric(spec)


def _rows(*rows: Sequence[float]) -> list[list[np.ndarray]]:
    return [[np.asarray([r], F)] for r in rows]


def test_topk_scores_the_overlap_of_the_top_k_lists() -> None:
    ref = _rows([4, 3, 2, 1], [4, 3, 2, 1])
    # Same arg-max, but the second place changes in one of two rows.
    cand = _rows([4, 3, 2, 1], [4, 2, 3, 1])
    top1 = compare_outputs(ref, cand, ["y"], tolerance=0.01, metrics={"y": "top1"})
    assert top1.score == 1.0
    top2 = compare_outputs(ref, cand, ["y"], tolerance=0.01, metrics={"y": "topk:2"})
    assert top2.score == pytest.approx(0.75)
    assert top2.outputs[0].worst == pytest.approx(0.5)
    assert not top2.passed
    top3 = compare_outputs(ref, cand, ["y"], tolerance=0.01, metrics={"y": "topk:3"})
    assert top3.score == 1.0
    assert top2.outputs[0].chosen_by == "user"


def test_mae_scores_the_share_of_samples_within_the_bound() -> None:
    ref = _rows([1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [1.0, 2.0])
    cand = _rows([1.0, 2.0], [1.01, 2.01], [1.2, 2.0], [1.0, float("nan")])
    acc = compare_outputs(ref, cand, ["y"], tolerance=0.01, metrics={"y": "mae:0.05"})
    out = acc.outputs[0]
    assert out.metric == "mae:0.05"
    assert out.score == pytest.approx(0.5)
    assert out.worst == 0.0
    assert out.score_text() == "mae<=0.05 50.00%"
    strict = compare_outputs(ref[:3], cand[:3], ["y"], tolerance=0.01, metrics={"y": "mae:0.001"})
    assert strict.score == pytest.approx(1 / 3)


def test_an_ignored_output_is_reported_but_not_gated() -> None:
    """A padded hidden state next to the pooled embedding: only the embedding is judged."""
    ref = [[np.asarray([[1.0, 0.0]], F), np.asarray([[1.0, 2.0, 3.0]], F)]]
    cand = [[np.asarray([[1.0, 0.001]], F), np.asarray([[3.0, -2.0, 1.0]], F)]]
    judged = compare_outputs(ref, cand, ["emb", "hidden"], tolerance=0.01)
    assert not judged.passed  # the hidden state is far off
    acc = compare_outputs(
        ref, cand, ["emb", "hidden"], tolerance=0.01, metrics={"hidden": "ignore"}
    )
    assert acc.passed
    emb, hidden = acc.outputs
    assert acc.score == emb.score
    assert hidden.score < 0.5 and not hidden.gated and hidden.chosen_by == "user"
    assert hidden.score_text().startswith("not gated (cos ")
    assert acc.summary == emb.score_text()
    with pytest.raises(CompileError, match="every output is ignored"):
        compile_model(tm.mlp(), AVX2, metrics={"logits": "ignore"}, **FAST)


def test_default_metrics_say_why_they_were_chosen() -> None:
    ref = [[np.zeros((1, 10), F), np.zeros((1, 3, 8), F), np.array([[0.7]], F)]]
    acc = compare_outputs(ref, ref, ["logits", "feat", "p"], tolerance=0.01)
    by = {o.name: o for o in acc.outputs}
    assert by["logits"].chosen_by == "default: 2-D output with 10 classes"
    assert by["feat"].metric == "cosine"
    assert by["feat"].chosen_by.startswith("default: float32 output of shape [1, 3, 8]")
    assert by["p"].chosen_by == "default: one value in [0, 1] per row (a probability)"


def test_metric_overrides_are_checked_against_the_outputs() -> None:
    with pytest.raises(
        CompileError, match="unknown output 'prob'; the model's outputs are 'logits'"
    ):
        compile_model(tm.mlp(), AVX2, metrics={"prob": "top1"}, **FAST)
    with pytest.raises(CompileError, match="K=11 is more than the output's 10 classes"):
        compile_model(tm.mlp(), AVX2, metrics={"logits": "topk:11"}, **FAST)
    with pytest.raises(CompileError, match="metric for 'logits': 'f1' is not a metric"):
        compile_model(tm.mlp(), AVX2, metrics={"logits": "f1"}, **FAST)


def test_cli_metric_option_and_the_report_says_which_metric(tmp_path: Path) -> None:
    model = tmp_path / "mlp.onnx"
    model.write_bytes(tm.mlp())
    val = tmp_path / "val.npz"
    np.savez(val, **tm.mlp_data(30, seed=4))
    base = [str(model), "--profile", "x86-avx2", "--validation", str(val), "--latency-runs", "2"]
    runner = CliRunner()
    result = runner.invoke(
        compile_command, [*base, "--recipe", "fp32", "--metric", "logits=topk:3", "--json"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)["candidates"][0]["accuracy"]["outputs"][0]
    assert out["metric"] == "topk:3"
    assert out["chosen_by"] == "user"
    table = runner.invoke(
        compile_command, [*base, "--recipe", "fp32", "--metric", "logits=mae:0.1"]
    )
    assert table.exit_code == 0, table.output
    assert "metrics logits: mae:0.1 (user)" in table.stdout
    assert "output 'logits': mae<=0.1 100.00%" in table.stdout
    for bad, code, message in [
        ("logits", 2, "is not OUTPUT=METRIC"),
        ("=top1", 2, "is not OUTPUT=METRIC"),
        ("prob=top1", 1, "unknown output 'prob'"),
        ("logits=topk", 1, "needs a parameter"),
    ]:
        res = runner.invoke(compile_command, [*base, "--metric", bad])
        assert res.exit_code == code, res.output
        assert message in res.output
        assert "Traceback" not in res.output
    twice = runner.invoke(
        compile_command, [*base, "--metric", "logits=top1", "--metric", "logits=cosine"]
    )
    assert twice.exit_code == 2
    assert "given twice" in twice.output


class _NudgedLogits(Recipe):
    """A variant that favours class 0 a little: a few answers change."""

    name = "nudged"
    precision = "int8"

    def build(self, inp: BuildInput, *, nodes_to_exclude: Sequence[str] = ()) -> Built:
        model = onnx.load_model_from_string(inp.source.data)
        for init in model.graph.initializer:
            if init.name == "b3":
                bias = np.zeros(10, F)
                bias[0] = 1.5
                init.CopyFrom(numpy_helper.from_array(bias, "b3"))
        return Built(model.SerializeToString())


def _labelled(n: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """mlp data with labels: fp32's answers, the first 20 % of them made wrong."""
    data = tm.mlp_data(n, seed=3)
    fp32 = make_session(tm.mlp()).run(None, data)[0].argmax(axis=1)
    labels = fp32.copy()
    wrong = n // 5
    labels[:wrong] = (labels[:wrong] + 1) % 10
    return data, fp32, labels


def test_labels_report_real_accuracy_for_fp32_and_every_candidate() -> None:
    data, _, labels = _labelled(200)
    nudged_answers = (
        make_session(_NudgedLogits().build(BuildInput(_src(), None)).model)
        .run(None, data)[0]
        .argmax(axis=1)
    )
    want = float(np.mean(nudged_answers == labels))
    result = compile_model(
        tm.mlp(),
        AVX2,
        validation={**data, "label:logits": labels},
        recipes=["fp32", _NudgedLogits()],
        tolerance=0.3,
        **FAST,
    )
    fp32 = _candidate(result, "fp32").accuracy
    assert fp32 is not None
    assert fp32.outputs[0].label_accuracy == pytest.approx(0.8)
    assert fp32.outputs[0].reference_label_accuracy == pytest.approx(0.8)
    nudged = _candidate(result, "nudged")
    assert nudged.accuracy is not None and nudged.accuracy.passed
    out = nudged.accuracy.outputs[0]
    assert out.label_accuracy == pytest.approx(want)
    assert out.label_accuracy < 0.78
    assert out.reference_label_accuracy == pytest.approx(0.8)
    assert f"accuracy {want * 100:.2f}% (fp32 80.00%)" in result.report.format_table()
    # Round trip through the stored report.
    again = CompileReport.from_json(result.report.to_json())
    acc = again.candidate("nudged").accuracy
    assert acc is not None and acc.outputs[0].label_accuracy == pytest.approx(want)


def test_max_accuracy_drop_gates_on_labels() -> None:
    data, _, labels = _labelled(200)
    result = compile_model(
        tm.mlp(),
        AVX2,
        validation={**data, "label:logits": labels},
        recipes=["fp32", _NudgedLogits()],
        tolerance=0.3,
        max_accuracy_drop=0.01,
        **FAST,
    )
    nudged = _candidate(result, "nudged")
    assert nudged.accuracy is not None and not nudged.accuracy.passed
    assert nudged.status == "rejected"
    assert nudged.reason is not None
    assert "output 'logits' accuracy against labels" in nudged.reason
    assert "below fp32's 80.00% (max drop 1 points)" in nudged.reason
    assert _candidate(result, "fp32").status == "chosen"
    with pytest.raises(CompileError, match="max_accuracy_drop needs 'label:<output>' arrays"):
        compile_model(
            tm.mlp(), AVX2, validation=data, recipes=["fp32"], max_accuracy_drop=0.01, **FAST
        )


def _src() -> Any:
    from edgefleet.controller.compiler.pipeline import load_source

    return load_source(tm.mlp())


def test_probability_labels_count_decisions() -> None:
    data = {"x": np.random.default_rng(2).normal(0, 1, (100, 16)).astype(F)}
    probs = make_session(tm.prob_output()).run(None, data)[0]
    labels = (probs[:, 0] >= 0.5).astype(np.int64)
    labels[:10] = 1 - labels[:10]
    result = compile_model(
        tm.prob_output(), AVX2, validation={**data, "label:p": labels}, recipes=["fp32"], **FAST
    )
    acc = _candidate(result, "fp32").accuracy
    assert acc is not None and acc.outputs[0].label_accuracy == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"label:probs": np.zeros(20, np.int64)}, "'probs' is not a model output"),
        ({"label:logits": np.zeros(19, np.int64)}, "different sample counts"),
        ({"label:logits": np.zeros((20, 3), np.int64)}, "must be 1 integer class index"),
        ({"label:logits": np.full(20, np.nan)}, "contains NaN"),
    ],
)
def test_bad_labels_are_refused_with_the_reason(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(DataError, match=message):
        compile_model(
            tm.mlp(),
            AVX2,
            validation={**tm.mlp_data(20), **extra},
            recipes=["fp32"],
            **FAST,
        )


def test_labels_are_read_from_an_npz(tmp_path: Path) -> None:
    data, _, labels = _labelled(50)
    val = tmp_path / "val.npz"
    np.savez(val, **data, **{"label:logits": labels})
    result = compile_model(tm.mlp(), AVX2, validation=val, recipes=["fp32"], **FAST)
    acc = _candidate(result, "fp32").accuracy
    assert acc is not None and acc.outputs[0].label_accuracy == pytest.approx(0.8)
