"""``edgefleet model compile --objective``: one compile's objective, whatever the profile says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from edgefleet.controller.cli import cli
from edgefleet.controller.compiler.cli import compile_command

from . import models as tm


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    model = tmp_path / "mlp.onnx"
    model.write_bytes(tm.mlp(width=128))
    val = tmp_path / "val.npz"
    np.savez(val, **tm.mlp_data(40, seed=6))
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(
        '[profiles.lab]\narch = "x86_64"\nprecisions = ["fp32", "fp16", "int8"]\n'
        'objective = "size"\n'
    )
    return {"model": model, "val": val, "profiles": profiles}


def _compile(files: dict[str, Path], *extra: str) -> dict[str, Any]:
    args = [str(files["model"]), "--validation", str(files["val"]), "--latency-runs", "3"]
    result = CliRunner().invoke(compile_command, [*args, "--tolerance", "0.2", "--json", *extra])
    assert result.exit_code == 0, result.output
    body: dict[str, Any] = json.loads(result.stdout)
    return body


def _chosen(body: dict[str, Any]) -> dict[str, Any]:
    chosen = [c for c in body["candidates"] if c["status"] == "chosen"]
    assert len(chosen) == 1
    return chosen[0]


def test_objective_size_overrides_a_latency_profile(files: dict[str, Path]) -> None:
    default = _compile(files, "--profile", "x86-avx2")
    assert default["profile"]["objective"] == "latency"
    assert _chosen(default)["reason"].startswith("best by latency")

    size = _compile(files, "--profile", "x86-avx2", "--objective", "size")
    assert size["profile"]["objective"] == "size"
    assert size["profile"]["name"] == "x86-avx2"
    assert any(n.startswith("objective size (profile x86-avx2)") for n in size["notes"])
    chosen = _chosen(size)
    assert chosen["reason"].startswith("best by size")
    # The smallest of the variants that passed and stayed within the latency cap.
    ranked = [c for c in size["candidates"] if c["rank"] is not None]
    assert chosen["size_bytes"] == min(c["size_bytes"] for c in ranked)


def test_objective_latency_overrides_a_size_profile(files: dict[str, Path]) -> None:
    custom = ("--profiles", str(files["profiles"]), "--profile", "lab")
    assert _compile(files, *custom)["profile"]["objective"] == "size"
    latency = _compile(files, *custom, "--objective", "latency")
    assert latency["profile"]["objective"] == "latency"
    assert _chosen(latency)["reason"].startswith("best by latency")


def test_unknown_objective_is_a_usage_error(files: dict[str, Path]) -> None:
    result = CliRunner().invoke(
        compile_command, [str(files["model"]), "--profile", "x86-avx2", "--objective", "fast"]
    )
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "Invalid value for '--objective': 'fast' is not one of 'latency', 'size'" in (
        result.stderr
    )


def test_objective_through_the_edgefleet_command(files: dict[str, Path], tmp_path: Path) -> None:
    # `edgefleet model compile` needs no home: it only reads files.
    result = CliRunner().invoke(
        cli,
        [
            "--home", str(tmp_path / "nohome"), "model", "compile", str(files["model"]),
            "--profile", "x86-avx2", "--validation", str(files["val"]), "--tolerance", "0.2",
            "--latency-runs", "3", "--objective", "size", "--json",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["profile"]["objective"] == "size"
    helped = CliRunner().invoke(cli, ["model", "compile", "--help"]).output
    assert "--objective [latency|size]" in helped
