"""ONNX models whose weights live in external data files beside the ``.onnx`` (large exports)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from edgefleet.controller.compiler import BUILTIN_PROFILES, SourceModelError, compile_model
from edgefleet.controller.compiler.pipeline import load_source
from edgefleet.controller.compiler.source import make_session

from . import models as tm

# The size objective keeps every passing variant eligible however the timing
# rounds go on a loaded machine: this test is about the weights, not speed.
AVX2 = dataclasses.replace(BUILTIN_PROFILES["x86-avx2"], objective="size")
FAST: dict[str, Any] = {"latency_iterations": 3, "latency_warmup": 1, "sensitivity_attempts": 0}


def _save_external(tmp_path: Path, data: bytes, location: str = "mlp.weights") -> Path:
    model = onnx.load_model_from_string(data)
    path = tmp_path / "model" / "mlp.onnx"
    path.parent.mkdir()
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    return path


def test_external_data_weights_are_read_and_every_variant_keeps_them(tmp_path: Path) -> None:
    path = _save_external(tmp_path, tm.mlp())
    assert path.stat().st_size < 2000  # the weights really are outside
    data = tm.mlp_data(40, seed=2)
    result = compile_model(
        path,
        AVX2,
        validation=data,
        recipes=["fp32", "fp16", "int8-dynamic"],
        tolerance=0.05,
        **FAST,
    )
    want = make_session(tm.mlp()).run(None, data)[0]
    assert {v.name for v in result.chosen} == {"fp32", "fp16", "int8-dynamic"}
    for v in result.chosen:
        # Each variant runs on its own, away from the data file.
        got = make_session(v.model).run(None, data)[0]
        assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.95, v.name
        assert v.size_bytes > 1000
    fp32 = next(v for v in result.chosen if v.name == "fp32")
    np.testing.assert_array_equal(make_session(fp32.model).run(None, data)[0], want)
    # Sizes compare with the whole source (graph plus weights), not the stub.
    assert result.report.source["size_bytes"] > 10_000
    int8 = result.report.candidate("int8-dynamic")
    assert int8.accuracy is not None and int8.accuracy.passed
    assert int8.size_ratio is not None and 0.2 < int8.size_ratio < 0.5


def test_a_missing_data_file_is_named(tmp_path: Path) -> None:
    path = _save_external(tmp_path, tm.mlp())
    (path.parent / "mlp.weights").unlink()
    with pytest.raises(
        SourceModelError, match=r"external data file 'mlp\.weights', which is missing"
    ):
        load_source(path)


def test_a_data_file_outside_the_model_directory_is_refused(tmp_path: Path) -> None:
    path = _save_external(tmp_path, tm.mlp())
    (path.parent / "mlp.weights").rename(tmp_path / "mlp.weights")
    model = onnx.load_model(str(path), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../mlp.weights"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(SourceModelError, match="outside the model's directory"):
        load_source(path)


def test_bytes_with_external_data_ask_for_the_path(tmp_path: Path) -> None:
    path = _save_external(tmp_path, tm.mlp())
    with pytest.raises(SourceModelError, match=r"give the path of the \.onnx file"):
        load_source(path.read_bytes())
