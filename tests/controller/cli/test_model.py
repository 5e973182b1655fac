"""``edgefleet model ...``: compiling registration, stored reports, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgefleet.controller.demo_model import build_demo_model, demo_inputs
from tests.controller.cli.runner import run


def test_register_with_profiles_compiles_and_stores_reports(home: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(build_demo_model())
    np.savez(tmp_path / "val.npz", **demo_inputs(150, seed=2))
    np.savez(tmp_path / "cal.npz", **demo_inputs(32, seed=3))
    result = run(
        home,
        "model",
        "register",
        str(model),
        "--name",
        "clf",
        "--version",
        "2.0",
        "--profile",
        "x86-avx2",
        "--validation",
        str(tmp_path / "val.npz"),
        "--calibration",
        str(tmp_path / "cal.npz"),
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    classes = {b["hardware_class"]: b for b in data["bundles"]}
    assert set(classes) == {"generic", "x86-avx2"}
    assert classes["generic"]["precision"] == "fp32"
    report = data["reports"]["x86-avx2"]
    chosen = [c for c in report["candidates"] if c.get("status") == "chosen"]
    assert len(chosen) == 1
    assert chosen[0]["precision"] == classes["x86-avx2"]["precision"]

    stored = json.loads(run(home, "model", "report", "clf", "2.0", "--json").output)
    assert stored["x86-avx2"] == report
    table = run(home, "model", "report", "clf", "2.0").output
    assert "x86-avx2" in table and "chosen" in table.lower()


def test_register_refuses_unknown_profile(home: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(build_demo_model())
    result = run(
        home,
        "model",
        "register",
        str(model),
        "--name",
        "clf",
        "--version",
        "3.0",
        "--profile",
        "no-such-profile",
    )
    assert result.exit_code == 1
    assert "no-such-profile" in result.output
    assert json.loads(run(home, "model", "list", "--json").output) == []


def test_register_refuses_a_sample_file_that_is_not_npz(home: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(build_demo_model())
    sample = tmp_path / "sample.npz"
    sample.write_bytes(b"not an archive")
    result = run(
        home, "model", "register", str(model), "--name", "clf", "--version", "4.0",
        "--sample", str(sample),
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.output.startswith("Error: sample file ")
    assert "not a .npz archive" in result.output
    assert json.loads(run(home, "model", "list", "--json").output) == []
