"""ONNX models whose weights live in external data files beside the ``.onnx`` (large exports)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from edgefleet.controller.compiler import BUILTIN_PROFILES, SourceModelError, compile_model
from edgefleet.controller.compiler.pipeline import load_source
from edgefleet.controller.compiler.source import make_session

from . import models as tm

AVX2 = BUILTIN_PROFILES["x86-avx2"]
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
    # The fp32 variant (always eligible) runs on its own, away from the data file.
    fp32 = next(v for v in result.chosen if v.name == "fp32")
    np.testing.assert_array_equal(make_session(fp32.model).run(None, data)[0], want)
    # Sizes compare with the whole source (graph plus weights), not the stub,
    # and the other variants hold their (converted) weights: they loaded, ran
    # and agree with fp32.
    assert result.report.source["size_bytes"] > 10_000
    assert fp32.size_bytes == result.report.source["size_bytes"]
    for name, low, high in (("fp16", 0.4, 0.7), ("int8-dynamic", 0.2, 0.5)):
        c = result.report.candidate(name)
        assert c.accuracy is not None and c.accuracy.passed, name
        assert c.size_ratio is not None and low < c.size_ratio < high, (name, c.size_ratio)


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
