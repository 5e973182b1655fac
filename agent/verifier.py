"""TUF verification in a short-lived child process, so the serving agent never loads TUF.

python-tuf with securesystemslib, urllib3 and cryptography adds about 15 MB
to a process's RSS, and once imported it stays: CPython cannot unload
extension modules. A gateway installs rarely and serves all the time, so each
install runs ``Updater`` in a child (``python -m edgefleet.agent.verifier``)
that exits when the install is done (issue 12; BENCHMARKS.md, "Agent
footprint"). The child asks the agent for every repository file it needs over
its stdin/stdout; the agent fetches it over MQTT (:class:`MqttFetcher`, with
its length bounds, resume and progress) and streams the bytes back. Errors
come back already translated to our own (:func:`translate_tuf_error`), one
per attack, exactly as an in-process ``Updater`` would give them.

Framing, both ways: a 4-byte big-endian length, then one kind byte and the
payload: ``J`` a JSON object, ``B`` a chunk of file bytes.

- agent -> child: ``{"op": "info", "target": path}`` (refresh, then look the
  target up), ``{"op": "download", "filepath": path}`` (download the target
  looked up last), and answers to fetches: ``B`` chunks then ``{"end": true}``,
  or ``{"fetch_error": {"code", "message", "status"}}``;
- child -> agent: ``{"fetch": url}``, ``{"info": {...} | null}``,
  ``{"done": true}``, ``{"error": {"code", "message"}, "enospc": bool}``.

The child exits when its stdin closes. An agent that stops waiting (the child
died, or went silent for ``idle_timeout_s``) kills it and fails the install
with :class:`AgentError`; the previous model keeps serving.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from edgefleet.protocols.errors import (
    AgentError,
    ExpiredMetadataError,
    FileNotFoundOnServerError,
    MetadataRollbackError,
    OversizedTransferError,
    TamperedBundleError,
    TransferError,
    UntrustedMetadataError,
)
from edgefleet.shared.durable import is_disk_full

if TYPE_CHECKING:
    from edgefleet.agent.fetcher import MqttFetcher

__all__ = ["URL_PREFIX", "VerifiedTarget", "Verifier", "translate_tuf_error"]

log = logging.getLogger(__name__)

# Same as edgefleet.agent.fetcher.URL_PREFIX (the child does not import the fetcher).
URL_PREFIX = "mqtt://repository/"
_HEADER = struct.Struct(">I")
_MAX_FRAME = 64 * 1024 * 1024


def translate_tuf_error(exc: BaseException, *, target: bool) -> AgentError:
    """Map python-tuf's exceptions to ours, one error per attack.

    ``target`` says whether the failure happened while downloading the
    bundle itself (a hash mismatch there is a tampered bundle) or metadata
    (a hash mismatch there is mix-and-match or tampered metadata).
    """
    from tuf.api import exceptions as tuf_errors

    cause: BaseException | None = exc
    while cause is not None:  # our own errors surface through DownloadError.__cause__
        if isinstance(cause, AgentError):
            return cause
        cause = cause.__cause__
    if isinstance(exc, tuf_errors.ExpiredMetadataError):
        return ExpiredMetadataError(f"repository metadata has expired: {exc}")
    if isinstance(exc, tuf_errors.BadVersionNumberError):
        return MetadataRollbackError(f"repository metadata went backwards: {exc}")
    if isinstance(exc, tuf_errors.LengthOrHashMismatchError):
        if target:
            return TamperedBundleError(f"bundle does not match its signed hash/length: {exc}")
        return UntrustedMetadataError(f"metadata does not match what was signed: {exc}")
    if isinstance(exc, tuf_errors.DownloadLengthMismatchError):
        return OversizedTransferError(f"more data than TUF promised: {exc}")
    if isinstance(exc, tuf_errors.RepositoryError):
        return UntrustedMetadataError(f"repository metadata refused: {exc}")
    if isinstance(exc, tuf_errors.DownloadError):
        return TransferError(f"download failed: {exc}")
    return AgentError(f"{type(exc).__name__}: {exc}")


def _error_classes(base: type[AgentError] = AgentError) -> dict[str, type[AgentError]]:
    found = {base.code: base}
    for sub in base.__subclasses__():
        found.update(_error_classes(sub))
    return found


def rebuild_error(code: str, message: str) -> AgentError:
    """Our error class for ``code`` (codes are unique per class), with ``message``."""
    return _error_classes().get(code, AgentError)(message)


# --------------------------------------------------------------------------- framing
def _write(out: IO[bytes], kind: bytes, payload: bytes) -> None:
    data = memoryview(_HEADER.pack(len(payload) + 1) + kind + payload)
    while data:  # an unbuffered pipe may take part of it
        written = out.write(data)
        if not written:
            raise EOFError("the other side stopped reading")
        data = data[written:]
    out.flush()


def _write_json(out: IO[bytes], doc: dict[str, Any]) -> None:
    _write(out, b"J", json.dumps(doc).encode())


def _read_exact(source: IO[bytes], n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = source.read(n - len(data))
        if not more:
            raise EOFError("the other side closed the pipe")
        data += more
    return data


def _read(source: IO[bytes]) -> tuple[bytes, bytes]:
    (length,) = _HEADER.unpack(_read_exact(source, _HEADER.size))
    if not 1 <= length <= _MAX_FRAME:
        raise EOFError(f"bad frame length {length}")
    frame = _read_exact(source, length)
    return frame[:1], frame[1:]


# --------------------------------------------------------------------------- agent side
@dataclass(frozen=True)
class VerifiedTarget:
    """A target as the signed targets metadata describes it."""

    path: str
    length: int
    hashes: dict[str, str]
    custom: Any
    prefixed_path: str


class Verifier:
    """The agent's handle on one verifier child; use as a context manager (one install).

    Args:
        fetcher: fetches the files the child asks for.
        metadata_dir: the agent's trusted TUF metadata (the child updates it).
        target_dir: where downloads go.
        idle_timeout_s: how long the child may go without a message.
    """

    def __init__(
        self,
        fetcher: MqttFetcher,
        metadata_dir: Path,
        target_dir: Path,
        *,
        idle_timeout_s: float = 300.0,
    ) -> None:
        self._fetcher = fetcher
        self._idle_timeout_s = idle_timeout_s
        self._child = subprocess.Popen(
            [sys.executable, "-m", "edgefleet.agent.verifier", str(metadata_dir), str(target_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # Unbuffered: select() on the pipe must see every byte not read yet.
            bufsize=0,
            close_fds=True,
        )

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the child (it exits when its stdin closes); kill it if it does not."""
        child = self._child
        try:
            if child.stdin is not None:
                child.stdin.close()
        except OSError:
            pass
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(10)
        if child.stdout is not None:
            child.stdout.close()

    def target_info(self, target: str) -> VerifiedTarget | None:
        """Refresh the metadata and look ``target`` up.

        Raises:
            VerificationError, TransferError, AgentError: as an in-process
                ``Updater`` would, translated (:func:`translate_tuf_error`).
        """
        answer = self._call({"op": "info", "target": target})
        self._raise(answer)
        info = answer.get("info")
        if info is None:
            return None
        return VerifiedTarget(
            path=str(info["path"]),
            length=int(info["length"]),
            hashes=dict(info["hashes"]),
            custom=info["custom"],
            prefixed_path=str(info["prefixed_path"]),
        )

    def download(self, filepath: Path) -> None:
        """Download the target looked up last to ``filepath``, verified.

        Raises:
            OSError: the disk filled up (``ENOSPC``), from the child or from here.
            VerificationError, TransferError, AgentError: translated, as above.
        """
        self._raise(self._call({"op": "download", "filepath": str(filepath)}))

    @staticmethod
    def _raise(answer: dict[str, Any]) -> None:
        error = answer.get("error")
        if error is None:
            return
        if answer.get("enospc"):
            raise OSError(errno.ENOSPC, str(error.get("message", "no space left on device")))
        raise rebuild_error(str(error.get("code", "")), str(error.get("message", "")))

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        child = self._child
        assert child.stdin is not None and child.stdout is not None
        try:
            _write_json(child.stdin, request)
            while True:
                kind, payload = self._next(child.stdout)
                doc = json.loads(payload) if kind == b"J" else None
                if not isinstance(doc, dict):
                    raise ValueError("the verifier sent something that is not a message")  # noqa: TRY004
                if "fetch" in doc:
                    self._serve(child.stdin, str(doc["fetch"]))
                    continue
                return doc
        except (EOFError, OSError, ValueError) as exc:
            child.kill()
            code = child.wait(10)
            raise AgentError(f"the TUF verifier process failed (exit {code}): {exc}") from exc

    def _next(self, source: IO[bytes]) -> tuple[bytes, bytes]:
        ready, _, _ = select.select([source], [], [], self._idle_timeout_s)
        if not ready:
            raise EOFError(f"the verifier was silent for {self._idle_timeout_s:g}s")
        return _read(source)

    def _serve(self, out: IO[bytes], url: str) -> None:
        """Fetch ``url`` for the child and stream it back (or the error)."""
        try:
            chunks = self._fetcher._fetch(url)
            for chunk in chunks:
                _write(out, b"B", chunk)
        except (BrokenPipeError, EOFError):
            raise
        except Exception as exc:  # noqa: BLE001 - any failure is the child's fetch error
            _write_json(
                out,
                {
                    "fetch_error": {
                        "code": getattr(exc, "code", "agent_error"),
                        "message": str(exc),
                        "status": 404 if isinstance(exc, FileNotFoundOnServerError) else None,
                    }
                },
            )
            return
        _write_json(out, {"end": True})


