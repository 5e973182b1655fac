"""A small typed client of the management API, for the CLI and scripts.

The CLI's mutating commands (``deploy``, ``rollout create|start|pause|resume|abort``,
``device tag``, ``device revoke``) go through the running controller when an
API URL is given, so an operator's machine needs a token, not database or
broker credentials, and what the command prints is what the controller did.

Standard library only (``urllib``): the client adds no dependency and costs
``edgefleet --help`` nothing. Every failure is one :class:`ApiClientError`
that names the URL: :class:`ApiUnreachableError` when no answer came
(connection refused, DNS, TLS, timeout), :class:`ApiRequestError` when the
controller answered with an error status (its JSON ``error.code`` and
``message`` are kept, so ``--json`` can pass them on).
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgefleet.protocols.errors import ConfigError, EdgefleetError

__all__ = [
    "TOKEN_ENV",
    "ApiClient",
    "ApiClientError",
    "ApiRequestError",
    "ApiUnreachableError",
    "read_token",
]

TOKEN_ENV = "EDGEFLEET_TOKEN"  # noqa: S105 (a variable name, not a secret)
"""The environment variable that holds the API token (kept off the command line)."""

_MAX_REPLY_BYTES = 64 * 1024 * 1024
"""A reply larger than this is refused rather than buffered (a devices page is ~1 KiB/device)."""


class ApiClientError(EdgefleetError):
    """The management API could not do what was asked; the message names the URL."""

    code = "api"


class ApiUnreachableError(ApiClientError):
    """No answer from the API: connection refused, unknown host, TLS failure, timeout."""

    code = "api_unreachable"


class ApiRequestError(ApiClientError):
    """The API answered with an error status; ``status``, ``api_code`` and ``url`` say which."""

    code = "api_request"

    def __init__(self, message: str, *, status: int, api_code: str, url: str) -> None:
        super().__init__(message)
        self.status = status
        self.api_code = api_code
        self.url = url


def read_token(token_file: Path | None, environ: Mapping[str, str] | None = None) -> str:
    """The API token: from ``token_file`` if given, else ``$EDGEFLEET_TOKEN``.

    A file keeps the token out of ``ps`` and shell history; only its first
    line counts, whitespace stripped.

    Raises:
        ConfigError: neither is set, the file is unreadable, or it is empty.
    """
    env = os.environ if environ is None else environ
    if token_file is not None:
        try:
            text = token_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the API token file {token_file}: {exc}") from exc
        lines = text.strip().splitlines()
        token = lines[0].strip() if lines else ""
        if not token:
            raise ConfigError(f"the API token file {token_file} is empty")
        return token
    token = env.get(TOKEN_ENV, "").strip()
    if not token:
        raise ConfigError(
            f"the API needs a token: set {TOKEN_ENV} or give --token-file "
            "(create one with `edgefleet token create --role operator`)"
        )
    return token


class ApiClient:
    """Bearer-token JSON calls to ``base_url`` (``http(s)://host:port``)."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout_s: float = 30.0,
        ca_file: Path | None = None,
    ) -> None:
        parsed = urllib.parse.urlsplit(base_url.strip())
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(f"API URL must be http(s)://host:port, got {base_url!r}")
        self.base_url = base_url.strip().rstrip("/")
        self._token = token
        self._timeout_s = timeout_s
        self._context: ssl.SSLContext | None = None
        if parsed.scheme == "https":
            self._context = ssl.create_default_context(
                cafile=None if ca_file is None else str(ca_file)
            )

    # ------------------------------------------------------------------ transport
    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: Mapping[str, str | int | None] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """One call; the decoded JSON reply (``timeout_s`` over the client's own).

        Raises:
            ApiUnreachableError: no answer (the message names the URL).
            ApiRequestError: an error status, with the API's code and message.
        """
        url = self.base_url + path
        if query:
            pairs = {k: str(v) for k, v in query.items() if v is not None}
            if pairs:
                url += "?" + urllib.parse.urlencode(pairs)
        headers = {"Accept": "application/json", "Authorization": f"Bearer {self._token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        # The scheme was checked to be http(s) in __init__.
        req = urllib.request.Request(url, data=data, headers=headers, method=method)  # noqa: S310
        try:
            with urllib.request.urlopen(  # noqa: S310 (http/https only)
                req, timeout=timeout_s or self._timeout_s, context=self._context
            ) as r:
                payload = r.read(_MAX_REPLY_BYTES + 1)
        except urllib.error.HTTPError as exc:
            raise self._http_error(method, url, exc) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiUnreachableError(
                f"the controller API at {self.base_url} did not answer {method} {path}: "
                f"{reason} (is `edgefleet serve` running there?)"
            ) from None
        if len(payload) > _MAX_REPLY_BYTES:
            raise ApiClientError(f"{method} {url}: reply larger than {_MAX_REPLY_BYTES} bytes")
        try:
            return json.loads(payload) if payload else None
        except ValueError:
            raise ApiClientError(f"{method} {url}: the reply is not JSON") from None

    @staticmethod
    def _http_error(method: str, url: str, exc: urllib.error.HTTPError) -> ApiRequestError:
        api_code, message = f"http_{exc.code}", exc.reason or ""
        try:
            error = json.loads(exc.read(64 * 1024)).get("error", {})
            api_code = str(error.get("code") or api_code)
            message = str(error.get("message") or message)
        except (ValueError, AttributeError, OSError):
            pass
        hint = {
            401: " (check EDGEFLEET_TOKEN / --token-file)",
            403: " (the token's role is too small)",
        }.get(exc.code, "")
        return ApiRequestError(
            f"{method} {url} -> {exc.code} {api_code}: {message}{hint}",
            status=exc.code,
            api_code=api_code,
            url=url,
        )

    def get(self, path: str, **query: str | int | None) -> Any:
        return self.request("GET", path, query=query)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, {} if body is None else body)

    # ------------------------------------------------------------------ operations
    def deploy(
        self,
        model: str,
        version: str,
        *,
        devices: list[str] | None = None,
        tags: list[str] | None = None,
        all_devices: bool = False,
        wait_published_s: float = 5.0,
    ) -> dict[str, Any]:
        """``POST /deployments``: the deployment and, per device, whether it was published."""
        body = {
            "model": model,
            "version": version,
            "devices": devices or [],
            "tags": tags or [],
            "all": all_devices,
            "wait_published_s": wait_published_s,
        }
        # The controller answers after waiting up to wait_published_s for its broker.
        reply: dict[str, Any] = self.request(
            "POST", "/api/v1/deployments", body, timeout_s=self._timeout_s + wait_published_s
        )
        return reply

    def devices(self, **filters: str | int | None) -> list[dict[str, Any]]:
        """Every device matching ``filters`` (tag, profile, status, version), all pages."""
        out: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            page = self.get("/api/v1/devices", after=after, **filters)
            out.extend(page["devices"])
            after = page.get("next")
            if not after:
                return out

    def device(self, device_id: str) -> dict[str, Any]:
        reply: dict[str, Any] = self.get(f"/api/v1/devices/{_segment(device_id)}", events=0)
        return reply

    def update_tags(self, device_id: str, add: list[str], remove: list[str]) -> dict[str, Any]:
        """``POST /devices/{id}/tags``: the device's tags after the change."""
        reply: dict[str, Any] = self.post(
            f"/api/v1/devices/{_segment(device_id)}/tags", {"add": add, "remove": remove}
        )
        return reply

    def revoke_device(self, device_id: str) -> dict[str, Any]:
        reply: dict[str, Any] = self.post(f"/api/v1/devices/{_segment(device_id)}/revoke")
        return reply

    def create_rollout(self, body: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = self.post("/api/v1/rollouts", body)
        return reply

    def steer_rollout(self, rollout_id: str, verb: str, reason: str = "") -> dict[str, Any]:
        """``start``, ``pause``, ``resume`` or ``abort`` a rollout; the rollout after."""
        if verb not in ("start", "pause", "resume", "abort"):
            raise ValueError(f"unknown rollout verb {verb!r}")
        body = None if verb == "start" else {"reason": reason}
        reply: dict[str, Any] = self.post(f"/api/v1/rollouts/{_segment(rollout_id)}/{verb}", body)
        return reply


def _segment(value: str) -> str:
    """``value`` as one URL path segment (a device id with ``/`` cannot escape its route)."""
    return urllib.parse.quote(value, safe="")
