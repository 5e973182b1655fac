"""What the management API costs on top of the registry, and what a /metrics scrape costs.

A fleet of ``--devices`` enrolled devices (SQLite in a temporary directory,
or PostgreSQL with ``--database-url``), a real controller on an embedded
broker, and the API on a free port. Measured, each ``--rounds`` times, median:

- baseline: the registry calls ``GET /api/v1/devices`` makes, in process
  (``list_devices`` + ``device_summaries``);
- ``GET /api/v1/devices`` over real HTTP (auth, filtering, JSON included),
  interleaved with the baseline round by round;
- ``GET /metrics`` over real HTTP (the collector's queries included);
- ``GET /api/v1/fleet`` over real HTTP.

The ratio to the baseline is what the API adds. Run::

    python bench/api_reads.py --devices 2000 --rounds 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import _common

from edgefleet.controller.api.server import start_api
from edgefleet.controller.broker import EmbeddedBroker
from edgefleet.controller.config import ApiSettings, ServiceSettings
from edgefleet.controller.registry import Registry
from edgefleet.controller.registry.tokens import TokenStore
from edgefleet.controller.service import ControllerService
from edgefleet.controller.trust import TrustRepository
from edgefleet.shared.link import BrokerSettings


def _median_s(work: object, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        work()  # type: ignore[operator]
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'registry.db'}"
        registry = Registry(url)
        for i in range(args.devices):
            registry.enroll_device(f"bench-{i:06d}", tags=["lab" if i % 2 else "shop"])
        service = ControllerService(
            registry,
            TrustRepository.init(Path(tmp) / "repository"),
            BrokerSettings(host=broker.host, port=broker.port),
            ServiceSettings(client_id="bench-api"),
        )
        service.start()
        server = start_api(service, ApiSettings(address="127.0.0.1:0"))
        token = TokenStore(registry.database).create("bench", "viewer").token
        try:

            def get(path: str) -> bytes:
                request = urllib.request.Request(  # noqa: S310 - our own server's http URL
                    server.url + path, headers={"Authorization": f"Bearer {token}"}
                )
                with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
                    body: bytes = response.read()
                    return body

            listed = json.loads(get("/api/v1/devices"))["devices"]
            assert len(listed) == args.devices, len(listed)

            def direct() -> None:
                registry.list_devices()
                registry.device_summaries()

            # Interleaved round by round, so load from other processes on a
            # shared machine falls on both sides of the ratio alike.
            base_t: list[float] = []
            devices_t: list[float] = []
            for _ in range(args.rounds):
                base_t.append(_median_s(direct, 1))
                devices_t.append(_median_s(lambda: get("/api/v1/devices"), 1))
            baseline = statistics.median(base_t)
            devices = statistics.median(devices_t)
            metrics = _median_s(lambda: get("/metrics"), args.rounds)
            fleet = _median_s(lambda: get("/api/v1/fleet"), args.rounds)
        finally:
            server.stop()
            service.stop()
            registry.close()

    print(_common.machine_line())
    print(f"{args.devices} devices, {url.split(':', 1)[0]}, median of {args.rounds}")
    print(f"baseline (registry, in process)   {baseline * 1000:8.1f} ms")
    print(
        f"GET /api/v1/devices (HTTP)        {devices * 1000:8.1f} ms  "
        f"x{devices / baseline:.2f} of baseline"
    )
    print(f"GET /metrics (HTTP)               {metrics * 1000:8.1f} ms")
    print(f"GET /api/v1/fleet (HTTP)          {fleet * 1000:8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
