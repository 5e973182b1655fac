"""The CLI as a client of the running controller: ``edgefleet --api URL ...`` over real HTTP.

Each test runs the real command line (click's CliRunner, in-process) against
a real uvicorn server in front of a real ControllerService, broker and
registry (the ``api`` fixture). The token comes from ``EDGEFLEET_TOKEN`` or
``--token-file``, never from the visible arguments.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from edgefleet.controller.api_client import ApiClient, ApiRequestError, ApiUnreachableError
from edgefleet.controller.broker import free_port
from edgefleet.controller.cli import cli
from edgefleet.controller.rollout.store import RolloutStore
from tests.controller.api.conftest import ApiFixture
from tests.e2e.harness import MODEL, wait_for


def edgefleet(api_url: str, token: str | None, *args: str, **env: str) -> Result:
    """``edgefleet --api URL ARGS`` with the token in the environment, as an operator runs it."""
    environ = {"EDGEFLEET_TOKEN": token or "", "EDGEFLEET_API": "", **env}
    return CliRunner().invoke(cli, ["--api", api_url, *args], env=environ, catch_exceptions=False)


def json_error(result: Result) -> dict[str, Any]:
    assert result.stdout == "", result.stdout
    error: dict[str, Any] = json.loads(result.stderr)["error"]
    return error


def test_deploy_through_the_api_reports_what_the_controller_published(api: ApiFixture) -> None:
    h = api.harness
    h.register("1.0")
    a = h.enroll("a")
    h.registry.enroll_device(h.device_id("b"), tags=["lab"])
    b = h.device_id("b")

    result = edgefleet(
        api.server.url,
        api.operator,
        "deploy",
        MODEL,
        "1.0",
        "--device",
        a,
        "--tag",
        "lab",
        "--publish-wait-s",
        "60",
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["via"] == "api" and data["api"] == api.server.url
    assert sorted(data["devices"]) == sorted([a, b])
    # The controller's own answer: it waited for its outbox, so both were published.
    assert data["published"] == 2 and data["unpublished"] == []
    assert not h.registry.unpublished_desired()
    deployment = h.registry.get_deployment(data["deployment"])
    assert sorted(t.device_id for t in deployment.targets) == sorted([a, b])

    wait = ("--publish-wait-s", "60")
    text = edgefleet(api.server.url, api.operator, "deploy", MODEL, "1.0", "--device", a, *wait)
    assert text.exit_code == 0, text.output
    assert f"via {api.server.url}; the controller published 1" in text.stdout


def test_api_errors_are_clear_name_the_url_and_exit_1(api: ApiFixture, tmp_path: Path) -> None:
    h = api.harness
    h.register("1.0")
    a = h.enroll("a")
    url = api.server.url

    # No token at all: refused before any request, saying how to give one.
    missing = edgefleet(url, None, "deploy", MODEL, "1.0", "--device", a, "--json")
    assert missing.exit_code == 1
    assert "EDGEFLEET_TOKEN" in json_error(missing)["message"]

    # A token the controller does not know: 401, with the URL.
    bad = edgefleet(url, "eft_0000_nope", "deploy", MODEL, "1.0", "--device", a, "--json")
    error = json_error(bad)
    assert bad.exit_code == 1 and error["code"] == "unauthorized"
    assert error["http_status"] == 401 and error["url"].startswith(url)

    # A viewer may not deploy: 403; nothing was recorded.
    viewer = edgefleet(url, api.viewer, "deploy", MODEL, "1.0", "--device", a, "--json")
    error = json_error(viewer)
    assert viewer.exit_code == 1 and (error["code"], error["http_status"]) == ("forbidden", 403)
    assert h.registry.list_deployments() == []

    # An unknown model: the controller's 404, in plain text without --json.
    unknown = edgefleet(url, api.operator, "deploy", "nope", "1.0", "--device", a)
    assert unknown.exit_code == 1 and unknown.stdout == ""
    assert unknown.stderr.startswith("Error: POST " + url) and "404 not_found" in unknown.stderr

    # Bad input the server validates: 422.
    long_id = edgefleet(url, api.operator, "deploy", MODEL, "1.0", "--device", "x" * 100, "--json")
    assert json_error(long_id)["http_status"] == 422

    # Nobody listening: one sentence naming the URL, no traceback.
    dead = f"http://127.0.0.1:{free_port()}"
    refused = edgefleet(dead, api.operator, "deploy", MODEL, "1.0", "--device", a, "--json")
    error = json_error(refused)
    assert refused.exit_code == 1 and error["code"] == "api_unreachable"
    assert dead in error["message"]
    plain = edgefleet(dead, api.operator, "rollout", "pause", "r1")
    assert plain.exit_code == 1 and plain.stderr.startswith("Error: the controller API at " + dead)

    # A malformed URL is a usage-level config error, not a crash.
    ftp = edgefleet("ftp://x", api.operator, "deploy", MODEL, "1.0", "--device", a, "--json")
    assert ftp.exit_code == 1 and "http(s)://" in json_error(ftp)["message"]


def test_token_from_a_file_and_the_client_types(api: ApiFixture, tmp_path: Path) -> None:
    h = api.harness
    a = h.enroll("a")
    token_file = tmp_path / "token"
    token_file.write_text(api.operator + "\n")
    result = CliRunner().invoke(
        cli,
        [
            "--api",
            api.server.url,
            "--token-file",
            str(token_file),
            "device",
            "tag",
            a,
            "--add",
            "x",
        ],
        env={"EDGEFLEET_TOKEN": ""},
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    info = h.registry.get_device(a)
    assert info is not None and info.tags == ("x",)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    result = CliRunner().invoke(
        cli,
        ["--api", api.server.url, "--token-file", str(empty), "device", "tag", a, "--add", "y"],
        env={"EDGEFLEET_TOKEN": api.operator},
        catch_exceptions=False,
    )
    assert result.exit_code == 1 and "is empty" in result.stderr

    client = ApiClient(api.server.url, api.viewer)
    with pytest.raises(ApiRequestError) as refused:
        client.update_tags(a, ["z"], [])
    assert (refused.value.status, refused.value.api_code) == (403, "forbidden")
    with pytest.raises(ApiUnreachableError):
        ApiClient(f"http://127.0.0.1:{free_port()}", api.viewer, timeout_s=5).devices()
    assert [d["id"] for d in client.devices()] == [a]


def test_tags_edited_through_the_api(api: ApiFixture) -> None:
    h = api.harness
    a = h.registry.enroll_device(h.device_id("a"), tags=["old", "keep"]).id
    url = api.server.url
    result = edgefleet(
        url, api.operator, "device", "tag", a, "--add", "new", "--remove", "old", "--json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"device_id": a, "tags": ["keep", "new"]}
    info = h.registry.get_device(a)
    assert info is not None and info.tags == ("keep", "new")
    shown = edgefleet(url, api.viewer, "device", "tag", a, "--json")  # reading needs a viewer
    assert json.loads(shown.stdout) == {"device_id": a, "tags": ["keep", "new"]}

    # The route itself: operator role, validation, unknown devices.
    reply = api.client.post(f"/api/v1/devices/{a}/tags", api.viewer, {"add": ["v"]})
    assert reply.status == 403
    reply = api.client.post(f"/api/v1/devices/{a}/tags", api.operator, {"add": ["a b"]})
    assert reply.status == 400 and reply.body["error"]["code"] == "bad_name"
    reply = api.client.post(
        f"/api/v1/devices/{a}/tags", api.operator, {"add": ["x"], "remove": ["x"]}
    )
    assert reply.status == 400
    reply = api.client.post("/api/v1/devices/nobody/tags", api.operator, {"add": ["x"]})
    assert reply.status == 404 and reply.body["error"]["code"] == "not_found"
    reply = api.client.post(f"/api/v1/devices/{a}/tags", api.operator, {"tags": ["x"]})
    assert reply.status == 422
    unknown = edgefleet(url, api.operator, "device", "tag", "nobody", "--add", "x", "--json")
    assert unknown.exit_code == 1 and json_error(unknown)["code"] == "not_found"
    info = h.registry.get_device(a)
    assert info is not None and info.tags == ("keep", "new")


def test_rollouts_steered_through_the_api(api: ApiFixture) -> None:
    h = api.harness
    h.register("1.0")
    a = h.enroll("a")
    url = api.server.url
    created = edgefleet(
        url,
        api.operator,
        "rollout",
        "create",
        MODEL,
        "1.0",
        "--device",
        a,
        "--no-start",
        "--soak-s",
        "5",
        "--json",
    )
    assert created.exit_code == 0, created.output
    info = json.loads(created.stdout)
    store = RolloutStore(h.registry, actor="test")
    assert store.get(info["id"]).status.value == info["status"] == "created"
    assert info["config"]["soak_s"] == 5.0 and info["selector"]["devices"] == [a]

    text = edgefleet(url, api.operator, "rollout", "start", info["id"])
    assert text.exit_code == 0, text.output
    assert f"rollout {info['id']}: {MODEL}@1.0" in text.stdout
    assert store.get(info["id"]).status.value != "created"
    paused = edgefleet(url, api.operator, "rollout", "pause", info["id"], "--reason", "look")
    assert paused.exit_code == 0, paused.output
    assert store.get(info["id"]).status.value == "paused"
    assert any(d.reason == "look" and "api:" in d.actor for d in store.decisions(info["id"]))
    assert edgefleet(url, api.operator, "rollout", "resume", info["id"]).exit_code == 0
    assert store.get(info["id"]).status.value == "running"
    aborted = edgefleet(url, api.operator, "rollout", "abort", info["id"], "--json")
    assert aborted.exit_code == 0 and json.loads(aborted.stdout)["status"] == "aborted"

    viewer = edgefleet(url, api.viewer, "rollout", "pause", info["id"], "--json")
    assert viewer.exit_code == 1 and json_error(viewer)["code"] == "forbidden"
    unknown = edgefleet(url, api.operator, "rollout", "pause", "nope", "--json")
    assert unknown.exit_code == 1 and json_error(unknown)["http_status"] == 404


def test_revoke_through_the_api_needs_admin_and_a_ca(api: ApiFixture) -> None:
    a = api.harness.enroll("a")
    url = api.server.url
    operator = edgefleet(url, api.operator, "device", "revoke", a, "--json")
    assert operator.exit_code == 1 and json_error(operator)["code"] == "forbidden"
    admin = edgefleet(url, api.admin, "device", "revoke", a, "--json")
    # The fixture's controller has no CA: the controller says so, clearly.
    assert admin.exit_code == 1 and json_error(admin)["code"] == "no_ca"
    crl = edgefleet(url, api.admin, "device", "revoke", a, "--crl-out", "x.pem")
    assert crl.exit_code == 2 and "not with --api" in crl.stderr


@pytest.mark.slow
def test_deploy_wait_follows_a_real_agent_to_active(api: ApiFixture) -> None:
    h = api.harness
    h.register("1.0")
    device_id = h.enroll("edge")
    agent = h.start_agent(h.agent_config("edge"))
    wait_for(lambda: h.summary("edge").online, 30, "the agent to come online")

    result = edgefleet(
        api.server.url,
        api.operator,
        "deploy",
        MODEL,
        "1.0",
        "--device",
        device_id,
        "--wait",
        "--timeout",
        "120",
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["wait"]["active"] == [device_id] and data["wait"]["failed"] == {}
    assert agent.active_model is not None and agent.active_model.version == "1.0"

    # A version whose model fails its smoke test: the device refuses it, --wait says so.
    h.register_broken("2.0")
    failed = edgefleet(
        api.server.url,
        api.operator,
        "deploy",
        MODEL,
        "2.0",
        "--device",
        device_id,
        "--wait",
        "--timeout",
        "120",
        "--json",
    )
    assert failed.exit_code == 1, failed.output
    error = json_error(failed)
    assert error["code"] == "deploy_failed" and device_id in error["message"]
    assert list(error["failed"]) == [device_id] and error["failed"][device_id]
    assert agent.active_model is not None and agent.active_model.version == "1.0"


def test_deploy_wait_times_out_naming_the_silent_devices(api: ApiFixture) -> None:
    h = api.harness
    h.register("1.0")
    silent = h.enroll("silent")  # enrolled, never started: nothing will report
    result = edgefleet(
        api.server.url,
        api.operator,
        "deploy",
        MODEL,
        "1.0",
        "--device",
        silent,
        "--wait",
        "--timeout",
        "1",
    )
    assert result.exit_code == 1
    assert "deployment" in result.stdout  # what was done is printed before following
    assert f"not active after 1s: {silent} (sent)" in result.stderr
    assert "[deploy_timeout]" in result.stderr
