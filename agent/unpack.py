"""Safe bundle extraction and the smoke test that gates activation.

A bundle reaching this module has already passed TUF verification, so its
bytes are the ones the controller signed. We still extract it as if it were
hostile: a signing key can leak, a build can be buggy, and the price of
strictness is nil because the layout is fixed (see
:mod:`edgefleet.protocols.bundle`). So we never call ``tarfile.extractall``;
we read the archive's headers, accept exactly ``manifest.json``, the one
model file the manifest names and ``sample.npz`` as plain regular files, and
write each one ourselves with ``O_EXCL|O_NOFOLLOW`` into the destination.
Anything else (links, directories, devices, path tricks, duplicates, missing
or extra members, oversize members, compression, non-tar data) is a
:class:`~edgefleet.protocols.errors.BundleFormatError`.

A bundle compressed for the wire (xz, see :mod:`edgefleet.protocols.bundle`)
is decompressed first, as a stream, with a hard stop at the decompressed
length signed in its TUF metadata: a bundle that decompresses beyond it is
refused before more than one chunk past the bound exists anywhere.

Files are fsynced, then the directory, so that once a slot is committed and
activated a power cut cannot leave a half-written model behind.

The smoke test then runs the bundle's recorded sample through the loaded
model and compares with the outputs recorded at build time, so a model that
loads but computes nonsense on this device (a miscompiled kernel, a missing
CPU feature) never goes live.
"""

from __future__ import annotations

import hashlib
import lzma
import math
import os
import tarfile
import time
import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np

from edgefleet.protocols.bundle import (
    MANIFEST_NAME,
    MODEL_NAMES,
    SAMPLE_INPUT_PREFIX,
    SAMPLE_NAME,
    SAMPLE_OUTPUT_PREFIX,
    BundleCompression,
    BundleManifest,
)
from edgefleet.protocols.errors import BundleFormatError, MessageError, SmokeTestError
from edgefleet.shared.durable import fsync_dir
from edgefleet.shared.runtime import LoadedModel

__all__ = [
    "MAX_DECODER_MEMORY",
    "MAX_MANIFEST_BYTES",
    "MAX_MEMBER_BYTES",
    "MAX_SAMPLE_BYTES",
    "decompress_bundle",
    "load_manifest",
    "load_sample",
    "smoke_test",
    "unpack_bundle",
]

# No member may exceed this; a model for an edge gateway is far smaller, and a
# bound keeps a broken build from filling the disk.
MAX_MEMBER_BYTES = 2 * 1024**3
# The manifest is read into memory and parsed as JSON.
MAX_MANIFEST_BYTES = 1024 * 1024
# Decompressed size of all arrays in sample.npz; guards against a zip bomb.
MAX_SAMPLE_BYTES = 256 * 1024 * 1024

# Memory the xz decoder may use: the controller compresses with an 8 MiB
# dictionary (about 9 MiB to decode); a stream wanting more is refused.
MAX_DECODER_MEMORY = 64 * 1024 * 1024

_CHUNK = 1024 * 1024
# Leading bytes of compressed containers, to refuse one nobody signed.
_MAGIC = {"xz": b"\xfd7zXZ\x00", "zstd": b"\x28\xb5\x2f\xfd", "gzip": b"\x1f\x8b", "bzip2": b"BZh"}
_MODEL_FILES = frozenset(MODEL_NAMES.values())
_ALLOWED = frozenset({MANIFEST_NAME, SAMPLE_NAME}) | _MODEL_FILES


def _member_problem(member: tarfile.TarInfo) -> str | None:
    """Why a tar member is refused, or None when it is an acceptable member."""
    name = member.name
    # Only plain files: isreg() would also admit GNU sparse and contiguous
    # members, whose on-disk size is not their header size.
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        kind = (
            "a symlink"
            if member.issym()
            else "a hard link"
            if member.islnk()
            else "a directory"
            if member.isdir()
            else "not a regular file"
        )
        return f"member {name!r} is {kind}"
    if name.startswith("/") or "\\" in name or ".." in name.split("/"):
        return f"member {name!r} has an unsafe path"
    if name not in _ALLOWED:
        return f"unexpected member {name!r}"
    if member.size > MAX_MEMBER_BYTES:
        return f"member {name!r} is {member.size} bytes, more than {MAX_MEMBER_BYTES}"
    return None