# --------------------------------------------------------------------------- child side
class _PipeFetcher:
    """The child's fetcher: asks the agent over stdout, reads the answer from stdin."""

    def __init__(self, source: IO[bytes], out: IO[bytes]) -> None:
        self._source = source
        self._out = out
        self._open = False  # an answer stream not read to its end

    def drain(self) -> None:
        """Read the rest of an answer tuf stopped reading (so the next one lines up)."""
        while self._open:
            kind, _payload = _read(self._source)
            if kind == b"J":
                self._open = False

    def fetch_stream(self, url: str) -> Iterator[bytes]:
        self.drain()
        _write_json(self._out, {"fetch": url})
        self._open = True
        kind, payload = _read(self._source)
        if kind == b"J":
            self._open = False
            return self._refuse(json.loads(payload))
        return self._rest(payload)

    def _rest(self, first: bytes) -> Iterator[bytes]:
        yield first
        while self._open:
            kind, payload = _read(self._source)
            if kind == b"B":
                yield payload
                continue
            self._open = False
            self._refuse(json.loads(payload))

    @staticmethod
    def _refuse(doc: dict[str, Any]) -> Iterator[bytes]:
        error = doc.get("fetch_error")
        if error is None:
            return iter(())  # {"end": true}: an empty file
        if error.get("status") is not None:
            from tuf.api.exceptions import DownloadHTTPError

            raise DownloadHTTPError(str(error.get("message")), int(error["status"]))
        raise rebuild_error(str(error.get("code")), str(error.get("message")))


