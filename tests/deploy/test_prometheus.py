"""deploy/prometheus/: the config and rules pass promtool, the rules fire on the
metrics the controller really exports, and Debian's Prometheus really scrapes a
running controller with a viewer token."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.controller.api import conftest as api_conftest
from tests.controller.api.conftest import ApiFixture
from tests.controller.registry.builders import make_telemetry
from tests.e2e.harness import MODEL, wait_for

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
TOKEN_PATH = "/etc/prometheus/edgefleet.token"  # noqa: S105 - a path, not a secret

api = api_conftest.api  # the real controller with its API (a fixture)

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (apt-get install -y prometheus; .ci/run does)"
)
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="prometheus not installed (apt-get install -y prometheus; .ci/run does)",
)


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


DUMMY = "not-a-real-token"  # promtool only checks that the file exists


def local_config(tmp_path: Path, token: str = DUMMY) -> Path:
    """The shipped config with the token file and the rule file at paths that exist here."""
    token_file = tmp_path / "edgefleet.token"
    token_file.write_text(token + "\n")
    text = CONFIG.read_text()
    assert TOKEN_PATH in text
    text = text.replace(TOKEN_PATH, str(token_file)).replace("- alerts.yml", f"- {ALERTS}")
    out = tmp_path / "prometheus.yml"
    out.write_text(text)
    return out


def alert_metric_names() -> set[str]:
    return set(re.findall(r"\b(edgefleet_[a-z_]+)", ALERTS.read_text()))


@needs_promtool
def test_promtool_accepts_the_config_and_the_rules(tmp_path: Path) -> None:
    checked = promtool("check", "config", local_config(tmp_path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "1 rule files found" in checked.stdout + checked.stderr
    rules = promtool("check", "rules", ALERTS)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    names = set(re.findall(r"(?m)^\s+- alert: (\w+)", ALERTS.read_text()))
    assert {
        "EdgefleetDevicesOffline",
        "EdgefleetRolloutHalted",
        "EdgefleetRejectedMessageRate",
        "EdgefleetIngestionLag",
    } <= names
    # The check can fail: a broken expression is refused.
    broken = tmp_path / "broken.yml"
    broken.write_text(ALERTS.read_text().replace("> 0.10", "> > 0.10"))
    assert promtool("check", "rules", broken).returncode != 0


def descriptions() -> dict[str, str]:
    """Each alert's description, as written in alerts.yml (promtool compares them too)."""
    found = re.findall(
        r'- alert: (\w+)\n.*?description: "([^"]*)"', ALERTS.read_text(), flags=re.DOTALL
    )
    return dict(found)


def expect(alert: str, summary: str, **labels: str) -> dict[str, Any]:
    return {
        "exp_labels": labels,
        "exp_annotations": {"summary": summary, "description": descriptions()[alert]},
    }


def rule_tests() -> dict[str, Any]:
    """promtool's unit-test file (JSON is YAML): synthetic series, when each alert fires."""
    offline, halted, lag = (
        "EdgefleetDevicesOffline",
        "EdgefleetRolloutHalted",
        "EdgefleetIngestionLag",
    )
    devices = "edgefleet_fleet_devices"
    return {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    # generic: 1 of 3 offline (alerts); x86-vnni: all 5 online (does not).
                    {"series": f'{devices}{{online="false",profile="generic"}}', "values": "1x30"},
                    {"series": f'{devices}{{online="true",profile="generic"}}', "values": "2x30"},
                    {"series": f'{devices}{{online="true",profile="x86-vnni"}}', "values": "5x30"},
                    # The first halt ever: the series appears at 5 min.
                    {
                        "series": 'edgefleet_rollout_decisions_total{kind="halted"}',
                        "values": "_x5 1x30",
                    },
                    {
                        "series": "edgefleet_ingest_newest_telemetry_age_seconds",
                        "values": "0+60x30",
                    },
                ],
                "alert_rule_test": [
                    {"eval_time": "5m", "alertname": offline, "exp_alerts": []},
                    {
                        "eval_time": "15m",
                        "alertname": offline,
                        "exp_alerts": [
                            expect(
                                offline,
                                "33.33% of generic devices offline",
                                severity="warning",
                                profile="generic",
                            )
                        ],
                    },
                    {"eval_time": "3m", "alertname": halted, "exp_alerts": []},
                    {
                        "eval_time": "10m",
                        "alertname": halted,
                        "exp_alerts": [
                            expect(halted, "A rollout halted", severity="critical", kind="halted")
                        ],
                    },
                    {"eval_time": "25m", "alertname": halted, "exp_alerts": []},
                    {"eval_time": "12m", "alertname": lag, "exp_alerts": []},
                    {
                        "eval_time": "20m",
                        "alertname": lag,
                        "exp_alerts": [
                            expect(lag, "Newest stored telemetry is 20m 0s old", severity="warning")
                        ],
                    },
                ],
            }
        ],
    }


