"""Every route on a real controller and registry, over real HTTP; bad input gets 4xx JSON."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from edgefleet.controller.ca import CertificateAuthority
from edgefleet.controller.registry.telemetry import rollup_telemetry
from edgefleet.protocols.messages import AgentState, ErrorInfo, Event, EventKind
from tests.controller.api.conftest import ApiFixture, Reply
from tests.controller.registry.builders import make_report, make_telemetry
from tests.e2e.harness import MODEL


def _ok(reply: Reply, status: int = 200) -> dict:  # type: ignore[type-arg]
    assert reply.status == status, reply
    assert isinstance(reply.body, dict)
    return reply.body


def _error(reply: Reply, status: int, code: str | None = None) -> str:
    assert reply.status == status, reply
    assert set(reply.body) == {"error"}, reply.body
    if code is not None:
        assert reply.body["error"]["code"] == code, reply.body
    message: str = reply.body["error"]["message"]
    assert message
    return message


def _fleet(api: ApiFixture) -> tuple[str, str, str]:
    """Three enrolled devices: two tagged 'lab' (one reporting, one failed), one 'shop'."""
    h = api.harness
    reg = h.registry
    a, b, c = h.device_id("a"), h.device_id("b"), h.device_id("c")
    reg.enroll_device(a, tags=["lab", "north"])
    reg.enroll_device(b, tags=["lab"])
    reg.enroll_device(c, tags=["shop"])
    reg.record_reported(make_report(a), profile="generic")
    reg.record_reported(
        make_report(b, state=AgentState.FAILED, error=ErrorInfo("tampered", "bad hash")),
        profile="generic",
    )
    reg.set_online(a, True)
    return a, b, c


def test_fleet_devices_and_filters(api: ApiFixture) -> None:
    a, b, c = _fleet(api)
    fleet = _ok(api.client.get("/api/v1/fleet", api.viewer))
    assert (fleet["devices"], fleet["online"], fleet["offline"], fleet["failed"]) == (3, 1, 2, 1)

    def ids(query: str) -> list[str]:
        body = _ok(api.client.get(f"/api/v1/devices{query}", api.viewer))
        return [d["id"] for d in body["devices"]]

    assert ids("") == sorted([a, b, c])
    assert ids("?tag=lab") == sorted([a, b])
    assert ids("?tag=shop") == [c]
    assert ids("?tag=none") == []
    assert ids("?profile=generic") == sorted([a, b])
    assert ids("?status=online") == [a]
    assert ids("?status=offline") == sorted([b, c])
    assert ids("?status=failed") == [b]
    assert ids("?tag=lab&status=online") == [a]
    assert ids("?version=9.9") == []
    body = _ok(api.client.get("/api/v1/devices?tag=lab&status=failed", api.viewer))
    assert body["devices"][0]["last_error"] == {"code": "tampered", "message": "bad hash"}
    _error(api.client.get("/api/v1/devices?status=sleeping", api.viewer), 422, "bad_request")

    # Pages by id: `next` is the cursor of the following page, None on the last.
    first = _ok(api.client.get("/api/v1/devices?limit=2", api.viewer))
    assert [d["id"] for d in first["devices"]] == sorted([a, b, c])[:2]
    assert first["next"] == sorted([a, b, c])[1]
    rest = _ok(api.client.get(f"/api/v1/devices?limit=2&after={first['next']}", api.viewer))
    assert [d["id"] for d in rest["devices"]] == sorted([a, b, c])[2:]
    assert rest["next"] is None
    _error(api.client.get("/api/v1/devices?limit=0", api.viewer), 422, "bad_request")


def test_version_filter_matches_what_devices_run(api: ApiFixture) -> None:
    h = api.harness
    a, b, _c = _fleet(api)
    registered = h.register("1.0")
    ref = registered.bundles[0]
    from edgefleet.protocols.messages import ModelRef

    running = ModelRef(MODEL, "1.0", registered.version.release, ref.target_path)
    h.registry.record_reported(make_report(a, active=running), profile="generic")
    for query in ("1.0", f"{MODEL}@1.0"):
        body = _ok(api.client.get(f"/api/v1/devices?version={query}", api.viewer))
        assert [d["id"] for d in body["devices"]] == [a]
        assert body["devices"][0]["active"]["version"] == "1.0"
    assert b not in str(body)


def test_one_device_with_events_and_rollup_telemetry(api: ApiFixture) -> None:
    h = api.harness
    a, _b, _c = _fleet(api)
    h.registry.add_events(
        [
            Event(device_id=a, kind=EventKind.DOWNLOAD_STARTED, generation=1),
            Event(device_id=a, kind=EventKind.INSTALLED, generation=1),
        ]
    )
    h.registry.add_telemetry([make_telemetry(a, 100, p50=2.0, errors=3) for _ in range(3)])
    rollup_telemetry(h.registry, raw_retention_s=3600, minute_retention_s=7200)

    body = _ok(api.client.get(f"/api/v1/devices/{a}", api.viewer))
    assert body["id"] == a and body["tags"] == ["lab", "north"] and body["online"] is True
    assert [e["kind"] for e in body["events"]] == ["installed", "download_started"]
    assert len(body["telemetry"]) == 1
    minute = body["telemetry"][0]
    assert (minute["requests"], minute["errors"], minute["windows"]) == (300, 9, 3)
    assert minute["p95_ms"] == 4.0 and minute["rss_bytes"] == 10_000_000

    series = _ok(api.client.get(f"/api/v1/devices/{a}/telemetry", api.viewer))
    assert series["minutes"] == body["telemetry"]
    future = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    later = api.client.get(
        f"/api/v1/devices/{a}/telemetry?since={future.replace('+', '%2B')}", api.viewer
    )
    assert _ok(later)["minutes"] == []
    _error(api.client.get(f"/api/v1/devices/{a}/telemetry?since=yesterday", api.viewer), 422)
    _error(
        api.client.get(f"/api/v1/devices/{a}/telemetry?since=2026-01-01T00:00:00", api.viewer),
        422,
        "bad_request",
    )
    _error(api.client.get("/api/v1/devices/nobody", api.viewer), 404, "not_found")
    _error(api.client.get("/api/v1/devices/nobody/telemetry", api.viewer), 404, "not_found")
    _error(api.client.get(f"/api/v1/devices/{a}?events=-1", api.viewer), 422, "bad_request")


def test_tags(api: ApiFixture) -> None:
    _fleet(api)
    body = _ok(api.client.get("/api/v1/tags", api.viewer))
    assert body["tags"] == [
        {"tag": "lab", "devices": 2},
        {"tag": "north", "devices": 1},
        {"tag": "shop", "devices": 1},
    ]


def test_models_with_variants_and_reports(api: ApiFixture) -> None:
    h = api.harness
    h.register("1.0", hardware_classes=("generic", "x86-avx2"))
    body = _ok(api.client.get("/api/v1/models", api.viewer))
    (version,) = body["models"]
    assert (version["name"], version["version"]) == (MODEL, "1.0")
    assert sorted(v["hardware_class"] for v in version["variants"]) == ["generic", "x86-avx2"]
    assert all(v["sha256"] and v["length"] > 0 for v in version["variants"])
    assert version["inputs"][0]["name"] == "features"
    one = _ok(api.client.get(f"/api/v1/models/{MODEL}/1.0", api.viewer))
    assert one == version
    assert _ok(api.client.get("/api/v1/models?name=other", api.viewer))["models"] == []
    _error(api.client.get(f"/api/v1/models/{MODEL}/9.9", api.viewer), 404, "not_found")


def test_deploy_lists_and_reports_per_device(api: ApiFixture) -> None:
    h = api.harness
    a, b, c = _fleet(api)
    h.register("1.0")
    reply = api.client.post(
        "/api/v1/deployments", api.operator, {"model": MODEL, "version": "1.0", "tags": ["lab"]}
    )
    body = _ok(reply, 201)
    assert sorted(d["device_id"] for d in body["devices"]) == sorted([a, b])
    # The running service's outbox published both (a real broker acknowledged them).
    assert body["all_published"] is True and all(d["published"] for d in body["devices"])
    assert h.registry.unpublished_desired() == []
    deployment_id = body["deployment"]["id"]
    assert h.registry.desired_for(c) is None

    listed = _ok(api.client.get("/api/v1/deployments", api.viewer))
    assert [d["id"] for d in listed["deployments"]] == [deployment_id]
    one = _ok(api.client.get(f"/api/v1/deployments/{deployment_id}", api.viewer))
    assert one == body["deployment"]
    devices = _ok(api.client.get("/api/v1/devices?tag=lab", api.viewer))["devices"]
    assert all(d["desired"] == {"model": MODEL, "version": "1.0"} for d in devices)
    detail = _ok(api.client.get(f"/api/v1/devices/{a}", api.viewer))["desired"]
    assert (detail["version"], detail["deployment_id"]) == ("1.0", deployment_id)
    assert _ok(api.client.get(f"/api/v1/devices/{c}", api.viewer))["desired"] is None
    _error(api.client.get("/api/v1/deployments/nope", api.viewer), 404, "not_found")


def test_deploy_bad_input_is_4xx_json_and_changes_nothing(api: ApiFixture) -> None:
    h = api.harness
    a, _b, _c = _fleet(api)
    h.register("1.0")
    post = lambda body: api.client.post("/api/v1/deployments", api.operator, body)  # noqa: E731
    _error(post({"model": MODEL, "version": "9.9", "devices": [a]}), 404, "not_found")
    _error(post({"model": MODEL, "version": "1.0", "devices": ["ghost"]}), 404, "not_found")
    _error(post({"model": MODEL, "version": "1.0"}), 400, "registry")
    _error(post({"model": MODEL, "version": "1.0", "all": True, "tags": ["lab"]}), 400)
    _error(post({"model": MODEL, "version": "1.0", "tags": ["none"]}), 400)
    _error(post({"model": MODEL, "version": "1.0", "devices": [a], "force": 1}), 422, "bad_request")
    _error(post({"version": "1.0", "devices": [a]}), 422, "bad_request")
    _error(post({"model": MODEL, "version": "1.0", "devices": "a"}), 422, "bad_request")
    _error(post({"model": "", "version": "1.0", "devices": [a]}), 422, "bad_request")
    _error(post([1, 2]), 422, "bad_request")
    raw = api.client.call("POST", "/api/v1/deployments", api.operator, raw=b"{not json")
    _error(raw, 422, "bad_request")
    _error(api.client.call("PUT", "/api/v1/deployments", api.operator), 405)
    assert h.registry.list_deployments() == []


def test_deploy_to_a_device_without_a_fitting_bundle_is_409(api: ApiFixture) -> None:
    h = api.harness
    h.register("1.0", hardware_classes=("x86-avx2",))
    device = h.enroll("arm", hardware_class="arm64")
    reply = api.client.post(
        "/api/v1/deployments", api.operator, {"model": MODEL, "version": "1.0", "devices": [device]}
    )
    assert "no bundle" in _error(reply, 409, "no_matching_bundle")


def test_rollouts_create_steer_and_story(api: ApiFixture) -> None:
    h = api.harness
    a, b, _c = _fleet(api)
    h.register("1.0")
    created = _ok(
        api.client.post(
            "/api/v1/rollouts",
            api.operator,
            {
                "model": MODEL,
                "version": "1.0",
                "selector": {"tags": ["lab"]},
                "canary": "1",
                "strategy": {"soak_s": 30, "observe_s": 30},
                "start": False,
            },
        ),
        201,
    )
    rid = created["id"]
    assert created["status"] == "created" and created["config"]["soak_s"] == 30
    started = _ok(api.client.post(f"/api/v1/rollouts/{rid}/start", api.operator))
    assert started["status"] == "running" and started["devices"] == 2
    paused = _ok(
        api.client.post(f"/api/v1/rollouts/{rid}/pause", api.operator, {"reason": "lunch"})
    )
    assert paused["status"] == "paused"
    _error(api.client.post(f"/api/v1/rollouts/{rid}/pause", api.operator), 409, "rollout_state")
    assert (
        _ok(api.client.post(f"/api/v1/rollouts/{rid}/resume", api.operator))["status"] == "running"
    )

    listed = _ok(api.client.get("/api/v1/rollouts", api.viewer))
    assert [r["id"] for r in listed["rollouts"]] == [rid]
    one = _ok(api.client.get(f"/api/v1/rollouts/{rid}", api.viewer))
    assert sorted(d["device_id"] for d in one["device_states"]) == sorted([a, b])
    assert one["waves"]

    aborted = _ok(
        api.client.post(f"/api/v1/rollouts/{rid}/abort", api.operator, {"reason": "test"})
    )
    assert aborted["status"] == "aborted"
    story = _ok(api.client.get(f"/api/v1/rollouts/{rid}/story", api.viewer))
    kinds = [d["kind"] for d in story["decisions"]]
    assert kinds[:2] == ["created", "started"]
    assert {"paused", "resumed", "aborted"} <= set(kinds)
    paused_decision = next(d for d in story["decisions"] if d["kind"] == "paused")
    assert paused_decision["reason"] == "lunch" and paused_decision["actor"] == "api:operator-test"
    after = story["decisions"][1]["id"]
    tail = _ok(api.client.get(f"/api/v1/rollouts/{rid}/story?after={after}", api.viewer))
    assert [d["id"] for d in tail["decisions"]] == [d["id"] for d in story["decisions"][2:]]
    _error(api.client.get("/api/v1/rollouts/ro-missing/story", api.viewer), 404, "not_found")
    _error(api.client.get("/api/v1/rollouts/ro-missing", api.viewer), 404, "not_found")
    _error(api.client.post("/api/v1/rollouts/ro-missing/pause", api.operator), 404, "not_found")


def test_rollout_bad_input_is_4xx_json(api: ApiFixture) -> None:
    h = api.harness
    _fleet(api)
    h.register("1.0")
    base = {"model": MODEL, "version": "1.0", "selector": {"all": True}}

    def post(**changes: object) -> Reply:
        return api.client.post("/api/v1/rollouts", api.operator, {**base, **changes})

    _error(post(canary="many"), 422, "bad_request")
    _error(post(strategy={"warp": 9}), 422, "bad_request")
    assert "base_rate" in _error(post(strategy={"base_rate": 0}), 422, "rollout_config")
    _error(post(selector={}), 400, "rollout")
    _error(post(selector={"all": True, "tags": ["lab"]}), 400, "rollout")
    _error(post(selector={"devices": ["ghost"]}), 404, "not_found")
    _error(post(version="9.9"), 404, "not_found")
    _error(post(selector={"all": True, "colour": "red"}), 422, "bad_request")
    assert _ok(api.client.get("/api/v1/rollouts", api.viewer))["rollouts"] == []


def test_revoke_a_device_needs_admin_and_a_ca(api: ApiFixture) -> None:
    h = api.harness
    a, _b, _c = _fleet(api)
    _error(api.client.post(f"/api/v1/devices/{a}/revoke", api.admin), 409, "no_ca")
    authority = CertificateAuthority.init(api.ca_dir)
    authority.issue_client_cert(a)
    reply = _ok(api.client.post(f"/api/v1/devices/{a}/revoke", api.admin))
    serial = next(c.serial for c in authority.issued() if c.common_name == a)
    assert reply["revoked_serials"] == [str(serial)]
    reopened = CertificateAuthority.open(api.ca_dir)
    assert next(c for c in reopened.issued() if c.common_name == a).revoked_at is not None
    # Nothing left to revoke: a conflict, not a success that did nothing.
    _error(api.client.post(f"/api/v1/devices/{a}/revoke", api.admin), 409, "certificate")
    _error(api.client.post("/api/v1/devices/ghost/revoke", api.admin), 404, "not_found")
    del h


def test_deploy_while_the_broker_is_unreachable_says_unpublished(api: ApiFixture) -> None:
    """The answer must not claim a delivery the broker never acknowledged."""
    h = api.harness
    a, _b, _c = _fleet(api)
    h.register("1.0")
    h.service.link.stop()
    reply = api.client.post(
        "/api/v1/deployments",
        api.operator,
        {"model": MODEL, "version": "1.0", "devices": [a], "wait_published_s": 1},
    )
    body = _ok(reply, 201)
    assert body["all_published"] is False
    assert body["devices"] == [
        {
            "device_id": a,
            "generation": body["devices"][0]["generation"],
            "bundle_target": body["devices"][0]["bundle_target"],
            "published": False,
        }
    ]
    # Recorded, so the outbox sends it when the broker is back.
    assert [d.device_id for d in h.registry.unpublished_desired()] == [a]


def test_admins_manage_tokens(api: ApiFixture) -> None:
    made = _ok(
        api.client.post("/api/v1/tokens", api.admin, {"name": "grafana", "role": "viewer"}), 201
    )
    assert made["token"].startswith("eft_") and made["role"] == "viewer"
    # The new token works, with its role.
    assert api.client.get("/api/v1/fleet", made["token"]).status == 200
    assert api.client.post("/api/v1/deployments", made["token"], {}).status == 403
    listed = _ok(api.client.get("/api/v1/tokens", api.admin))["tokens"]
    assert "grafana" in [t["name"] for t in listed]
    assert all("token" not in t for t in listed) and made["token"] not in str(listed)
    revoked = _ok(api.client.post(f"/api/v1/tokens/{made['id']}/revoke", api.admin))
    assert revoked["revoked_at"] is not None
    _error(api.client.get("/api/v1/fleet", made["token"]), 401, "unauthorized")
    _error(api.client.post("/api/v1/tokens/0000/revoke", api.admin), 404, "not_found")
    _error(api.client.post("/api/v1/tokens", api.admin, {"name": "x", "role": "root"}), 422)
    _error(api.client.post("/api/v1/tokens", api.admin, {"name": "", "role": "viewer"}), 422)
