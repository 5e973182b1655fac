"""GET /api/v1/devices filters and pages in SQL: tags that look like LIKE wildcards or
substrings of other tags' JSON, and pages that the exact tag check thins out."""

from __future__ import annotations

from edgefleet.controller.registry.devices import Devices
from tests.controller.api.conftest import ApiFixture


def test_tag_filter_is_exact_whatever_the_tag(api: ApiFixture) -> None:
    h = api.harness
    tags = {
        "d-pct": ["a%b"],
        "d-any": ["aXb"],  # would match a%b or a_b as LIKE wildcards
        "d-und": ["a_b"],
        "d-quote": ['x"lab'],  # its JSON, "x\"lab", contains "lab" as a substring... of quotes
        "d-lab": ["lab"],
        "d-slash": ["c\\d"],
        "d-none": [],
    }
    for device, device_tags in tags.items():
        h.registry.enroll_device(device, tags=device_tags)

    def ids(tag: str) -> list[str]:
        from urllib.parse import quote

        reply = api.client.get(f"/api/v1/devices?tag={quote(tag, safe='')}", api.viewer)
        assert reply.status == 200, reply
        return [d["id"] for d in reply.body["devices"]]

    for device, device_tags in tags.items():
        for tag in device_tags:
            assert ids(tag) == [device], tag
    assert ids("lab") == ["d-lab"]
    assert ids("a") == [] and ids("%") == [] and ids("_") == []


def test_pages_stay_full_when_the_exact_check_drops_rows(api: ApiFixture) -> None:
    registry = api.harness.registry
    # Every device's tag list contains the text "t" inside another tag's JSON,
    # so SQL's LIKE passes them all; only every third really carries "t".
    for n in range(30):
        registry.enroll_device(f"dev-{n:02d}", tags=["t"] if n % 3 == 0 else ['t"'])
    devices = Devices(registry.database)
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        page, after = devices.page_devices(tag="t", after=after, limit=3)
        pages += 1
        assert len(page) == 3 or after is None
        seen += [d.id for d in page]
        if after is None:
            break
    assert seen == [f"dev-{n:02d}" for n in range(0, 30, 3)]
    assert pages == 4
    # The route pages the same way.
    first = api.client.get("/api/v1/devices?tag=t&limit=4", api.viewer).body
    assert [d["id"] for d in first["devices"]] == seen[:4] and first["next"] == seen[3]
    rest = api.client.get(f"/api/v1/devices?tag=t&limit=100&after={first['next']}", api.viewer)
    assert [d["id"] for d in rest.body["devices"]] == seen[4:] and rest.body["next"] is None
