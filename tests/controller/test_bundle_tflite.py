"""TFLite bundles: built on the controller, unpacked, loaded and smoke-tested as the agent does."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.unpack import smoke_test, unpack_bundle
from edgefleet.controller.bundle import build_bundle, default_sample, inspect_tflite_io
from edgefleet.controller.errors import ModelError
from edgefleet.protocols.bundle import TensorSpec
from edgefleet.protocols.errors import SmokeTestError
from edgefleet.shared.runtime import get_backend
from tests.tflite_fixture import FIXTURE, quadrant_images, require_litert, require_quantizer


@pytest.fixture(autouse=True)
def _litert() -> None:
    require_litert()


def _install(model: bytes, tmp_path: Path, precision: str = "fp32") -> float:
    """Build a bundle, unpack it and smoke-test it with the agent's TFLite backend."""
    archive, manifest = build_bundle(
        model,
        name="quadrants",
        version="1.0",
        release=1,
        hardware_class="arm64-litert",
        precision=precision,
        runtime="tflite",
        sample_inputs={"image": quadrant_images(3, seed=7)[0]},
    )
    assert manifest.model_file == "model.tflite"
    assert manifest.model_sha256 == hashlib.sha256(model).hexdigest()
    bundle = tmp_path / "bundle.tar"
    bundle.write_bytes(archive)
    slot = tmp_path / "slot"
    unpacked = unpack_bundle(bundle, slot)
    assert unpacked == manifest
    assert (slot / "model.tflite").read_bytes() == model
    loaded = get_backend(unpacked.runtime).load(slot / unpacked.model_file)
    return smoke_test(loaded, slot, unpacked)


def test_fp32_tflite_bundle_builds_unpacks_loads_and_passes_the_smoke_test(
    tmp_path: Path,
) -> None:
    assert _install(FIXTURE.read_bytes(), tmp_path) >= 0.0


def test_tflite_io_is_inspected_as_the_agent_serves_it() -> None:
    inputs, outputs = inspect_tflite_io(FIXTURE.read_bytes())
    assert inputs == (TensorSpec("image", "float32", (None, 8, 8, 1)),)
    assert outputs == (TensorSpec("probs", "float32", (None, 4)),)
    sample = default_sample(inputs, batch=2)
    assert sample["image"].shape == (2, 8, 8, 1)


def test_tflite_bundles_are_reproducible() -> None:
    kwargs = {
        "name": "q",
        "version": "1",
        "release": 1,
        "hardware_class": "arm64-litert",
        "precision": "fp32",
        "runtime": "tflite",
        "sample_inputs": {"image": quadrant_images(2, seed=1)[0]},
    }
    assert (
        build_bundle(FIXTURE.read_bytes(), **kwargs)[0]
        == build_bundle(FIXTURE.read_bytes(), **kwargs)[0]
    )


def test_full_integer_tflite_bundle_passes_its_smoke_test(tmp_path: Path) -> None:
    """int8 I/O is served as float32 both when building and on the agent, so they agree."""
    require_quantizer()
    from litert_quantizer import quantizer, recipe

    calib, _ = quadrant_images(16, seed=2)
    q = quantizer.Quantizer(FIXTURE.read_bytes(), recipe.static_wi8_ai8())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*preserve_all_tensors")
        qsv = q.calibrate(
            {"serving_default": [{"image": calib[i : i + 1]} for i in range(16)]}, num_threads=1
        )
        int8 = bytes(q.quantize(qsv, enable_progress_report=False).quantized_model)
    assert _install(int8, tmp_path, precision="int8") >= 0.0


def test_bad_tflite_bundles_are_refused(tmp_path: Path) -> None:
    data = FIXTURE.read_bytes()
    good = {"image": quadrant_images(2, seed=1)[0]}

    def build(model: bytes, sample: dict[str, np.ndarray]) -> None:
        build_bundle(
            model,
            name="q",
            version="1",
            release=1,
            hardware_class="arm64-litert",
            precision="fp32",
            runtime="tflite",
            sample_inputs=sample,
        )

    with pytest.raises(ModelError, match="not a TFLite model"):
        build(b"\x08\x07" + bytes(40), good)
    with pytest.raises(ModelError, match="tflite cannot load"):
        build(data[: len(data) // 2], good)
    with pytest.raises(ModelError, match="empty"):
        build(b"", good)
    with pytest.raises(ModelError, match="sample input 'image' is float64"):
        build(data, {"image": good["image"].astype(np.float64)})
    with pytest.raises(ModelError, match="missing \\['image'\\]"):
        build(data, {"pixels": good["image"]})
    with pytest.raises(ModelError, match="has shape \\[2, 8, 8\\]"):
        build(data, {"image": good["image"][..., 0]})


def test_smoke_test_fails_when_the_tflite_outputs_do_not_match(tmp_path: Path) -> None:
    """The smoke test really compares: a sample whose recorded outputs are not the model's fails."""
    archive, manifest = build_bundle(
        FIXTURE.read_bytes(),
        name="q",
        version="1",
        release=1,
        hardware_class="arm64-litert",
        precision="fp32",
        runtime="tflite",
        sample_inputs={"image": quadrant_images(4, seed=3)[0]},
    )
    bundle = tmp_path / "b.tar"
    bundle.write_bytes(archive)
    slot = tmp_path / "slot"
    unpack_bundle(bundle, slot)
    loaded = get_backend("tflite").load(slot / "model.tflite")
    # Same model, but fed the images upside down: the recorded outputs no longer match.
    flipped = {"image": quadrant_images(4, seed=3)[0][:, ::-1].copy()}
    np.savez(
        slot / "sample.npz",
        **{"in.image": flipped["image"]},
        **{"out.probs": loaded.run({"image": quadrant_images(4, seed=3)[0]})["probs"]},
    )
    with pytest.raises(SmokeTestError, match="differs from the expected values"):
        smoke_test(loaded, slot, manifest)
