"""Tests for safe bundle extraction, sample loading and the smoke test."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import lzma
import os
import tarfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent import unpack
from edgefleet.agent.unpack import load_manifest, load_sample, smoke_test, unpack_bundle
from edgefleet.protocols.bundle import BundleCompression, BundleManifest, TensorSpec
from edgefleet.protocols.errors import BundleFormatError, SmokeTestError
from edgefleet.shared.runtime import InferenceInputError, OnnxRuntimeBackend
from tests.shared.test_runtime import affine, affine_model_bytes

MODEL = affine_model_bytes()
SAMPLE_X = np.arange(6, dtype=np.float32).reshape(2, 3)


def make_manifest(model: bytes = MODEL, **changes: object) -> BundleManifest:
    manifest = BundleManifest(
        model="affine",
        version="1.0.0",
        release=3,
        runtime="onnxruntime",
        precision="fp32",
        hardware_class="generic",
        model_file="model.onnx",
        model_sha256=hashlib.sha256(model).hexdigest(),
        inputs=(TensorSpec("x", "float32", (None, 3)),),
        outputs=(TensorSpec("y", "float32", (None, 3)),),
    )
    return dataclasses.replace(manifest, **changes)  # type: ignore[arg-type]


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def good_sample() -> bytes:
    return npz_bytes({"in.x": SAMPLE_X, "out.y": affine(SAMPLE_X)})


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, b""


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def good_members(
    manifest: BundleManifest | None = None, model: bytes = MODEL, sample: bytes | None = None
) -> list[tuple[tarfile.TarInfo, bytes]]:
    return [
        regular("manifest.json", (manifest or make_manifest(model)).encode()),
        regular("model.onnx", model),
        regular("sample.npz", good_sample() if sample is None else sample),
    ]


def build_bundle(path: Path, **kwargs: object) -> Path:
    """A valid bundle of the affine model (also used by other agent tests)."""
    return write_tar(path, good_members(**kwargs))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- unpack_bundle
def test_unpack_good_bundle(tmp_path: Path) -> None:
    bundle = build_bundle(tmp_path / "b.tar")
    dest = tmp_path / "dest"
    manifest = unpack_bundle(bundle, dest)
    assert manifest == make_manifest()
    assert sorted(p.name for p in dest.iterdir()) == ["manifest.json", "model.onnx", "sample.npz"]
    assert (dest / "model.onnx").read_bytes() == MODEL
    assert load_manifest(dest) == manifest


def _refusal_cases() -> list[tuple[str, list[tuple[tarfile.TarInfo, bytes]], str]]:
    good = good_members()
    manifest, model, sample = good
    return [
        (
            "symlink",
            [manifest, special("model.onnx", tarfile.SYMTYPE, "/etc/passwd"), sample],
            "is a symlink",
        ),
        (
            "hardlink",
            [manifest, model, special("sample.npz", tarfile.LNKTYPE, "model.onnx")],
            "is a hard link",
        ),
        ("directory", [special("slots", tarfile.DIRTYPE), *good], "is a directory"),
        ("fifo", [*good, special("pipe", tarfile.FIFOTYPE)], "not a regular file"),
        ("device", [*good, special("dev", tarfile.CHRTYPE)], "not a regular file"),
        ("absolute", [*good, regular("/etc/cron.d/x", b"x")], "unsafe path"),
        ("dotdot", [*good, regular("../model.onnx", b"x")], "unsafe path"),
        ("nested", [manifest, regular("sub/model.onnx", MODEL), sample], "unexpected member"),
        ("extra", [*good, regular("README", b"hi")], "unexpected member 'README'"),
        ("duplicate", [*good, manifest], "duplicate member 'manifest.json'"),
        ("no manifest", [model, sample], "missing member 'manifest.json'"),
        ("no sample", [manifest, model], "missing member 'sample.npz'"),
        ("no model", [manifest, sample], "no model file"),
        ("two models", [*good, regular("model.tflite", b"x")], "more than one model file"),
        (
            "model file mismatch",
            [
                regular(
                    "manifest.json",
                    make_manifest(runtime="tflite", model_file="model.tflite").encode(),
                ),
                model,
                sample,
            ],
            "manifest names 'model.tflite'",
        ),
        ("bad manifest", [regular("manifest.json", b"{not json"), model, sample], "not valid JSON"),
        (
            "sha mismatch",
            [regular("manifest.json", make_manifest(b"other").encode()), model, sample],
            "has SHA-256",
        ),
    ]


@pytest.mark.parametrize(
    ("members", "message"),
    [pytest.param(m, msg, id=name) for name, m, msg in _refusal_cases()],
)
def test_unpack_refuses_bad_members(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]], message: str
) -> None:
    bundle = write_tar(tmp_path / "b.tar", members)
    with pytest.raises(BundleFormatError) as info:
        unpack_bundle(bundle, tmp_path / "dest")
    assert message in str(info.value)
    assert info.value.code == "bad_bundle"


def test_unpack_refuses_member_over_2gib(tmp_path: Path) -> None:
    # A header claiming 3 GiB: refused from the header, before any data is read.
    info = tarfile.TarInfo("model.onnx")
    info.size = 3 * 1024**3
    bundle = tmp_path / "b.tar"
    bundle.write_bytes(info.tobuf(tarfile.GNU_FORMAT) + b"\0" * 4096)
    with pytest.raises(BundleFormatError, match="more than 2147483648"):
        unpack_bundle(bundle, tmp_path / "dest")
    assert not (tmp_path / "dest" / "model.onnx").exists()


def test_unpack_refuses_oversize_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(unpack, "MAX_MANIFEST_BYTES", 10)
    with pytest.raises(BundleFormatError, match=r"manifest\.json is larger than 10"):
        unpack_bundle(build_bundle(tmp_path / "b.tar"), tmp_path / "dest")


def _data_offset(raw: bytes, name: str) -> int:
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return tar.getmember(name).offset_data


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(gzip.compress, "not a readable uncompressed tar", id="gzipped"),
        pytest.param(lambda raw: b"PK\x03\x04 zip file", "not a readable", id="not-tar"),
        pytest.param(lambda raw: b"", "not a readable", id="empty"),
        pytest.param(lambda raw: raw[:3000], "bundle refused", id="truncated-early"),
        pytest.param(
            lambda raw: raw[: _data_offset(raw, "sample.npz") + 10],
            "unexpected end of data",
            id="truncated-in-data",
        ),
    ],
)
def test_unpack_refuses_non_tar(tmp_path: Path, make: object, message: str) -> None:
    raw = build_bundle(tmp_path / "good.tar").read_bytes()
    bundle = tmp_path / "b.tar"
    bundle.write_bytes(make(raw))  # type: ignore[operator]
    with pytest.raises(BundleFormatError, match=message):
        unpack_bundle(bundle, tmp_path / "dest")


def test_unpack_never_writes_through_a_planted_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "model.onnx").symlink_to(outside)
    with pytest.raises(OSError, match="exists"):
        unpack_bundle(build_bundle(tmp_path / "b.tar"), dest)
    assert outside.read_bytes() == b"precious"


def test_unpack_fsyncs_files_and_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    unpack_bundle(build_bundle(tmp_path / "b.tar"), tmp_path / "dest")
    assert len(synced) == 4  # three files and the directory


# --------------------------------------------------------------------------- load_sample
def _slot_with_sample(tmp_path: Path, sample: bytes) -> Path:
    slot = tmp_path / "slot"
    slot.mkdir()
    (slot / "sample.npz").write_bytes(sample)
    return slot


def test_load_sample_splits_inputs_and_expected(tmp_path: Path) -> None:
    inputs, expected = load_sample(_slot_with_sample(tmp_path, good_sample()))
    assert list(inputs) == ["x"]
    assert list(expected) == ["y"]
    np.testing.assert_array_equal(inputs["x"], SAMPLE_X)


@pytest.mark.parametrize(
    ("sample", "message"),
    [
        pytest.param(
            npz_bytes({"in.x": np.array([{"a": 1}], dtype=object), "out.y": SAMPLE_X}),
            "unreadable",
            id="pickled",
        ),
        pytest.param(
            npz_bytes({"in.x": SAMPLE_X, "out.y": SAMPLE_X, "extra": SAMPLE_X}),
            "array 'extra'",
            id="unknown-key",
        ),
        pytest.param(npz_bytes({"out.y": SAMPLE_X}), "no in.* arrays", id="no-inputs"),
        pytest.param(npz_bytes({"in.x": SAMPLE_X}), "no out.* arrays", id="no-outputs"),
        pytest.param(b"not a zip", "unreadable", id="not-npz"),
    ],
)
def test_load_sample_refuses(tmp_path: Path, sample: bytes, message: str) -> None:
    with pytest.raises(BundleFormatError, match=message):
        load_sample(_slot_with_sample(tmp_path, sample))


def test_load_sample_refuses_missing_file_and_zip_bomb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(BundleFormatError, match="unreadable"):
        load_sample(tmp_path)
    slot = _slot_with_sample(tmp_path, good_sample())
    monkeypatch.setattr(unpack, "MAX_SAMPLE_BYTES", 100)
    with pytest.raises(BundleFormatError, match="more than 100"):
        load_sample(slot)


def test_load_manifest_refuses_bad_file(tmp_path: Path) -> None:
    with pytest.raises(BundleFormatError, match="cannot read"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("[]")
    with pytest.raises(BundleFormatError, match="JSON object"):
        load_manifest(tmp_path)


# --------------------------------------------------------------------------- smoke_test
@pytest.fixture
def installed(tmp_path: Path) -> tuple[Path, BundleManifest]:
    dest = tmp_path / "slot"
    manifest = unpack_bundle(build_bundle(tmp_path / "b.tar"), dest)
    return dest, manifest


def test_smoke_test_passes_and_times_the_run(installed: tuple[Path, BundleManifest]) -> None:
    slot, manifest = installed
    model = OnnxRuntimeBackend().load(slot / "model.onnx")
    elapsed = smoke_test(model, slot, manifest)
    assert 0 < elapsed < 5


def test_smoke_test_within_tolerance_passes(tmp_path: Path) -> None:
    slot = tmp_path / "slot"
    sample = npz_bytes({"in.x": SAMPLE_X, "out.y": affine(SAMPLE_X) + np.float32(5e-5)})
    manifest = unpack_bundle(build_bundle(tmp_path / "b.tar", sample=sample), slot)
    smoke_test(OnnxRuntimeBackend().load(slot / "model.onnx"), slot, manifest)


def test_smoke_test_names_output_and_difference(tmp_path: Path) -> None:
    slot = tmp_path / "slot"
    sample = npz_bytes({"in.x": SAMPLE_X, "out.y": affine(SAMPLE_X) + np.float32(0.5)})
    manifest = unpack_bundle(build_bundle(tmp_path / "b.tar", sample=sample), slot)
    model = OnnxRuntimeBackend().load(slot / "model.onnx")
    with pytest.raises(SmokeTestError, match=r"output 'y' differs .* by up to 0\.5 "):
        smoke_test(model, slot, manifest)


def test_smoke_test_uses_manifest_tolerances(tmp_path: Path) -> None:
    slot = tmp_path / "slot"
    sample = npz_bytes({"in.x": SAMPLE_X, "out.y": affine(SAMPLE_X) + np.float32(0.5)})
    manifest = make_manifest(smoke_atol=1.0)
    unpack_bundle(build_bundle(tmp_path / "b.tar", manifest=manifest, sample=sample), slot)
    smoke_test(OnnxRuntimeBackend().load(slot / "model.onnx"), slot, manifest)


class FakeModel:
    """A LoadedModel returning fixed outputs or raising, to drive failure paths."""

    inputs: tuple[TensorSpec, ...] = (TensorSpec("x", "float32", (None, 3)),)
    outputs: tuple[TensorSpec, ...] = (TensorSpec("y", "float32", (None, 3)),)

    def __init__(self, result: dict[str, np.ndarray] | Exception) -> None:
        self.result = result

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


@pytest.mark.parametrize(
    ("result", "message"),
    [
        pytest.param({"y": np.full((2, 3), np.nan, np.float32)}, "output 'y' holds NaN", id="nan"),
        pytest.param({"y": np.zeros((3, 2), np.float32)}, "has shape [3, 2]", id="shape"),
        pytest.param({"z": affine(SAMPLE_X)}, "no output 'y'", id="missing"),
        pytest.param(RuntimeError("kernel exploded"), "raised: kernel exploded", id="raises"),
        pytest.param(InferenceInputError("missing x"), "raised: missing x", id="bad-input"),
    ],
)
def test_smoke_test_failures(
    installed: tuple[Path, BundleManifest], result: dict[str, np.ndarray] | Exception, message: str
) -> None:
    slot, manifest = installed
    with pytest.raises(SmokeTestError) as info:
        smoke_test(FakeModel(result), slot, manifest)
    assert message in str(info.value)
    assert info.value.code == "smoke_test_failed"


def test_smoke_test_refuses_io_that_differs_from_manifest(
    installed: tuple[Path, BundleManifest],
) -> None:
    slot, manifest = installed
    model = OnnxRuntimeBackend().load(slot / "model.onnx")
    wrong = dataclasses.replace(manifest, inputs=(TensorSpec("x", "float64", (None, 3)),))
    with pytest.raises(SmokeTestError, match="model inputs"):
        smoke_test(model, slot, wrong)


# --------------------------------------------------------------------------- compressed bundles
def _xz(raw: bytes, **kwargs: object) -> bytes:
    return lzma.compress(raw, format=lzma.FORMAT_XZ, **kwargs)  # type: ignore[arg-type]


def _compressed(tmp_path: Path) -> tuple[Path, BundleCompression]:
    raw = build_bundle(tmp_path / "plain.tar").read_bytes()
    path = tmp_path / "b.bundle"
    path.write_bytes(_xz(raw))
    return path, BundleCompression("lzma", len(raw))


def test_a_compressed_bundle_unpacks_with_its_signed_size(tmp_path: Path) -> None:
    path, compression = _compressed(tmp_path)
    dest = tmp_path / "dest"
    manifest = unpack_bundle(path, dest, compression=compression)
    assert manifest == make_manifest()
    assert (dest / "model.onnx").read_bytes() == MODEL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bundle", "dest", "plain.tar"]


def test_a_compressed_bundle_without_a_signed_size_is_refused(tmp_path: Path) -> None:
    path, _ = _compressed(tmp_path)
    with pytest.raises(BundleFormatError, match=r"xz-compressed.*no decompressed size"):
        unpack_bundle(path, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_decompression_bomb_is_stopped_at_the_signed_size(tmp_path: Path) -> None:
    """64 MiB of zeros compress to ~10 KB; signed as 1 MiB, no more than 1 MiB is written."""
    bomb = tmp_path / "bomb.bundle"
    bomb.write_bytes(_xz(b"\0" * (64 * 1024 * 1024)))
    assert bomb.stat().st_size < 100_000
    out = tmp_path / "out.tar"
    with pytest.raises(BundleFormatError, match="beyond its signed size of 1048576"):
        unpack.decompress_bundle(bomb, out, BundleCompression("lzma", 1024 * 1024))
    assert out.stat().st_size <= 1024 * 1024  # nothing past the bound was written
    with pytest.raises(BundleFormatError, match="beyond its signed size"):
        unpack_bundle(bomb, tmp_path / "dest", compression=BundleCompression("lzma", 1024 * 1024))
    assert not (tmp_path / "bomb.bundle.tar").exists()  # the temporary tar is gone


@pytest.mark.parametrize(
    ("mangle", "signed_delta", "message"),
    [
        pytest.param(lambda raw: raw, 1, "decompresses to .* the signed size is", id="short"),
        pytest.param(lambda raw: raw, -1, "beyond its signed size", id="long"),
        pytest.param(lambda raw: raw[: len(raw) // 2], 0, "truncated|corrupt", id="truncated"),
        pytest.param(lambda raw: raw + b"junk", 0, "data after the compressed stream", id="trail"),
        pytest.param(
            lambda raw: raw[:40] + bytes([raw[40] ^ 0xFF]) + raw[41:], 0, "corrupt", id="flipped"
        ),
    ],
)
def test_compressed_bundles_that_do_not_match_their_signature_are_refused(
    tmp_path: Path, mangle: object, signed_delta: int, message: str
) -> None:
    path, compression = _compressed(tmp_path)
    path.write_bytes(mangle(path.read_bytes()))  # type: ignore[operator]
    signed = BundleCompression("lzma", compression.decompressed_length + signed_delta)
    with pytest.raises(BundleFormatError, match=message):
        unpack_bundle(path, tmp_path / "dest", compression=signed)


def test_a_stream_needing_too_much_decoder_memory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = _compressed(tmp_path)
    path.write_bytes(_xz(b"x" * 1000, preset=9))  # a 64 MiB dictionary
    monkeypatch.setattr(unpack, "MAX_DECODER_MEMORY", 16 * 1024 * 1024)
    with pytest.raises(BundleFormatError, match=r"corrupt compressed stream.*[Mm]emory"):
        unpack_bundle(path, tmp_path / "dest", compression=BundleCompression("lzma", 1000))


def test_an_unknown_codec_is_refused(tmp_path: Path) -> None:
    path, _ = _compressed(tmp_path)
    with pytest.raises(BundleFormatError, match="unknown compression 'zstd'"):
        unpack_bundle(path, tmp_path / "dest", compression=BundleCompression("zstd", 10))