def _read_members(tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    members: dict[str, tarfile.TarInfo] = {}
    # Iterate instead of getmembers(): we stop at the first bad header rather
    # than indexing an archive of a million entries.
    for member in tar:
        problem = _member_problem(member)
        if problem is not None:
            raise BundleFormatError(f"bundle refused: {problem}")
        if member.name in members:
            raise BundleFormatError(f"bundle refused: duplicate member {member.name!r}")
        members[member.name] = member
    for required in (MANIFEST_NAME, SAMPLE_NAME):
        if required not in members:
            raise BundleFormatError(f"bundle refused: missing member {required!r}")
    models = sorted(_MODEL_FILES & members.keys())
    if not models:
        raise BundleFormatError(
            f"bundle refused: no model file (one of {', '.join(sorted(_MODEL_FILES))})"
        )
    if len(models) > 1:
        raise BundleFormatError(f"bundle refused: more than one model file ({', '.join(models)})")
    return members


def _open_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    stream = tar.extractfile(member)
    if stream is None:  # pragma: no cover - only for non-regular members, refused earlier
        raise BundleFormatError(f"bundle refused: cannot read member {member.name!r}")
    return stream


def _extract(
    tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path, digest: Any | None = None
) -> None:
    """Copy one member to ``dest/member.name``, fsynced, refusing to follow links."""
    target = dest / member.name
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(target, flags, 0o644)
    written = 0
    with os.fdopen(fd, "wb") as out, _open_member(tar, member) as src:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            if written > member.size:  # pragma: no cover - tarfile bounds reads itself
                raise BundleFormatError(f"bundle refused: member {member.name!r} overruns")
            if digest is not None:
                digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if written != member.size:
        raise BundleFormatError(
            f"bundle refused: member {member.name!r} is truncated "
            f"({written} of {member.size} bytes)"
        )


def _compressed_magic(path: Path) -> str | None:
    with path.open("rb") as fh:
        head = fh.read(6)
    for codec, magic in _MAGIC.items():
        if head.startswith(magic):
            return codec
    return None


def decompress_bundle(bundle_path: Path, out_path: Path, compression: BundleCompression) -> None:
    """Stream-decompress a signed compressed bundle into ``out_path``, bounded by its signed size.

    Never holds more than one chunk in memory and never writes more than
    ``compression.decompressed_length`` bytes: output beyond it (a
    decompression bomb, or a build that signed the wrong size) is refused the
    moment it appears. The xz decoder's memory is capped too
    (:data:`MAX_DECODER_MEMORY`), since the dictionary size is chosen by
    whoever compressed the bytes.

    Raises:
        BundleFormatError: unknown codec, corrupt or truncated stream, data
            after the stream, more or fewer bytes than signed, or a stream
            that needs more decoder memory than allowed.
        OSError: writing ``out_path`` failed.
    """
    if compression.codec != "lzma":
        raise BundleFormatError(f"bundle refused: unknown compression {compression.codec!r}")
    bound = compression.decompressed_length
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=MAX_DECODER_MEMORY)
    written = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        with bundle_path.open("rb") as src, os.fdopen(os.open(out_path, flags, 0o600), "wb") as out:
            pending = b""
            while not decoder.eof:
                if not pending and decoder.needs_input:
                    pending = src.read(_CHUNK)
                    if not pending:
                        raise BundleFormatError(
                            "bundle refused: the compressed stream is truncated"
                        )
                # Ask for at most one byte past the bound: enough to see an overrun.
                chunk = decoder.decompress(pending, max_length=min(_CHUNK, bound - written + 1))
                pending = b""
                written += len(chunk)
                if written > bound:
                    raise BundleFormatError(
                        f"bundle refused: it decompresses beyond its signed size of {bound} bytes"
                    )
                out.write(chunk)
            if decoder.unused_data or src.read(1):
                raise BundleFormatError("bundle refused: data after the compressed stream")
            out.flush()
            os.fsync(out.fileno())
    except lzma.LZMAError as exc:
        raise BundleFormatError(f"bundle refused: corrupt compressed stream: {exc}") from exc
    if written != bound:
        raise BundleFormatError(
            f"bundle refused: it decompresses to {written} bytes, the signed size is {bound}"
        )


