"""Stateful models judged over whole streams (``--state IN=OUT``), as they run on a device.

The model (:mod:`.stream_models`) is a silero-vad-like recurrent step whose
error grows through the state. Scored one step at a time on recorded fp32
states, dynamic int8 looks fine; run over streams with its own state fed
back, it is not, and the compiler must say so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from edgefleet.controller.compiler import (
    BUILTIN_PROFILES,
    CandidateReport,
    CompileReport,
    CompileResult,
    DataError,
    compile_model,
)
from edgefleet.controller.compiler.cli import compile_command
from edgefleet.controller.compiler.data import load_samples
from edgefleet.controller.compiler.evaluate import record_stream_states, run_samples
from edgefleet.controller.compiler.pipeline import load_source
from edgefleet.controller.compiler.source import make_session

from . import stream_models as sm

AVX2 = BUILTIN_PROFILES["x86-avx2"]
FAST: dict[str, Any] = {"latency_iterations": 3, "latency_warmup": 1, "sensitivity_attempts": 0}
STATE = {"state": "stateN"}
F = np.float32


def _candidate(result: CompileResult, name: str) -> CandidateReport:
    return next(c for c in result.report.candidates if c.name == name)


def _by_name(c: CandidateReport) -> dict[str, Any]:
    assert c.accuracy is not None
    return {o.name: o for o in c.accuracy.outputs}


def test_error_built_up_through_the_state_is_caught_by_stream_scoring_only() -> None:
    model = sm.stateful_vad()
    streams = sm.stream_frames(10, 50)
    common: dict[str, Any] = {"recipes": ["fp32", "int8-dynamic"], "tolerance": 0.02, **FAST}

    # One step at a time on the states fp32 had: the candidate never feeds
    # itself, so its per-step error stays small and it passes.
    per_step = compile_model(
        model,
        AVX2,
        validation=sm.recorded_states(model, streams),
        metrics={"stateN": "cosine"},
        **common,
    )
    int8_step = _candidate(per_step, "int8-dynamic")
    assert int8_step.accuracy is not None and int8_step.accuracy.passed
    assert _by_name(int8_step)["prob"].score >= 0.98
    assert _by_name(int8_step)["prob"].streams == 0

    # Whole streams, each model fed its own state: the same candidate drifts.
    stream = compile_model(model, AVX2, validation=streams, state=STATE, **common)
    fp32 = _candidate(stream, "fp32")
    assert fp32.accuracy is not None and fp32.accuracy.score == 1.0
    int8 = _candidate(stream, "int8-dynamic")
    assert int8.accuracy is not None and not int8.accuracy.passed
    assert int8.status == "rejected"
    prob = _by_name(int8)["prob"]
    assert prob.metric == "threshold:0.5"
    assert prob.streams == 10
    assert prob.score < 0.9
    assert prob.stream_score is not None and prob.stream_score < 0.5
    state_score = _by_name(int8)["stateN"]
    assert state_score.metric == "cosine"
    assert state_score.chosen_by.startswith("default: recurrent state")
    assert int8.reason is not None
    assert "output 'prob' decision agreement at 0.5 over 10 stream(s) with fed-back state" in (
        int8.reason
    )
    assert "whole streams agreeing" in int8.reason
    table = stream.report.format_table()
    assert "streams 10 stream(s), 500 steps, each model fed its own state back" in table
    assert "stateN: cosine (default: recurrent state (fed back by --state))" in table


def _manual(model: bytes, data: dict[str, Any], starts: list[int]) -> list[np.ndarray]:
    """The stream loop written out by hand: reset to the data's state at each start."""
    session = make_session(model)
    probs = []
    h = data["state"][0]
    for i in range(len(data["x"])):
        if i in starts:
            h = data["state"][i]
        p, h = session.run(None, {"x": data["x"][i], "state": h, "sr": np.asarray(data["sr"][i])})
        probs.append(p)
    return probs


