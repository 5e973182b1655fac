"""The selection rule on synthetic candidates, and the report's serialisation and table."""

from __future__ import annotations

import dataclasses
import json

from edgefleet.controller.compiler import (
    BUILTIN_PROFILES,
    Accuracy,
    Attempt,
    CandidateReport,
    CompileReport,
    LatencyStats,
    OutputScore,
    select,
)
from edgefleet.controller.compiler.errors import ReportFormatError
from edgefleet.controller.compiler.sensitivity import NodeSensitivity

VNNI = BUILTIN_PROFILES["x86-vnni"]


def cand(
    name: str,
    *,
    p50: float,
    size: int,
    score: float | None = 1.0,
    precision: str = "int8",
    base_p50: float = 1.0,
) -> CandidateReport:
    acc = (
        None
        if score is None
        else Accuracy((OutputScore("y", "top1", score, score),), threshold=0.99, samples=100)
    )
    return CandidateReport(
        name=name,
        recipe=name,
        precision=precision,
        status="measured",
        size_bytes=size,
        size_ratio=size / 1000,
        accuracy=acc,
        latency=LatencyStats(p50, p50 * 1.2, 10),
        latency_ratio=p50 / base_p50,
        latency_ratio_p95=p50 / base_p50,
    )


def by_name(cs: list[CandidateReport]) -> dict[str, CandidateReport]:
    return {c.name: c for c in cs}


def test_a_candidate_failing_the_gate_is_never_chosen_even_if_fastest_and_smallest() -> None:
    cs = select(
        [
            cand("fp32", p50=1.0, size=1000, precision="fp32"),
            cand("int8-bad", p50=0.2, size=250, score=0.90),
            cand("int8-ok", p50=0.5, size=260),
        ],
        VNNI,
        tolerance=0.01,
    )
    got = by_name(cs)
    assert got["int8-bad"].status == "rejected"
    assert "accuracy gate" in got["int8-bad"].reason
    assert got["int8-bad"].rank is None
    assert got["int8-ok"].status == "chosen"
    assert got["int8-ok"].rank == 1
    assert got["fp32"].status == "eligible"
    assert got["fp32"].rank == 2


def test_latency_objective_never_picks_a_candidate_slower_than_fp32() -> None:
    cs = select(
        [
            cand("fp32", p50=1.0, size=1000, precision="fp32"),
            cand("fp16", p50=1.3, size=500, precision="fp16"),
            cand("int8", p50=1.05, size=250),
        ],
        VNNI,
        tolerance=0.01,
    )
    got = by_name(cs)
    assert got["fp32"].status == "chosen"
    for name in ("fp16", "int8"):
        assert got[name].status == "rejected"
        assert "slower than fp32" in got[name].reason


def test_size_objective_prefers_small_even_if_slower() -> None:
    small = dataclasses.replace(VNNI, name="tiny-flash", objective="size")
    cs = select(
        [
            cand("fp32", p50=1.0, size=1000, precision="fp32"),
            cand("fp16", p50=1.3, size=500, precision="fp16"),
            cand("int8", p50=0.9, size=250, score=0.5),
        ],
        small,
        tolerance=0.01,
    )
    got = by_name(cs)
    assert got["fp16"].status == "chosen"
    assert got["int8"].status == "rejected"


def test_near_ties_in_latency_go_to_the_smaller_candidate() -> None:
    cs = select(
        [
            cand("fp32", p50=1.0, size=1000, precision="fp32"),
            cand("int8-pc", p50=0.40, size=280),
            cand("int8-pt", p50=0.41, size=250),
            cand("int8-far", p50=0.60, size=200),
        ],
        VNNI,
        tolerance=0.01,
    )
    ranks = {c.name: c.rank for c in cs}
    assert ranks == {"int8-pt": 1, "int8-pc": 2, "int8-far": 3, "fp32": 4}


