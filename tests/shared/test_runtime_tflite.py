"""The agent's TFLite backend on a real LiteRT interpreter and the committed fixture model."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from edgefleet.protocols.bundle import TensorSpec
from edgefleet.protocols.errors import ConfigError, ModelLoadError, UnsupportedRuntimeError
from edgefleet.shared.runtime import (
    InferenceInputError,
    LoadedModel,
    TfliteBackend,
    available_runtimes,
    get_backend,
    tflite_interpreter_class,
)
from tests.tflite_fixture import FIXTURE, quadrant_images, require_litert, require_quantizer


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    require_litert()
    return TfliteBackend().load(FIXTURE)


def test_registry_reports_and_returns_the_tflite_backend() -> None:
    require_litert()
    assert "tflite" in available_runtimes()
    backend = get_backend("tflite", threads=2)
    assert isinstance(backend, TfliteBackend)
    assert backend.name == "tflite"
    assert backend.threads == 2
    with pytest.raises(ConfigError, match="threads"):
        get_backend("tflite", threads=0)


def test_io_specs_use_signature_names_and_dynamic_batch(model: LoadedModel) -> None:
    assert model.inputs == (TensorSpec("image", "float32", (None, 8, 8, 1)),)
    assert model.outputs == (TensorSpec("probs", "float32", (None, 4)),)


def test_runs_and_resizes_the_batch(model: LoadedModel) -> None:
    images, labels = quadrant_images(12, seed=21)
    full = model.run({"image": images})["probs"]
    assert full.shape == (12, 4)
    assert full.dtype == np.float32
    np.testing.assert_allclose(full.sum(axis=1), 1.0, rtol=1e-5)
    # The fixture is trained: on this easy task it is right on every sample.
    assert (full.argmax(axis=1) == labels).all()
    one = model.run({"image": images[3:4]})["probs"]
    assert one.shape == (1, 4)
    np.testing.assert_allclose(one[0], full[3], rtol=1e-5, atol=1e-6)
    again = model.run({"image": images})["probs"]
    np.testing.assert_allclose(again, full, rtol=1e-6)


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ({"image": np.zeros((1, 8, 8, 1), np.float64)}, "must have dtype float32, got float64"),
        ({"image": np.zeros((1, 8, 8, 2), np.float32)}, "axis 3"),
        ({"image": np.zeros((8, 8, 1), np.float32)}, "rank 4"),
        ({"pixels": np.zeros((1, 8, 8, 1), np.float32)}, "unknown input"),
        ({}, "missing input"),
    ],
)
def test_bad_inputs_are_refused_before_the_interpreter(
    model: LoadedModel, feeds: dict[str, np.ndarray], message: str
) -> None:
    with pytest.raises(InferenceInputError, match=message):
        model.run(feeds)


def test_concurrent_runs_with_different_batches_do_not_mix(model: LoadedModel) -> None:
    """The interpreter shares its tensors; the lock must keep each caller's result its own."""
    batches = [quadrant_images(n, seed=100 + n)[0] for n in (1, 7, 64, 200)]
    expected = [model.run({"image": b})["probs"] for b in batches]
    failures: list[str] = []

    def worker(k: int) -> None:
        for i in range(100):
            j = (k + i) % len(batches)
            got = model.run({"image": batches[j]})["probs"]
            if got.shape != expected[j].shape or not np.allclose(got, expected[j], atol=1e-6):
                failures.append(f"thread {k} run {i} batch {j}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_bad_model_files_are_load_errors(tmp_path: Path) -> None:
    require_litert()
    backend = TfliteBackend()
    data = FIXTURE.read_bytes()
    cases = {
        "missing.tflite": None,
        "truncated.tflite": data[: len(data) // 2],
        "garbage.tflite": data[:8] + bytes(range(256)) * 8,
        "onnx.tflite": b"\x08\x07\x12\x04test" + bytes(64),
        "empty.tflite": b"",
    }
    messages = {
        "missing.tflite": "does not exist",
        "truncated.tflite": "tflite cannot load truncated.tflite",
        "garbage.tflite": "tflite cannot load garbage.tflite",
        "onnx.tflite": "not a TFLite model",
        "empty.tflite": "not a TFLite model",
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(ModelLoadError, match=messages[name]):
            backend.load(path)


def test_full_integer_model_is_served_as_float(model: LoadedModel) -> None:
    """A static int8 model has int8 I/O; the backend (de)quantizes so callers see float32."""
    require_quantizer()
    from litert_quantizer import quantizer, recipe

    calib, _ = quadrant_images(32, seed=5)
    q = quantizer.Quantizer(FIXTURE.read_bytes(), recipe.static_wi8_ai8())
    # The calibrator opens interpreters in debug mode and warns about it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*preserve_all_tensors")
        qsv = q.calibrate(
            {"serving_default": [{"image": calib[i : i + 1]} for i in range(32)]}, num_threads=1
        )
        int8 = bytes(q.quantize(qsv, enable_progress_report=False).quantized_model)
    loaded = TfliteBackend().load_bytes(int8, "int8 model")
    assert loaded.inputs == model.inputs
    assert loaded.outputs == model.outputs
    images, labels = quadrant_images(64, seed=6)
    got = loaded.run({"image": images})["probs"]
    ref = model.run({"image": images})["probs"]
    assert got.dtype == np.float32
    assert (got.argmax(axis=1) == labels).mean() >= 0.98
    # Output scale of a softmax in int8 is 1/256: the values agree to a few steps.
    assert np.abs(got - ref).max() < 0.05


# --------------------------------------------------------------------------- interpreter choice
def _fake_tflite_runtime(root: Path) -> None:
    """A stand-in tflite_runtime package on sys.path: only whether it is found matters."""
    pkg = root / "tflite_runtime"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "interpreter.py").write_text("class Interpreter:\n    pass\n")


def test_tflite_runtime_next_to_numpy2_is_refused_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_tflite_runtime(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    if int(np.__version__.split(".")[0]) >= 2:
        with pytest.raises(UnsupportedRuntimeError, match=r"tflite-runtime 2\.14 needs numpy<2"):
            tflite_interpreter_class(("tflite_runtime",))
    else:
        cls = tflite_interpreter_class(("tflite_runtime",))
        assert cls.__module__ == "tflite_runtime.interpreter"


def test_ai_edge_litert_is_preferred_over_tflite_runtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_litert()
    _fake_tflite_runtime(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    cls = tflite_interpreter_class()
    assert cls.__module__ == "ai_edge_litert.interpreter"


def test_no_interpreter_installed_says_what_to_install() -> None:
    with pytest.raises(UnsupportedRuntimeError, match=r"pip install 'edgefleet\[agent-tflite\]'"):
        tflite_interpreter_class(("edgefleet_no_such_interpreter",))
