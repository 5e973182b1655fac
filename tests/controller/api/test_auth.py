"""The auth matrix over real HTTP: no route answers without a valid token of the right role."""

from __future__ import annotations

import re

import pytest

from tests.controller.api.conftest import ApiFixture, Reply

# Every route of the API, with the least role it needs. The OpenAPI document
# must list exactly these (test_openapi_lists_every_route), so a new route
# cannot be added without joining this matrix.
ROUTES: list[tuple[str, str, str]] = [
    ("GET", "/api/v1/fleet", "viewer"),
    ("GET", "/api/v1/devices", "viewer"),
    ("GET", "/api/v1/devices/{device_id}", "viewer"),
    ("GET", "/api/v1/devices/{device_id}/telemetry", "viewer"),
    ("POST", "/api/v1/devices/{device_id}/revoke", "admin"),
    ("POST", "/api/v1/devices/{device_id}/tags", "operator"),
    ("GET", "/api/v1/tags", "viewer"),
    ("GET", "/api/v1/models", "viewer"),
    ("GET", "/api/v1/models/{name}/{version}", "viewer"),
    ("GET", "/api/v1/deployments", "viewer"),
    ("GET", "/api/v1/deployments/{deployment_id}", "viewer"),
    ("POST", "/api/v1/deployments", "operator"),
    ("GET", "/api/v1/rollouts", "viewer"),
    ("GET", "/api/v1/rollouts/{rollout_id}", "viewer"),
    ("GET", "/api/v1/rollouts/{rollout_id}/story", "viewer"),
    ("POST", "/api/v1/rollouts", "operator"),
    ("POST", "/api/v1/rollouts/{rollout_id}/start", "operator"),
    ("POST", "/api/v1/rollouts/{rollout_id}/pause", "operator"),
    ("POST", "/api/v1/rollouts/{rollout_id}/resume", "operator"),
    ("POST", "/api/v1/rollouts/{rollout_id}/abort", "operator"),
    ("GET", "/api/v1/tokens", "admin"),
    ("POST", "/api/v1/tokens", "admin"),
    ("POST", "/api/v1/tokens/{token_id}/revoke", "admin"),
    ("GET", "/metrics", "viewer"),
    ("GET", "/api/v1/dashboard/me", "viewer"),
    ("GET", "/api/v1/dashboard/devices/{device_id}/latency", "viewer"),
]
ALL_PATHS = [*ROUTES, ("GET", "/api/v1/openapi.json", "viewer")]
RANK = {"viewer": 0, "operator": 1, "admin": 2}


def _concrete(path: str) -> str:
    return re.sub(r"\{[a-z_]+\}", "x", path)


def _assert_error(reply: Reply, status: int, code: str) -> None:
    assert reply.status == status, reply
    body = reply.body
    assert isinstance(body, dict) and body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def test_no_token_is_401_json_on_every_route(api: ApiFixture) -> None:
    for method, path, _role in ALL_PATHS:
        reply = api.client.call(method, _concrete(path), body={} if method == "POST" else None)
        _assert_error(reply, 401, "unauthorized")
        assert reply.headers.get("www-authenticate") == "Bearer", path


def test_bad_revoked_and_non_bearer_tokens_are_401(api: ApiFixture) -> None:
    revoked = api.tokens.create("gone", "admin")
    api.tokens.revoke(revoked.info.id)
    forged = api.admin[:-2] + ("AA" if not api.admin.endswith("AA") else "BB")
    for method, path, _role in ALL_PATHS:
        for token in (revoked.token, forged, "eft_0000000000000000_" + "a" * 43, "garbage"):
            reply = api.client.call(
                method, _concrete(path), token, {} if method == "POST" else None
            )
            _assert_error(reply, 401, "unauthorized")
    # A valid token, but as Basic credentials rather than a bearer token.
    reply = api.client.call("GET", "/api/v1/fleet", headers={"Authorization": f"Basic {api.admin}"})
    _assert_error(reply, 401, "unauthorized")


@pytest.mark.parametrize("who", ["viewer", "operator"])
def test_too_small_a_role_is_403_json(api: ApiFixture, who: str) -> None:
    token = getattr(api, who)
    checked = 0
    for method, path, role in ROUTES:
        if RANK[role] <= RANK[who]:
            continue
        reply = api.client.call(method, _concrete(path), token, {} if method == "POST" else None)
        _assert_error(reply, 403, "forbidden")
        assert role in reply.body["error"]["message"]
        checked += 1
    assert checked >= (4 if who == "operator" else 10)


def test_viewer_cannot_deploy(api: ApiFixture) -> None:
    h = api.harness
    h.register("1.0")
    device = h.enroll("viewer-cannot")
    reply = api.client.post(
        "/api/v1/deployments",
        api.viewer,
        {"model": "e2e-mlp", "version": "1.0", "devices": [device]},
    )
    _assert_error(reply, 403, "forbidden")
    assert h.registry.list_deployments() == []
    assert h.registry.desired_for(device) is None


def test_a_sufficient_role_gets_past_auth(api: ApiFixture) -> None:
    """Admins may do what operators and viewers may: never 401/403 for them."""
    for method, path, _role in ALL_PATHS:
        reply = api.client.call(
            method, _concrete(path), api.admin, {} if method == "POST" else None
        )
        assert reply.status not in (401, 403), (path, reply)


def test_openapi_lists_every_route_with_bearer_auth(api: ApiFixture) -> None:
    reply = api.client.get("/api/v1/openapi.json", api.viewer)
    assert reply.status == 200
    doc = reply.body
    assert doc["openapi"].startswith("3.")
    listed = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert listed == {(m, p) for m, p, _ in ROUTES}
    schemes = doc["components"]["securitySchemes"]
    assert any(s.get("scheme", "").lower() == "bearer" for s in schemes.values())
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert op.get("security"), f"{path} declares no security"


def test_unknown_path_is_json_404_and_docs_are_off(api: ApiFixture) -> None:
    for path in ("/api/v1/nothing", "/docs", "/redoc", "/openapi.json"):
        reply = api.client.get(path, api.viewer)
        _assert_error(reply, 404, "not_found")


def test_oversized_bodies_are_refused_before_auth_reads_them(api: ApiFixture) -> None:
    import http.client
    import json

    for token in (None, api.operator):
        # Declare 2 GiB and send none of it: the answer comes from the
        # headers alone (the server never waits for, or buffers, the body).
        conn = http.client.HTTPConnection(api.server.host, api.server.port, timeout=10)
        try:
            conn.putrequest("POST", "/api/v1/deployments")
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(2 * 1024**3))
            if token is not None:
                conn.putheader("Authorization", f"Bearer {token}")
            conn.endheaders()
            response = conn.getresponse()
            assert response.status == 413
            assert json.loads(response.read())["error"]["code"] == "too_large"
        finally:
            conn.close()
    # Just under the limit is read, validated and refused as bad input instead.
    fits = b'{"model": "' + b"x" * 1000 + b'"}'
    reply = api.client.call("POST", "/api/v1/deployments", api.operator, raw=fits)
    _assert_error(reply, 422, "bad_request")


def test_a_body_without_a_length_is_refused(api: ApiFixture) -> None:
    import http.client
    import json

    conn = http.client.HTTPConnection(api.server.host, api.server.port, timeout=10)
    try:
        # Headers only: the refusal must not wait for the chunks.
        conn.putrequest("POST", "/api/v1/deployments")
        conn.putheader("Authorization", f"Bearer {api.operator}")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 411
        assert json.loads(response.read())["error"]["code"] == "length_required"
    finally:
        conn.close()