@needs_promtool
def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    """promtool's rule unit tests: offline share per profile, the first halt ever, lag."""
    assert len(descriptions()) == len(re.findall(r"- alert: ", ALERTS.read_text()))
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(json.dumps(rule_tests(), indent=1))
    result = promtool("test", "rules", tests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_use_metrics_the_controller_exports(api: ApiFixture) -> None:
    """Every edgefleet_* name in alerts.yml is in a real controller's /metrics."""
    h = api.harness
    device_id = h.enroll("named")
    h.registry.add_telemetry([make_telemetry(device_id, 10, p50=1.0)])
    reply = api.client.get("/metrics", api.viewer)
    assert reply.status == 200, reply
    exported: set[str] = set()
    for family in text_string_to_metric_families(reply.body):
        exported.add(family.name)
        exported.add(family.name + ("_total" if family.type == "counter" else ""))
    missing = alert_metric_names() - exported
    assert not missing, f"alerts.yml uses metrics the controller does not export: {missing}"
    assert len(alert_metric_names()) >= 6


# --------------------------------------------------------------------------- real scrape
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def scalar(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None


@pytest.fixture
def prometheus(tmp_path: Path, api: ApiFixture) -> Iterator[Prometheus]:
    """Debian's Prometheus scraping the fixture's API every second with the shipped
    job (token from a file), plus a job with a wrong token as the control."""
    assert PROMETHEUS is not None
    config = local_config(tmp_path, api.viewer)
    target = urllib.parse.urlsplit(api.server.url).netloc
    text = config.read_text().replace('"127.0.0.1:8480"', f'"{target}"')
    text = text.replace("scrape_interval: 30s", "scrape_interval: 1s")
    text = text.replace("evaluation_interval: 30s", "evaluation_interval: 1s")
    text += (
        "  - job_name: wrong-token\n"
        "    authorization: {type: Bearer, credentials: not-a-token}\n"
        f'    static_configs: [{{targets: ["{target}"]}}]\n'
    )
    config.write_text(text)
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = Prometheus(f"http://127.0.0.1:{port}")

    def ready() -> bool:
        assert process.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
        try:
            with urllib.request.urlopen(server.url + "/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_for(ready, 30, "Prometheus to start")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.mark.slow
@needs_prometheus
def test_prometheus_scrapes_a_running_fleet(api: ApiFixture, prometheus: Prometheus) -> None:
    h = api.harness
    h.register("1.0")
    names = ["p1", "p2", "p3"]
    for name in names:
        h.enroll(name)
    # Two real agents; the third device stays enrolled and offline.
    agents = [h.start_agent(h.agent_config(n)) for n in names[:2]]
    wait_for(lambda: all(h.summary(n).online for n in names[:2]), 20, "agents online")
    h.deploy("1.0", *names[:2])
    for agent in agents:
        h.wait_active(agent, "1.0")

    def scraped(promql: str, expected: float) -> bool:
        return prometheus.scalar(promql) == expected

    wait_for(lambda: scraped('up{job="edgefleet-controller"}', 1), 30, "a scrape")
    wait_for(lambda: scraped("sum(edgefleet_fleet_devices)", 3), 30, "three devices")
    running = f'{{online="true",version="{MODEL}@1.0"}}'
    wait_for(
        lambda: scraped(f"sum(edgefleet_fleet_devices{running})", 2),
        30,
        "two online devices on 1.0 in Prometheus",
    )
    assert prometheus.scalar('sum(edgefleet_fleet_devices{online="false"})') == 1
    # The agents' telemetry (every 0.5 s) is ingested: the rate Prometheus computes is > 0.
    wait_for(
        lambda: (prometheus.scalar("rate(edgefleet_ingest_messages_total[15s])") or 0) > 0,
        30,
        "a non-zero ingest rate",
    )
    # A wrong token is refused: that job's scrape fails (up == 0), so the token matters.
    wait_for(lambda: scraped('up{job="wrong-token"}', 0), 30, "the wrong-token scrape to fail")
    # The alert rules were loaded and evaluated against the live series.
    with urllib.request.urlopen(prometheus.url + "/api/v1/rules", timeout=10) as response:
        groups = json.loads(response.read())["data"]["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert "EdgefleetDevicesOffline" in rules
    assert all(r["health"] != "err" for r in rules.values()), rules
