"""Operator actions on the running controller that report what really happened.

The management API (and later the CLI as its client) deploys through the
running :class:`~edgefleet.controller.service.ControllerService`, so the
desired state is published by the process that holds the broker connection.
:func:`deploy_and_confirm` then waits, up to a bound, until the outbox has
published each device's new generation, and says per device whether it did:
a deployment is never reported as sent when it was only recorded.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgefleet.controller.errors import RegistryError
from edgefleet.controller.registry import DeploymentInfo, Registry

if TYPE_CHECKING:
    from edgefleet.controller.service import ControllerService

__all__ = ["DeployOutcome", "DeviceOutcome", "deploy_and_confirm", "select_devices"]

# How often the outbox is checked while waiting for publication.
_POLL_S = 0.05


@dataclass(frozen=True)
class DeviceOutcome:
    """What a deployment did for one device."""

    device_id: str
    generation: int
    bundle_target: str
    published: bool


@dataclass(frozen=True)
class DeployOutcome:
    """A recorded deployment and, per device, whether its desired state was published."""

    deployment: DeploymentInfo
    devices: tuple[DeviceOutcome, ...]

    @property
    def all_published(self) -> bool:
        return all(d.published for d in self.devices)


def select_devices(
    registry: Registry,
    *,
    devices: Sequence[str] = (),
    tags: Sequence[str] = (),
    all_devices: bool = False,
) -> list[str]:
    """The ids of the named devices, plus those carrying any of ``tags``, or all.

    Raises:
        RegistryError: nothing was selected, or ``all`` was combined with a selection.
    """
    if all_devices and (devices or tags):
        raise RegistryError("'all' cannot be combined with device ids or tags")
    if not (all_devices or devices or tags):
        raise RegistryError("select devices: give device ids, tags or all")
    chosen: dict[str, None] = dict.fromkeys(devices)
    if all_devices or tags:
        wanted = set(tags)
        for device in registry.list_devices():
            if all_devices or wanted.intersection(device.tags):
                chosen.setdefault(device.id, None)
    if not chosen:
        raise RegistryError(f"no device carries any of the tags {', '.join(sorted(tags))}")
    return list(chosen)


def deploy_and_confirm(
    service: ControllerService,
    model: str,
    version: str,
    device_ids: Sequence[str],
    *,
    wait_s: float = 5.0,
) -> DeployOutcome:
    """Deploy through the running service and wait up to ``wait_s`` for publication.

    Raises:
        NotFoundError: the model version or a device does not exist.
        NoMatchingBundleError: a device has no fitting bundle.
        RegistryError: no devices were given.
    """
    deployment = service.deploy(model, version, device_ids)
    wanted = {t.device_id: t.generation for t in deployment.targets}
    deadline = time.monotonic() + max(0.0, wait_s)
    while True:
        pending = {
            d.device_id
            for d in service.registry.unpublished_desired()
            if d.device_id in wanted and d.generation <= wanted[d.device_id]
        }
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(_POLL_S)
    return DeployOutcome(
        deployment=deployment,
        devices=tuple(
            DeviceOutcome(
                device_id=t.device_id,
                generation=t.generation,
                bundle_target=t.model.target,
                published=t.device_id not in pending,
            )
            for t in deployment.targets
        ),
    )