def test_bundle_budget_and_unmeasured_latency_reject() -> None:
    tight = dataclasses.replace(VNNI, name="tight", max_bundle_bytes=300)
    unmeasured = dataclasses.replace(cand("int8-x", p50=0.1, size=100), latency=None)
    cs = by_name(
        select(
            [cand("fp32", p50=1.0, size=1000, precision="fp32"), unmeasured], tight, tolerance=0.01
        )
    )
    assert "max_bundle_bytes" in cs["fp32"].reason
    assert "could not be measured" in cs["int8-x"].reason


def test_unverified_candidates_are_flagged() -> None:
    cs = by_name(
        select(
            [
                cand("fp32", p50=1.0, size=1000, score=None),
                cand("int8", p50=0.5, size=250, score=None),
            ],
            VNNI,
            tolerance=0.01,
        )
    )
    assert cs["int8"].status == "chosen"
    assert "UNVERIFIED" in cs["int8"].reason
    assert not cs["int8"].verified


def test_failed_and_skipped_pass_through() -> None:
    failed = CandidateReport("fp16", "fp16", "fp16", "failed", reason="build failed: boom")
    out = select([failed, cand("fp32", p50=1.0, size=1000)], VNNI, tolerance=0.01)
    assert out[0] == failed
    assert out[1].status == "chosen"


def _report() -> CompileReport:
    judged = select(
        [
            cand("fp32", p50=1.0, size=1000, precision="fp32"),
            dataclasses.replace(
                cand("int8-static-pc-minmax+exclude", p50=0.5, size=300),
                excluded_nodes=("fc2",),
                attempts=(
                    Attempt(
                        ("fc2",),
                        0.995,
                        True,
                        sensitive=(NodeSensitivity("fc2", "MatMul", 0.5, 0.01, 0.49),),
                    ),
                ),
                notes=("no int8 kernel, stays float: Tanh",),
            ),
            CandidateReport("int8-dynamic", "int8-dynamic", "int8", "skipped", reason="cnn"),
        ],
        VNNI,
        tolerance=0.01,
    )
    return CompileReport(
        source={"sha256": "ab" * 32, "size_bytes": 1000, "kind": "mlp"},
        profile=VNNI,
        tolerance=0.01,
        verified=True,
        validation_samples=100,
        calibration_samples=16,
        baseline_latency=LatencyStats(1.0, 1.2, 10),
        latency_config={"iterations": 10, "warmup": 2, "intra_op_threads": 1, "input": "v0"},
        host={"cpu": "Test CPU", "arch": "x86_64", "features": ["vnni"], "matches_profile": True},
        candidates=tuple(judged),
        chosen=tuple(c.name for c in sorted(judged, key=lambda c: c.rank or 99) if c.rank),
        notes=("model kind: mlp",),
        created_at=123.0,
    )


def test_report_round_trips_through_json() -> None:
    rep = _report()
    again = CompileReport.from_json(rep.to_json())
    assert again == rep
    assert again.to_dict() == json.loads(rep.to_json())
    assert again.best is not None
    assert again.best.name == "int8-static-pc-minmax+exclude"
    assert again.best.attempts[0].sensitive[0].node == "fc2"


def test_report_from_dict_refuses_garbage() -> None:
    import pytest

    with pytest.raises(ReportFormatError, match="format"):
        CompileReport.from_dict({"format": 99})
    with pytest.raises(ReportFormatError, match="not a compile report"):
        CompileReport.from_dict({"format": 1})


def test_table_has_a_row_per_candidate_and_the_reasons() -> None:
    text = _report().format_table()
    lines = text.splitlines()
    assert lines[0].startswith("profile x86-vnni")
    header = next(i for i, line in enumerate(lines) if line.startswith("candidate"))
    rows = lines[header + 1 : header + 4]
    assert rows[0].startswith("fp32")
    assert rows[0].rstrip().endswith("eligible")
    assert "CHOSEN" in rows[1]
    assert "top1 100.00%" in rows[1]
    assert rows[2].rstrip().endswith("skipped")
    assert "kept in float: fc2" in text
    assert "attempt excluding 1 node(s): score 0.99500, passed" in text
    assert "note: no int8 kernel, stays float: Tanh" in text