def unpack_bundle(
    bundle_path: Path, dest: Path, *, compression: BundleCompression | None = None
) -> BundleManifest:
    """Extract a bundle into ``dest`` and check the model against the manifest.

    ``dest`` should be a fresh staging directory (see
    :meth:`edgefleet.agent.slots.SlotStore.staging`); it is created if
    missing, and existing files with member names are never overwritten.
    On failure ``dest`` may hold partial files: the caller discards it.

    Args:
        bundle_path: the TUF-verified bundle file.
        dest: where the three members go.
        compression: the signed compression of the bundle (the TUF target's
            ``custom.compression``), ``None`` for a plain tar. A compressed
            bundle is first decompressed next to ``bundle_path`` (bounded by
            the signed length, see :func:`decompress_bundle`) and that
            temporary tar is removed afterwards.

    Returns:
        The parsed manifest.

    Raises:
        BundleFormatError: the file is not an uncompressed tar (or, with
            ``compression``, does not decompress to exactly the signed size),
            is compressed although nothing signed that, has members other
            than exactly the three expected regular files, a member is too
            large or truncated, the manifest is invalid or names another
            model file, or the model's SHA-256 differs from the manifest's.
        OSError: writing to ``dest`` failed (disk full, permissions).
    """
    if compression is None:
        codec = _compressed_magic(bundle_path) if bundle_path.is_file() else None
        if codec is not None:
            raise BundleFormatError(
                f"bundle refused: not a readable uncompressed tar: it is {codec}-compressed "
                "and its signed metadata has no decompressed size to bound it"
            )
        return _unpack_tar(bundle_path, dest)
    tar_path = bundle_path.with_name(bundle_path.name + ".tar")
    tar_path.unlink(missing_ok=True)
    try:
        decompress_bundle(bundle_path, tar_path, compression)
        return _unpack_tar(tar_path, dest)
    finally:
        tar_path.unlink(missing_ok=True)


def _unpack_tar(bundle_path: Path, dest: Path) -> BundleManifest:
    dest.mkdir(parents=True, exist_ok=True)
    try:
        # "r:" means uncompressed only: a gzip/xz/bz2 archive is refused here
        # rather than decompressed without a bound.
        with tarfile.open(bundle_path, mode="r:") as tar:
            members = _read_members(tar)
            manifest_member = members[MANIFEST_NAME]
            if manifest_member.size > MAX_MANIFEST_BYTES:
                raise BundleFormatError(
                    f"bundle refused: {MANIFEST_NAME} is larger than {MAX_MANIFEST_BYTES} bytes"
                )
            with _open_member(tar, manifest_member) as stream:
                raw_manifest = stream.read()
            try:
                manifest = BundleManifest.decode(raw_manifest)
            except MessageError as exc:
                raise BundleFormatError(f"bundle refused: {exc}") from exc
            if manifest.model_file not in members:
                raise BundleFormatError(
                    f"bundle refused: manifest names {manifest.model_file!r} "
                    "but the archive holds another model file"
                )
            digest = hashlib.sha256()
            _extract(tar, manifest_member, dest)
            _extract(tar, members[manifest.model_file], dest, digest)
            _extract(tar, members[SAMPLE_NAME], dest)
    except tarfile.TarError as exc:
        raise BundleFormatError(f"bundle refused: not a readable uncompressed tar: {exc}") from exc
    except EOFError as exc:
        raise BundleFormatError(f"bundle refused: archive is truncated: {exc}") from exc
    fsync_dir(dest)
    if digest.hexdigest() != manifest.model_sha256:
        raise BundleFormatError(
            f"bundle refused: {manifest.model_file} has SHA-256 {digest.hexdigest()}, "
            f"the manifest says {manifest.model_sha256}"
        )
    return manifest


def load_manifest(slot_dir: Path) -> BundleManifest:
    """Read the manifest of an unpacked bundle (for example the active slot at startup).

    Raises:
        BundleFormatError: the manifest is missing, too large or invalid.
    """
    path = slot_dir / MANIFEST_NAME
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise BundleFormatError(f"cannot read {path}: {exc}") from exc
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleFormatError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        return BundleManifest.decode(raw)
    except MessageError as exc:
        raise BundleFormatError(f"{path}: {exc}") from exc


