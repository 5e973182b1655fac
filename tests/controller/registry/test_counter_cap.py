"""The per-device counter-row cap (``[service] max_counter_rows_per_device``, issue 9 item 6).

Per-device counters are ``<family><device>.<reason>``. The reasons are fixed
sets in code, and the cap makes sure that stays true whatever a future code
path names a reason after: beyond it, bumps go to the device's ``other`` row
and cumulative totals are dropped, both counted as ``rejected.counter_cap``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.controller.config import ServiceSettings, load_controller_config
from edgefleet.controller.registry import Registry
from edgefleet.protocols.errors import ConfigError


def rows_of(registry: Registry, stem: str) -> dict[str, int]:
    return {n: v for n, v in registry.counters().items() if n.startswith(stem)}


def test_bumps_beyond_the_cap_go_to_the_devices_other_row(registry: Registry) -> None:
    registry.limit_device_counters(4)
    for i in range(10):
        registry.bump_counter(f"device_rejected.gw-1.reason_{i}", 2)
    registry.bump_counter("device_rejected.gw-1.reason_0")  # an existing row still counts
    assert rows_of(registry, "device_rejected.gw-1.") == {
        "device_rejected.gw-1.reason_0": 3,
        "device_rejected.gw-1.reason_1": 2,
        "device_rejected.gw-1.reason_2": 2,
        "device_rejected.gw-1.other": 14,  # 7 folded names x 2: no count is lost
    }
    assert registry.counters()["rejected.counter_cap"] == 7
    # The cap is per device and family: another device, another family are untouched.
    registry.bump_counter("device_rejected.gw-2.reason_9")
    registry.bump_counter("transfer_refused.gw-1.rate")
    assert registry.counters()["device_rejected.gw-2.reason_9"] == 1
    assert registry.counters()["transfer_refused.gw-1.rate"] == 1
    # A device id that extends another's is a different device.
    registry.bump_counter("device_rejected.gw-10.reason_1")
    assert registry.counters()["device_rejected.gw-10.reason_1"] == 1
    # Fleet-wide counters are not per-device: never capped.
    for i in range(10):
        registry.bump_counter(f"rejected.reason_{i}")
    assert sum(1 for n in registry.counters() if n.startswith("rejected.reason_")) == 10


def test_cumulative_totals_beyond_the_cap_are_dropped_and_counted(registry: Registry) -> None:
    registry.limit_device_counters(3)
    registry.set_counters({f"agent_rejected.gw-1.r{i}": 10 + i for i in range(5)})
    assert rows_of(registry, "agent_rejected.gw-1.") == {
        "agent_rejected.gw-1.r0": 10,
        "agent_rejected.gw-1.r1": 11,
    }
    assert registry.counters()["rejected.counter_cap"] == 3
    registry.set_counters({"agent_rejected.gw-1.r1": 20, "agent_rejected.gw-1.other": 5})
    assert rows_of(registry, "agent_rejected.gw-1.") == {
        "agent_rejected.gw-1.r0": 10,
        "agent_rejected.gw-1.r1": 20,
        "agent_rejected.gw-1.other": 5,  # room is always kept for `other`
    }


def test_the_default_cap_leaves_room_for_every_reason_the_code_names(registry: Registry) -> None:
    """The cap is a second line: with the default, no real reason is ever folded."""
    from edgefleet.controller.transfer import RefusalReason
    from edgefleet.protocols.bounds import KNOWN_REJECTION_REASONS
    from edgefleet.protocols.topics import Channel

    assert ServiceSettings().max_counter_rows_per_device == 32
    registry.limit_device_counters(ServiceSettings().max_counter_rows_per_device)
    controller_reasons = [f"malformed_{c.name.lower()}" for c in Channel]
    controller_reasons += ["clock_skew", "event_cap"]
    for reason in controller_reasons:
        registry.bump_counter(f"device_rejected.gw-1.{reason}")
    for refusal in RefusalReason:
        registry.bump_counter(f"transfer_refused.gw-1.{refusal.value}")
    registry.set_counters({f"agent_rejected.gw-1.{r}": 1 for r in KNOWN_REJECTION_REASONS})
    assert "rejected.counter_cap" not in registry.counters()


@pytest.mark.parametrize("bad", [0, 1, -5, 10_001, 2.5, "32", True])
def test_bad_caps_are_refused(registry: Registry, bad: object, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_counter_rows_per_device"):
        ServiceSettings(max_counter_rows_per_device=bad)  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError)):
        registry.limit_device_counters(bad)  # type: ignore[arg-type]
    config = tmp_path / "controller.toml"
    config.write_text(f"[service]\nmax_counter_rows_per_device = {bad!r}\n".replace("True", "true"))
    with pytest.raises(ConfigError, match="max_counter_rows_per_device"):
        load_controller_config(config)


def test_the_cap_is_read_from_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "controller.toml"
    config.write_text("[service]\nmax_counter_rows_per_device = 8\n")
    assert load_controller_config(config).service.max_counter_rows_per_device == 8


def test_the_service_applies_the_configured_cap(tmp_path: Path) -> None:
    from edgefleet.controller.service import ControllerService
    from edgefleet.controller.trust import TrustRepository
    from edgefleet.shared.link import BrokerSettings
    from edgefleet.shared.memlink import MemoryBroker

    broker = MemoryBroker()
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    try:
        ControllerService(
            registry,
            TrustRepository.init(tmp_path / "repository"),
            BrokerSettings(),  # unused: the links come from the in-memory broker
            ServiceSettings(max_counter_rows_per_device=2),
            links=broker.link,
        )
        for reason in ("a", "b", "c"):
            registry.bump_counter(f"transfer_refused.gw-1.{reason}")
        assert rows_of(registry, "transfer_refused.gw-1.") == {
            "transfer_refused.gw-1.a": 1,
            "transfer_refused.gw-1.other": 2,
        }
    finally:
        broker.close()
        registry.close()