def _child_main(metadata_dir: str, target_dir: str) -> int:
    from tuf.api import exceptions as tuf_errors
    from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

    source, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write to the protocol pipe
    pipe = _PipeFetcher(source, out)

    class _Fetcher(FetcherInterface):
        def _fetch(self, url: str) -> Iterator[bytes]:
            return pipe.fetch_stream(url)

    updater = Updater(
        metadata_dir=metadata_dir,
        metadata_base_url=URL_PREFIX + "metadata/",
        target_base_url=URL_PREFIX + "targets/",
        target_dir=target_dir,
        fetcher=_Fetcher(),
        config=UpdaterConfig(),
        bootstrap=None,
    )
    info: Any = None
    while True:
        try:
            _kind, payload = _read(source)
        except EOFError:
            return 0
        request = json.loads(payload)
        answer: dict[str, Any]
        target = request.get("op") == "download"
        try:
            if request.get("op") == "info":
                updater.refresh()
                info = updater.get_targetinfo(str(request["target"]))
                answer = {"info": None}
                if info is not None:
                    answer = {
                        "info": {
                            "path": info.path,
                            "length": info.length,
                            "hashes": info.hashes,
                            "custom": info.custom,
                            "prefixed_path": info.get_prefixed_paths()[0],
                        }
                    }
            elif target and info is not None:
                updater.download_target(info, filepath=str(request["filepath"]))
                answer = {"done": True}
            else:
                answer = {"error": {"code": AgentError.code, "message": f"bad request {request}"}}
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError, OSError) as exc:
            error = translate_tuf_error(exc, target=target)
            answer = {
                "error": {"code": error.code, "message": str(error)},
                "enospc": target and is_disk_full(exc),
            }
        except Exception as exc:  # a bug: report it as the install's failure
            log.exception("verifier failed")
            answer = {"error": {"code": AgentError.code, "message": f"{type(exc).__name__}: {exc}"}}
        pipe.drain()
        _write_json(out, answer)



if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    os.environ.pop("NOTIFY_SOCKET", None)  # only the agent itself talks to systemd
    sys.exit(_child_main(sys.argv[1], sys.argv[2]))
