"""Bundle compression for the wire: only when it pays, reproducible, signed in the target."""

from __future__ import annotations

import io
import lzma
import tarfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.controller.bundle import (
    MIN_COMPRESSION_SAVING,
    build_bundle,
    compress_bundle,
)
from edgefleet.controller.errors import ModelError
from edgefleet.protocols.bundle import (
    MAX_DECOMPRESSED_BYTES,
    BundleCompression,
    TargetCustom,
    TensorSpec,
)
from edgefleet.protocols.errors import MessageError


def weight_model(weights: np.ndarray) -> bytes:
    """y = x @ W with W of shape [K, N] stored as an initializer."""
    k, n = weights.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


def bundle_of(weights: np.ndarray) -> bytes:
    archive, _ = build_bundle(
        weight_model(weights),
        name="m",
        version="1",
        release=1,
        hardware_class="generic",
        precision="fp32",
        sample_inputs={"x": np.ones((1, weights.shape[0]), np.float32)},
    )
    return archive


def test_a_compressible_bundle_is_compressed_and_decompresses_to_the_signed_size() -> None:
    # Weights quantized to a few levels (as int8 storage dequantizes them) compress well.
    rng = np.random.default_rng(0)
    weights = (np.round(rng.normal(0, 2, (256, 256))) / 8).astype(np.float32)
    archive = bundle_of(weights)
    packed, compression = compress_bundle(archive)
    assert compression == BundleCompression("lzma", len(archive))
    assert len(packed) <= len(archive) * (1 - MIN_COMPRESSION_SAVING)
    assert lzma.decompress(packed) == archive
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(packed)), mode="r:") as tar:
        assert sorted(tar.getnames()) == ["manifest.json", "model.onnx", "sample.npz"]


def test_an_incompressible_bundle_is_left_as_it_is() -> None:
    noise = np.random.default_rng(1).bytes(200_000)
    packed, compression = compress_bundle(noise)
    assert compression is None
    assert packed == noise


def test_the_threshold_decides() -> None:
    # half noise, half zeros: compression saves a little under half
    data = np.random.default_rng(2).bytes(100_000) + bytes(100_000)
    saving = 1 - len(lzma.compress(data, preset=6)) / len(data)
    assert 0.4 < saving < 0.5
    assert compress_bundle(data, min_saving=0.5) == (data, None)
    packed, compression = compress_bundle(data, min_saving=0.4)
    assert compression == BundleCompression("lzma", len(data))
    assert lzma.decompress(packed) == data
    with pytest.raises(ModelError, match="min_saving"):
        compress_bundle(data, min_saving=1.0)


def test_even_fp32_weights_compress_by_more_than_the_threshold() -> None:
    """Normal-distributed fp32 weights share exponent bytes: xz saves ~10%."""
    weights = np.random.default_rng(1).standard_normal((128, 128)).astype(np.float32)
    archive = bundle_of(weights)
    packed, compression = compress_bundle(archive)
    assert compression is not None
    assert len(packed) < len(archive) * (1 - MIN_COMPRESSION_SAVING)


def test_compression_is_reproducible() -> None:
    weights = (np.arange(256 * 64) % 7).reshape(256, 64).astype(np.float32)
    archive = bundle_of(weights)
    assert compress_bundle(archive) == compress_bundle(archive)


def _custom(compression: BundleCompression | None) -> TargetCustom:
    spec = TensorSpec("x", "float32", (None, 4))
    return TargetCustom(
        "m", "1", 1, "onnxruntime", "int8", "generic", (spec,), (spec,), compression=compression
    )


def test_target_custom_signs_the_compression_and_round_trips() -> None:
    custom = _custom(BundleCompression("lzma", 123_456))
    d = custom.to_dict()
    assert d["compression"] == {"codec": "lzma", "decompressed_length": 123_456}
    assert TargetCustom.from_dict(d) == custom
    assert "compression" not in TargetCustom.from_dict(d).extra
    plain = _custom(None)
    assert "compression" not in plain.to_dict()
    assert TargetCustom.from_dict(plain.to_dict()).compression is None


@pytest.mark.parametrize(
    ("compression", "message"),
    [
        ("lzma", "must be an object"),
        ({"codec": "brotli", "decompressed_length": 10}, "codec"),
        ({"codec": "lzma"}, "decompressed_length"),
        ({"codec": "lzma", "decompressed_length": 0}, "decompressed_length"),
        ({"codec": "lzma", "decompressed_length": -5}, "decompressed_length"),
        ({"codec": "lzma", "decompressed_length": "10"}, "decompressed_length"),
        ({"codec": "lzma", "decompressed_length": MAX_DECOMPRESSED_BYTES + 1}, "more than"),
    ],
)
def test_bad_compression_metadata_is_refused(compression: object, message: str) -> None:
    d = _custom(None).to_dict()
    d["compression"] = compression
    with pytest.raises(MessageError, match=message):
        TargetCustom.from_dict(d)


def test_onnx_fixture_is_valid() -> None:
    onnx.checker.check_model(onnx.load_from_string(weight_model(np.eye(4, dtype=np.float32))))
