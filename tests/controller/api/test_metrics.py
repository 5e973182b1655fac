"""``/metrics`` on a real controller: fleet counts by bounded labels, ingest, rollouts."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from edgefleet.protocols.messages import AgentState
from edgefleet.protocols.topics import Channel, DeviceTopic
from edgefleet.shared.link import mqtt_links
from tests.controller.api.conftest import ApiFixture
from tests.controller.registry.builders import make_report, make_telemetry
from tests.e2e.harness import MODEL, wait_for


def _scrape(api: ApiFixture) -> dict[str, list[tuple[dict[str, str], float]]]:
    reply = api.client.get("/metrics", api.viewer)
    assert reply.status == 200, reply
    assert reply.headers["content-type"].startswith("text/plain")
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(reply.body):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def _value(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    return sum(
        v for ls, v in samples.get(name, []) if all(ls.get(k) == x for k, x in labels.items())
    )


def test_metrics_count_the_fleet_without_device_labels(api: ApiFixture) -> None:
    h = api.harness
    reg = h.registry
    ids = [h.device_id(n) for n in ("m1", "m2", "m3")]
    for device_id in ids:
        reg.enroll_device(device_id)
    reg.record_reported(make_report(ids[0]), profile="generic")
    reg.record_reported(make_report(ids[1], state=AgentState.FAILED), profile="generic")
    reg.set_online(ids[0], True)

    samples = _scrape(api)
    devices = samples["edgefleet_fleet_devices"]
    assert sum(v for _, v in devices) == 3
    assert _value(samples, "edgefleet_fleet_devices", online="true") == 1
    assert _value(samples, "edgefleet_fleet_devices", state="failed", profile="generic") == 1
    assert _value(samples, "edgefleet_fleet_devices", state="", profile="") == 1
    # Bounded labels only: no sample anywhere names a device.
    text = api.client.get("/metrics", api.viewer).body
    assert not any(device_id in text for device_id in ids)
    assert _value(samples, "edgefleet_controller_info") == 1
    assert "edgefleet_ingest_newest_telemetry_age_seconds" not in samples  # nothing stored yet
    reg.add_telemetry([make_telemetry(ids[0], 10, p50=1.0)])
    age = _value(_scrape(api), "edgefleet_ingest_newest_telemetry_age_seconds")
    assert 0 <= age < 60
    assert _value(samples, "edgefleet_database_query_duration_seconds_count") > 0


def test_metrics_follow_ingest_rejections_and_rollouts(api: ApiFixture) -> None:
    h = api.harness
    device_id = h.enroll("metered")
    before = _scrape(api)
    # The broker is shared by the session and keeps other tests' retained
    # messages, so strangers may have been counted already: count from here.
    strangers = _value(before, "edgefleet_rejected_messages_total", reason="unknown_device")

    link = mqtt_links(h.broker)(f"metrics-test-{h.token}")
    link.start(wait=True)
    try:
        stranger = DeviceTopic(f"stranger-{h.token}", Channel.STATUS)
        link.publish(str(stranger), b"online", qos=1, wait_s=5)
        mine = DeviceTopic(device_id, Channel.STATUS)
        link.publish(str(mine), b"online", qos=1, wait_s=5)
    finally:
        link.stop()
    wait_for(
        lambda: (
            _value(_scrape(api), "edgefleet_rejected_messages_total", reason="unknown_device")
            >= strangers + 1
        ),
        20,
        "the stranger's message to be counted",
    )
    wait_for(lambda: h.summary("metered").online, 20, "the device to be online")
    after = _scrape(api)
    ingested = _value(after, "edgefleet_ingest_messages_total")
    assert ingested >= _value(before, "edgefleet_ingest_messages_total") + 2
    assert _value(after, "edgefleet_ingest_queue_messages") >= 0

    h.register("1.0")
    created = api.client.post(
        "/api/v1/rollouts",
        api.operator,
        {"model": MODEL, "version": "1.0", "selector": {"devices": [device_id]}, "start": False},
    )
    assert created.status == 201, created
    samples = _scrape(api)
    assert _value(samples, "edgefleet_rollouts", status="created") == 1
    assert _value(samples, "edgefleet_rollout_decisions_total", kind="created") == 1
    api.client.post(f"/api/v1/rollouts/{created.body['id']}/abort", api.operator)
    samples = _scrape(api)
    assert _value(samples, "edgefleet_rollouts", status="created") == 0
    assert _value(samples, "edgefleet_rollouts", status="aborted") == 1
    assert _value(samples, "edgefleet_rollout_decisions_total", kind="aborted") == 1
    assert "edgefleet_transfer_sent_bytes_total" in samples
