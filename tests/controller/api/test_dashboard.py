"""The dashboard's page, assets and read-only routes, over real HTTP to a real controller.

The browser side is tests/e2e/test_dashboard.py; this checks what the
server promises: the page and assets ship in the package and load without a
token or a CDN, everything with data still needs one, and the latency route
reads a real agent's telemetry.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from edgefleet.controller.api.dashboard import STATIC_FILES, static_names
from tests.controller.api.conftest import ApiFixture
from tests.e2e.harness import infer, wait_for

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[3]


def test_the_page_and_its_assets_load_without_a_token(api: ApiFixture) -> None:
    page = api.client.get("/")
    assert page.status == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert 'id="signin"' in page.body
    for name in STATIC_FILES:
        reply = api.client.get(f"/static/{name}")
        assert reply.status == 200, name
        assert reply.headers["content-type"] == STATIC_FILES[name]
        assert reply.body


def test_only_the_named_assets_are_served(api: ApiFixture) -> None:
    for path in ("/static/nope.js", "/static/index.html", "/static/..%2Fdashboard.py"):
        reply = api.client.get(path)
        assert reply.status == 404, path
        assert reply.body["error"]["code"] == "not_found"


def test_no_cdn_every_referenced_asset_ships() -> None:
    shipped = set(static_names())
    assert {"index.html", *STATIC_FILES} <= shipped
    index = (ROOT / "controller/api/static/index.html").read_text()
    assert not re.search(r'(?:src|href)="(?:[a-z]+:)?//', index), "an asset from elsewhere"
    for ref in re.findall(r'(?:src|href)="(/static/[^"]+)"', index):
        assert ref.removeprefix("/static/") in STATIC_FILES, ref
    script = (ROOT / "controller/api/static/app.js").read_text()
    # Strings reach the DOM only as text nodes: no HTML parsing sink anywhere.
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = config["tool"]["setuptools"]
    assert "edgefleet.controller.api.static" in setuptools["packages"]
    shipped_patterns = setuptools["package-data"]["edgefleet.controller.api.static"]
    for name in shipped:
        assert any(name.endswith(p.removeprefix("*")) for p in shipped_patterns), name


def test_me_says_who_the_token_is(api: ApiFixture) -> None:
    assert api.client.get("/api/v1/dashboard/me").status == 401
    assert api.client.get("/api/v1/dashboard/me", "eft_bogus").status == 401
    for token, role in ((api.viewer, "viewer"), (api.operator, "operator"), (api.admin, "admin")):
        reply = api.client.get("/api/v1/dashboard/me", token)
        assert reply.status == 200
        assert reply.body["role"] == role
        assert reply.body["name"] == f"{role}-test"


def test_latency_per_minute_from_a_real_agent(api: ApiFixture) -> None:
    h = api.harness
    path = "/api/v1/dashboard/devices/{}/latency"
    assert api.client.get(path.format("nobody")).status == 401
    missing = api.client.get(path.format("nobody"), api.viewer)
    assert missing.status == 404
    assert api.client.get(path.format("nobody") + "?minutes=0", api.viewer).status == 422

    h.register("1.0")
    device_id = h.enroll("gw-lat")
    agent = h.start_agent(h.agent_config("gw-lat"))
    h.deploy("1.0", "gw-lat")
    h.wait_active(agent, "1.0")
    for _ in range(12):
        infer(agent)

    def minutes() -> list[dict[str, object]]:
        reply = api.client.get(path.format(device_id), api.viewer)
        assert reply.status == 200
        found: list[dict[str, object]] = reply.body["minutes"]
        return found

    wait_for(
        lambda: sum(int(str(m["requests"])) for m in minutes()) >= 12,
        60,
        "the agent's 12 requests in the latency route",
    )
    measured = [m for m in minutes() if m["p50_ms"] is not None]
    assert measured
    for m in measured:
        p50, p95, p99 = (float(str(m[k])) for k in ("p50_ms", "p95_ms", "p99_ms"))
        assert 0 < p50 <= p95 <= p99
        assert m["errors"] == 0 and m["error_rate"] == 0.0
        assert int(str(m["rss_bytes"])) > 0
    stamps = [str(m["minute"]) for m in minutes()]
    assert stamps == sorted(stamps)
