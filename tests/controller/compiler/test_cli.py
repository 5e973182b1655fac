"""``edgefleet model compile`` through click's CliRunner: table, JSON, files, one-line errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgefleet.controller.compiler import CompileReport
from edgefleet.controller.compiler.cli import compile_command

from . import models as tm


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    model = tmp_path / "mlp.onnx"
    model.write_bytes(tm.mlp())
    cal = tmp_path / "cal.npz"
    np.savez(cal, **tm.mlp_data(8))
    val = tmp_path / "val.npz"
    np.savez(val, **tm.mlp_data(20, seed=6))
    return {"model": model, "cal": cal, "val": val, "dir": tmp_path}


def _args(files: dict[str, Path], *extra: str) -> list[str]:
    return [
        str(files["model"]),
        "--profile",
        "x86-vnni",
        "--calibration",
        str(files["cal"]),
        "--validation",
        str(files["val"]),
        "--latency-runs",
        "3",
        *extra,
    ]


def test_table_by_default(files: dict[str, Path]) -> None:
    result = CliRunner().invoke(compile_command, _args(files))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("profile x86-vnni")
    assert "candidate" in out
    assert "CHOSEN" in out
    assert "int8-static-pc-minmax" in out
    assert "int8-dynamic" in out
    assert "Traceback" not in out


def test_json_output_and_output_dir(files: dict[str, Path]) -> None:
    out_dir = files["dir"] / "variants"
    result = CliRunner().invoke(
        compile_command, _args(files, "--json", "--output-dir", str(out_dir))
    )
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)  # nothing but JSON on stdout
    report = CompileReport.from_dict(body)
    assert report.chosen
    assert report.profile.name == "x86-vnni"
    written = body["written"]
    assert written
    assert written[0]["rank"] == 1
    assert len(written) == 1
    best = report.best
    assert best is not None
    assert hashlib.sha256(Path(written[0]["path"]).read_bytes()).hexdigest() == best.sha256
    assert CompileReport.from_json((out_dir / "report.json").read_text()) == report


def test_all_eligible_writes_every_ranked_variant(files: dict[str, Path]) -> None:
    out_dir = files["dir"] / "all"
    args = _args(files, "--json", "--output-dir", str(out_dir), "--all-eligible")
    result = CliRunner().invoke(compile_command, args)
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert [w["name"] for w in body["written"]] == body["chosen"]
    assert len(list(out_dir.glob("*.onnx"))) == len(body["chosen"])


def test_recipe_selection_and_custom_profiles(files: dict[str, Path]) -> None:
    prof = files["dir"] / "profiles.toml"
    prof.write_text('[profiles.lab]\narch = "x86_64"\nprecisions = ["fp32"]\nobjective = "size"\n')
    args = [str(files["model"]), "--profiles", str(prof), "--profile", "lab"]
    result = CliRunner().invoke(compile_command, [*args, "--recipe", "fp32", "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert [c["name"] for c in body["candidates"]] == ["fp32"]
    assert body["verified"] is False


def _error(result: object) -> str:
    from click.testing import Result

    assert isinstance(result, Result)
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_corrupt_model_is_a_one_line_error(files: dict[str, Path]) -> None:
    files["model"].write_bytes(b"not a model at all")
    line = _error(CliRunner().invoke(compile_command, _args(files)))
    assert line.startswith("Error: ")
    assert "not an ONNX model" in line


def test_missing_model_file(files: dict[str, Path]) -> None:
    args = [str(files["dir"] / "missing.onnx"), "--profile", "x86-vnni"]
    line = _error(CliRunner().invoke(compile_command, args))
    assert "cannot read" in line


def test_data_mismatch_is_a_one_line_error(files: dict[str, Path]) -> None:
    np.savez(files["val"], wrong=np.zeros((3, 32), np.float32))
    line = _error(CliRunner().invoke(compile_command, _args(files)))
    assert "missing array(s) for input(s) 'x'" in line


def test_unknown_profile_and_bad_profile_file(files: dict[str, Path]) -> None:
    line = _error(CliRunner().invoke(compile_command, [str(files["model"]), "--profile", "pdp11"]))
    assert "unknown profile 'pdp11'" in line
    bad = files["dir"] / "bad.toml"
    bad.write_text("[profiles.x\n")
    args = [str(files["model"]), "--profile", "x", "--profiles", str(bad)]
    assert "not valid TOML" in _error(CliRunner().invoke(compile_command, args))


def test_bad_tolerance_and_unknown_recipe(files: dict[str, Path]) -> None:
    assert "tolerance must be" in _error(
        CliRunner().invoke(compile_command, _args(files, "--tolerance", "2"))
    )
    assert "unknown recipe" in _error(
        CliRunner().invoke(compile_command, _args(files, "--recipe", "int2"))
    )


def test_unmeetable_tolerance_prints_report_then_error(files: dict[str, Path]) -> None:
    model = files["dir"] / "wide.onnx"
    model.write_bytes(tm.wide_range_mlp())
    data = files["dir"] / "wide.npz"
    np.savez(data, x=np.random.default_rng(2).normal(size=(12, 16)).astype(np.float32))
    prof = files["dir"] / "p.toml"
    prof.write_text('[profiles.int8-only]\narch = "x86_64"\nprecisions = ["int8"]\n')
    args = [
        str(model), "--profiles", str(prof), "--profile", "int8-only",
        "--calibration", str(data), "--validation", str(data),
        "--tolerance", "0", "--latency-runs", "2", "--json",
        "--recipe", "int8-dynamic",
    ]  # fmt: skip
    result = CliRunner().invoke(compile_command, args)
    line = _error(result)
    assert "no candidate meets tolerance" in line
    assert "closest" in line
    body = json.loads(result.stdout)
    assert body["chosen"] == []