def load_sample(slot_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Read ``sample.npz``: the smoke-test inputs and the expected outputs.

    Arrays are named ``in.<input name>`` and ``out.<output name>``. Pickled
    (object) arrays are refused, since unpickling runs code.

    Returns:
        ``(inputs, expected)``, each keyed by tensor name.

    Raises:
        BundleFormatError: the file is missing, not an npz archive, holds
            object arrays or names outside the two prefixes, decompresses to
            more than :data:`MAX_SAMPLE_BYTES`, or has no inputs or no outputs.
    """
    path = slot_dir / SAMPLE_NAME
    try:
        with zipfile.ZipFile(path) as zf:
            total = sum(info.file_size for info in zf.infolist())
        if total <= MAX_SAMPLE_BYTES:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise BundleFormatError(f"{SAMPLE_NAME} is unreadable: {exc}") from exc
    if total > MAX_SAMPLE_BYTES:
        raise BundleFormatError(
            f"{SAMPLE_NAME} expands to {total} bytes, more than {MAX_SAMPLE_BYTES}"
        )
    inputs: dict[str, np.ndarray] = {}
    expected: dict[str, np.ndarray] = {}
    for key, array in arrays.items():
        if key.startswith(SAMPLE_INPUT_PREFIX):
            inputs[key[len(SAMPLE_INPUT_PREFIX) :]] = array
        elif key.startswith(SAMPLE_OUTPUT_PREFIX):
            expected[key[len(SAMPLE_OUTPUT_PREFIX) :]] = array
        else:
            raise BundleFormatError(
                f"{SAMPLE_NAME} has array {key!r}; names must start with "
                f"{SAMPLE_INPUT_PREFIX!r} or {SAMPLE_OUTPUT_PREFIX!r}"
            )
    if not inputs:
        raise BundleFormatError(f"{SAMPLE_NAME} has no {SAMPLE_INPUT_PREFIX}* arrays")
    if not expected:
        raise BundleFormatError(f"{SAMPLE_NAME} has no {SAMPLE_OUTPUT_PREFIX}* arrays")
    return inputs, expected


def _io_mismatch(model: LoadedModel, manifest: BundleManifest) -> str | None:
    for what, got, declared in (
        ("inputs", model.inputs, manifest.inputs),
        ("outputs", model.outputs, manifest.outputs),
    ):
        have = sorted((s.name, s.dtype) for s in got)
        want = sorted((s.name, s.dtype) for s in declared)
        if have != want:
            return f"model {what} {have} differ from the manifest's {want}"
    return None


def _compare(name: str, got: np.ndarray, want: np.ndarray, atol: float, rtol: float) -> None:
    if got.shape != want.shape:
        raise SmokeTestError(
            f"smoke test failed: output {name!r} has shape {list(got.shape)}, "
            f"expected {list(want.shape)}"
        )
    if got.dtype.kind not in "biuf" or want.dtype.kind not in "biuf":
        raise SmokeTestError(
            f"smoke test failed: output {name!r} is not numeric "
            f"({got.dtype.name} vs expected {want.dtype.name})"
        )
    g = got.astype(np.float64)
    w = want.astype(np.float64)
    if not np.isfinite(w).all():
        raise SmokeTestError(f"smoke test failed: expected {name!r} holds NaN or infinity")
    if not np.isfinite(g).all():
        raise SmokeTestError(f"smoke test failed: output {name!r} holds NaN or infinity")
    if g.size and not np.allclose(g, w, atol=atol, rtol=rtol):
        diff = float(np.max(np.abs(g - w)))
        raise SmokeTestError(
            f"smoke test failed: output {name!r} differs from the expected values by up to "
            f"{diff:.6g} (atol={atol:g}, rtol={rtol:g})"
        )


def smoke_test(model: LoadedModel, slot_dir: Path, manifest: BundleManifest) -> float:
    """Run the bundle's sample through ``model`` and compare with the recorded outputs.

    Also checks that the model's input and output names and dtypes are the
    ones the manifest (and so the signed TUF metadata) advertises, since
    clients are built against those.

    Returns:
        Seconds the sample inference took, a first latency data point for
        this device.

    Raises:
        BundleFormatError: ``sample.npz`` is unusable (see :func:`load_sample`).
        SmokeTestError: the io differs from the manifest, the run raised, or
            an expected output is missing, has another shape, holds NaN or
            infinity, or is not within ``manifest.smoke_atol``/``smoke_rtol``.
    """
    problem = _io_mismatch(model, manifest)
    if problem is not None:
        raise SmokeTestError(f"smoke test failed: {problem}")
    inputs, expected = load_sample(slot_dir)
    start = time.perf_counter()
    try:
        outputs = model.run(inputs)
    except Exception as exc:  # any failure here means "do not activate"
        raise SmokeTestError(f"smoke test failed: running the sample raised: {exc}") from exc
    elapsed = time.perf_counter() - start
    atol, rtol = manifest.smoke_atol, manifest.smoke_rtol
    if not (math.isfinite(atol) and math.isfinite(rtol)):
        raise SmokeTestError("smoke test failed: manifest tolerances are not finite")
    for name in sorted(expected):
        if name not in outputs:
            raise SmokeTestError(f"smoke test failed: the model has no output {name!r}")
        _compare(name, np.asarray(outputs[name]), expected[name], atol, rtol)
    return elapsed
