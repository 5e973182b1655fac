"""A real controller (real broker, real registry) with its management API on a free port.

``api`` gives an :class:`ApiClient` speaking real HTTP to uvicorn, tokens of
every role, and the :class:`~tests.e2e.harness.Harness` behind it (SQLite,
and PostgreSQL when ``EDGEFLEET_TEST_DATABASE_URL`` is set).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgefleet.controller.api.server import ApiServer, start_api
from edgefleet.controller.config import ApiSettings
from edgefleet.controller.registry.tokens import TokenStore
from edgefleet.shared.link import BrokerSettings
from tests.e2e.harness import Harness


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str]


class ApiClient:
    """urllib against the running server: no test client, no mocks."""

    def __init__(self, url: str) -> None:
        self.url = url

    def call(
        self,
        method: str,
        path: str,
        token: str | None = None,
        body: Any = None,
        *,
        raw: bytes | None = None,
        context: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        headers = {"Accept": "application/json", **(headers or {})}
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = "application/json"
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30, context=context) as response:
                payload = response.read()
                status = response.status
                reply_headers = dict(response.headers)
        except urllib.error.HTTPError as exc:
            payload = exc.read()
            status = exc.code
            reply_headers = dict(exc.headers)
        content_type = reply_headers.get("content-type", "")
        parsed: Any = json.loads(payload) if "json" in content_type else payload.decode()
        return Reply(status, parsed, reply_headers)

    def get(self, path: str, token: str | None = None) -> Reply:
        return self.call("GET", path, token)

    def post(self, path: str, token: str | None = None, body: Any = None) -> Reply:
        return self.call("POST", path, token, body)


@dataclass
class ApiFixture:
    harness: Harness
    server: ApiServer
    client: ApiClient
    tokens: TokenStore
    viewer: str
    operator: str
    admin: str
    ca_dir: Path


@pytest.fixture
def api(tmp_path: Path, embedded_broker: BrokerSettings, database_url: str) -> Iterator[ApiFixture]:
    harness = Harness(tmp_path, embedded_broker, database_url)
    ca_dir = tmp_path / "ca"
    server = start_api(harness.service, ApiSettings(address="127.0.0.1:0"), ca_dir=ca_dir)
    tokens = TokenStore(harness.registry.database)
    try:
        yield ApiFixture(
            harness=harness,
            server=server,
            client=ApiClient(server.url),
            tokens=tokens,
            viewer=tokens.create("viewer-test", "viewer").token,
            operator=tokens.create("operator-test", "operator").token,
            admin=tokens.create("admin-test", "admin").token,
            ca_dir=ca_dir,
        )
    finally:
        server.stop()
        harness.close()
