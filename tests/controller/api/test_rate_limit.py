"""A per-token request rate: 429 with Retry-After, counted, visible in /metrics and the CLI."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner

from edgefleet.controller.api.limits import RateLimiter
from edgefleet.controller.cli import cli
from tests.controller.api.conftest import ApiFixture
from tests.e2e.harness import wait_for


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_buckets_admit_a_burst_then_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate_per_s=2.0, burst=3, max_keys=2, clock=clock)
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == pytest.approx(0.5)  # one request every 0.5 s
    assert limiter.take("b") == 0.0  # another key has its own bucket
    clock.now += 0.5
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0
    assert limiter.refused == 2
    # Beyond max_keys the least recently used bucket is dropped (memory stays bounded).
    limiter.take("c")
    assert set(limiter._buckets) == {"a", "c"}
    with pytest.raises(ValueError, match="rate_per_s"):
        RateLimiter(rate_per_s=0)


def _app(api: ApiFixture) -> Any:
    # The FastAPI app the running uvicorn server serves (its config holds it).
    return api.server._server.config.app


def test_a_token_over_its_rate_gets_429_and_others_do_not(api: ApiFixture) -> None:
    # One request per 100 s after a burst of 3: no refill can happen during the test.
    _app(api).state.rate_limiter = RateLimiter(rate_per_s=0.01, burst=3)
    for _ in range(3):
        assert api.client.get("/api/v1/fleet", api.viewer).status == 200
    refused = api.client.get("/api/v1/fleet", api.viewer)
    assert refused.status == 429
    assert refused.body["error"]["code"] == "rate_limited"
    assert int(refused.headers["retry-after"]) >= 1
    # The operator's token has its own budget; and the CLI says what happened.
    token_env = {"EDGEFLEET_TOKEN": api.viewer}
    result = CliRunner().invoke(
        cli,
        ["--api", api.server.url, "device", "tag", "x", "--add", "y", "--json"],
        env=token_env,
        catch_exceptions=False,
    )
    assert result.exit_code == 1
    error = json.loads(result.stderr)["error"]
    assert (error["code"], error["http_status"]) == ("rate_limited", 429)

    assert api.client.get("/api/v1/fleet", api.operator).status == 200

    # Counted: /metrics shows both refusals. The count can lag for a moment
    # while the service moves it from memory to the registry, so poll (with
    # a limiter that lets the polling through).
    _app(api).state.rate_limiter = RateLimiter()

    def refusals() -> float:
        metrics = api.client.get("/metrics", api.admin)
        assert metrics.status == 200, metrics
        prefix = 'edgefleet_rejected_messages_total{reason="api_rate_limited"}'
        lines = [line for line in metrics.body.splitlines() if line.startswith(prefix)]
        return float(lines[0].split()[-1]) if lines else 0.0

    wait_for(lambda: refusals() >= 2, 30, "/metrics to count the two refusals")