def test_streams_restart_at_each_stream_id_from_the_given_initial_state() -> None:
    model = sm.stateful_vad()
    data: dict[str, Any] = sm.stream_frames(3, 7)
    rng = np.random.default_rng(5)
    # Initial states differ per stream; values at later steps must be ignored.
    data["state"] = rng.uniform(-0.5, 0.5, (21, 1, 32)).astype(F)
    src = load_source(model)
    samples = load_samples(data, src, role="validation", state=STATE)
    assert samples.streams == ((0, 7), (7, 14), (14, 21))
    got = run_samples(make_session(model), samples, ["prob", "stateN"])
    want = _manual(model, data, [0, 7, 14])
    np.testing.assert_allclose([g[0] for g in got], want, rtol=1e-6)
    # Without stream ids it is one stream of 21 steps.
    one = {k: v for k, v in data.items() if k != "stream:id"}
    got_one = run_samples(
        make_session(model), load_samples(one, src, role="v", state=STATE), ["prob"]
    )
    np.testing.assert_allclose([g[0] for g in got_one], _manual(model, data, [0]), rtol=1e-6)
    assert not np.allclose([g[0] for g in got_one], want)


def test_a_left_out_state_input_starts_from_zeros() -> None:
    model = sm.stateful_vad()
    data = sm.stream_frames(2, 5)
    samples = load_samples(data, load_source(model), role="validation", state=STATE)
    assert samples.arrays["state"].shape == (10, 1, 32)
    got = run_samples(make_session(model), samples, ["prob"])
    zeros = {**data, "state": np.zeros((10, 1, 32), F)}
    np.testing.assert_allclose([g[0] for g in got], _manual(model, zeros, [0, 5]), rtol=1e-6)


def test_calibration_gets_the_states_the_stream_really_produces() -> None:
    model = sm.stateful_vad()
    data = sm.stream_frames(2, 6)
    session = make_session(model)
    cal = load_samples(data, load_source(model), role="calibration", state=STATE)
    recorded = record_stream_states(session, cal)
    want = sm.recorded_states(model, data)["state"]
    np.testing.assert_allclose(recorded.arrays["state"], want, rtol=1e-6)
    assert np.any(recorded.arrays["state"][1] != 0)


def test_truncation_keeps_whole_streams() -> None:
    model = sm.stateful_vad()
    result = compile_model(
        model,
        AVX2,
        validation=sm.stream_frames(5, 40),
        state=STATE,
        recipes=["fp32"],
        max_validation_samples=130,
        **FAST,
    )
    assert result.report.validation_samples == 120
    assert "validation: used the first 120 of 200 samples" in result.report.notes


@pytest.mark.parametrize(
    ("state", "data_change", "message"),
    [
        ({"hidden": "stateN"}, {}, "'hidden' is not a model input"),
        ({"state": "h_out"}, {}, "'h_out' is not a model output"),
        ({"state": "prob"}, {}, "output shape \\[1, 1\\] cannot feed input shape \\[1, 32\\]"),
        ({"sr": "stateN"}, {}, "input 'sr' is int64 but output 'stateN' is float32"),
        (None, {}, "'stream:id' marks streams, which only a state mapping"),
        (STATE, {"stream:id": np.zeros((50, 2), np.int64)}, "one integer stream id per sample"),
        (STATE, {"stream:id": np.zeros(49, np.int64)}, "different sample counts"),
    ],
)
def test_bad_state_mappings_and_stream_ids_are_refused(
    state: dict[str, str] | None, data_change: dict[str, Any], message: str
) -> None:
    data = {**sm.stream_frames(5, 10), **data_change}
    with pytest.raises(DataError, match=message):
        compile_model(
            sm.stateful_vad(), AVX2, validation=data, state=state, recipes=["fp32"], **FAST
        )


def test_cli_state_option(tmp_path: Path) -> None:
    model = tmp_path / "vad.onnx"
    model.write_bytes(sm.stateful_vad())
    val = tmp_path / "streams.npz"
    np.savez(val, **sm.stream_frames(4, 25))
    base = [str(model), "--profile", "x86-avx2", "--validation", str(val), "--latency-runs", "2"]
    runner = CliRunner()
    result = runner.invoke(
        compile_command,
        [
            *base,
            "--recipe",
            "fp32",
            "--recipe",
            "int8-dynamic",
            "--state",
            "state=stateN",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = CompileReport.from_json(result.stdout)
    acc = report.candidate("int8-dynamic").accuracy
    assert acc is not None and acc.outputs[0].streams == 4
    bad = runner.invoke(compile_command, [*base, "--state", "state"])
    assert bad.exit_code == 2
    assert "is not INPUT=OUTPUT" in bad.output
    unknown = runner.invoke(compile_command, [*base, "--state", "state=nope"])
    assert unknown.exit_code == 1
    assert "Error: state state=nope: 'nope' is not a model output" in unknown.output
    assert "Traceback" not in unknown.output
