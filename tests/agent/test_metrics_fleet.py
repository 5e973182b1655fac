"""A real agent's ``/metrics`` in a real fleet, and the Grafana dashboard against it.

One controller (real broker, real registry, real TUF repository) and one real
agent: a good install, a broken one, real inferences over HTTP. The agent's
``/metrics`` is scraped over HTTP, the controller's collector is rendered as
its ``/metrics`` renders it, and every PromQL expression of
``deploy/grafana/edgefleet.json`` must name only metrics that those two
actually expose.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edgefleet.controller.api.metrics import metrics_registry
from edgefleet.shared.link import BrokerSettings
from tests.e2e.harness import MODEL, Harness, infer, wait_for

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "edgefleet.json"
Samples = dict[str, list[tuple[dict[str, str], float]]]


# The sample names a family of each type can have in the text format.
_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "info": ("_info",),
}


def parse(text: str) -> Samples:
    """Samples by name; a declared family with no samples yet maps its names to []."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for suffix in _SUFFIXES.get(family.type, ("",)):
            out.setdefault(family.name + suffix, [])
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        v for ls, v in samples.get(name, []) if all(ls.get(k) == x for k, x in labels.items())
    )


def scrape_agent(url: str) -> Samples:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
        assert resp.status == 200
        return parse(resp.read().decode())


def post_raw(url: str, body: bytes) -> int:
    request = urllib.request.Request(url + "/v1/infer", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        with err:
            return err.code


# ----------------------------------------------------------------- PromQL names
# Words of PromQL that are not metric names: aggregation modifiers, set and
# vector-matching operators. Functions are recognised by the "(" after them.
_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
    "and", "or", "unless", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads.

    Label matchers ``{...}``, ranges ``[...]``, strings, Grafana variables and
    the label lists of ``by``/``without``/``on``/``ignoring`` are removed
    first; what is left that is an identifier not followed by ``(`` and not a
    keyword is a metric name.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\$\{?\w+\}?", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\boffset\s+-?\w+", "", text)
    text = re.sub(r"\b\d+(\.\d*)?([eE][+-]?\d+)?\b", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", text)
            exprs.append(inner.group(1) if inner else text)
    return exprs


def test_metric_names_parser_finds_names_and_only_names() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, instance) (rate(a_bucket{job="x", le!="1"}'
        "[$__rate_interval]))) / clamp_min(sum(rate(b_total[5m] offset 1h)), 1e-9) "
        "or on (instance) c > bool 2"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}


def test_dashboard_is_valid_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"]
    assert isinstance(dashboard["schemaVersion"], int)
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 15
    for panel in graphs:
        assert panel["targets"], panel["title"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            if "histogram_quantile" in target["expr"]:
                assert "_bucket" in target["expr"] and "by (le)" in target["expr"]


def grafana_to_promql(expr: str) -> str:
    """Substitute the dashboard's Grafana variables as Grafana would before querying."""
    for variable, value in (("$__rate_interval", "2m"), ("$__interval", "1m"), ("$agent", ".*")):
        expr = expr.replace(variable, value)
    return expr


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (apt-get install -y prometheus; .ci/run does)",
)
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Every expression is valid PromQL: promtool checks them as recording rules."""
    exprs = dashboard_exprs(json.loads(DASHBOARD.read_text()))
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(e)}
                    for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    checked = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{len(exprs)} rules found" in checked.stdout + checked.stderr
    # And it would say so if one were not.
    rules["groups"][0]["rules"][0]["expr"] = "sum by (le (rate(x[5m]))"
    path.write_text(json.dumps(rules))
    broken = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, check=False
    )
    assert broken.returncode != 0


def test_a_real_agent_and_controller_expose_what_the_dashboard_queries(
    tmp_path: Path, embedded_broker: BrokerSettings, database_url: str
) -> None:
    harness = Harness(tmp_path, embedded_broker, database_url)
    try:
        harness.register("1.0.0")
        harness.register_broken("2.0.0")
        harness.enroll("gw-metrics")
        agent = harness.start_agent(harness.agent_config("gw-metrics"))
        url = agent.server.url
        before = scrape_agent(url)
        assert value(before, "edgefleet_agent_installs_total") == 0
        assert value(before, "edgefleet_agent_model_loaded") == 0

        harness.deploy("1.0.0", "gw-metrics")
        harness.wait_active(agent, "1.0.0", timeout_s=60)
        harness.deploy("2.0.0", "gw-metrics")  # its smoke test fails on the device
        harness.wait_error("gw-metrics", "smoke_test_failed", timeout_s=60)
        for _ in range(5):
            assert infer(agent)["model"]["version"] == "1.0.0"
        assert post_raw(url, b"{nope") == 400

        # The agent's own counters, read back through its HTTP /metrics.
        wait_for(
            lambda: value(scrape_agent(url), "edgefleet_agent_install_failures_total") == 1,
            60,
            "the failed install to be counted",
        )
        agent_samples = scrape_agent(url)
        assert value(agent_samples, "edgefleet_agent_installs_total") == 1
        assert (
            value(
                agent_samples,
                "edgefleet_agent_install_failures_total",
                outcome="failed",
                code="smoke_test_failed",
            )
            == 1
        )
        assert (
            value(
                agent_samples,
                "edgefleet_agent_model_info",
                model=MODEL,
                version="1.0.0",
                variant="generic",
                precision="fp32",
                runtime="onnxruntime",
            )
            == 1
        )
        assert value(agent_samples, "edgefleet_agent_inference_requests_total") == 6
        assert value(agent_samples, "edgefleet_agent_inference_duration_seconds_count") == 5
        errors = "edgefleet_agent_inference_errors_total"
        assert value(agent_samples, errors, reason="bad_json") == 1
        assert value(agent_samples, "edgefleet_agent_info", device_id=agent.device_id) == 1
        assert value(agent_samples, "edgefleet_agent_resident_memory_bytes") > 1024 * 1024

        # The controller's collector, rendered as its /metrics renders it, once
        # the agent's telemetry is stored (the lag gauge exists only then).
        registry, timer = metrics_registry(harness.service)
        try:

            def controller() -> Samples:
                return parse(generate_latest(registry).decode())

            wait_for(
                lambda: "edgefleet_ingest_newest_telemetry_age_seconds" in controller(),
                60,
                "the controller to store telemetry",
            )
            controller_samples = controller()
        finally:
            timer.close()
        assert value(controller_samples, "edgefleet_fleet_devices") == 1
    finally:
        harness.close()

    exposed = set(agent_samples) | set(controller_samples)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = dashboard_exprs(dashboard)
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"expression reads no metric: {expr}"
        missing = names - exposed
        assert not missing, f"{expr!r} reads {sorted(missing)}, which no /metrics exposes"
        used |= names
    # Both sides are on the dashboard, with the latency histograms and RSS/CPU.
    for name in (
        "edgefleet_fleet_devices",
        "edgefleet_ingest_messages_total",
        "edgefleet_rejected_messages_total",
        "edgefleet_transfer_sent_bytes_total",
        "edgefleet_rollouts",
        "edgefleet_agent_inference_duration_seconds_bucket",
        "edgefleet_agent_inference_errors_total",
        "edgefleet_agent_resident_memory_bytes",
        "edgefleet_agent_cpu_seconds_total",
    ):
        assert name in used, f"the dashboard does not chart {name}"
