"""Named counters: bumps, and no lost counts under concurrency."""

from __future__ import annotations

import threading

from edgefleet.controller.registry import Registry


def test_counters(registry: Registry) -> None:
    assert registry.counters() == {}
    registry.bump_counter("rejected.bad_json")
    registry.bump_counter("rejected.bad_json", 4)
    registry.bump_counter("blocks.served", 2)
    assert registry.counters() == {"blocks.served": 2, "rejected.bad_json": 5}
    assert registry.fleet_status().counters == {"blocks.served": 2, "rejected.bad_json": 5}


def test_concurrent_counter_bumps_are_not_lost(registry: Registry) -> None:
    def bump() -> None:
        for _ in range(20):
            registry.bump_counter("hits")

    threads = [threading.Thread(target=bump) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert registry.counters() == {"hits": 100}
