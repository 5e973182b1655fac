"""Which devices a rollout targets: ids, tags (groups, ADR 0004), profiles, or all.

A :class:`Selector` is stored with its rollout as JSON. A selection by tag,
profile or ``all`` is *dynamic*: devices enrolled or re-tagged later join the
rollout (continuous deployment).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from edgefleet.controller.rollout.errors import RolloutError

__all__ = ["Selector"]


@dataclass(frozen=True)
class Selector:
    """Which devices a rollout targets: any of these ids, tags or profiles, or all.

    Tags serve as groups. A selection by tag, profile or ``all`` is
    *dynamic*: devices enrolled or re-tagged later join the rollout.
    Matching says nothing about eligibility: the store leaves out (and logs
    as ``skipped``) a matching device no bundle of the version fits, e.g. one
    without the bundles' runtime, and a dynamic rollout takes it in once one does.
    """

    devices: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    profiles: tuple[str, ...] = ()
    all: bool = False

    def __post_init__(self) -> None:
        if not (self.devices or self.tags or self.profiles or self.all):
            raise RolloutError("select devices: give device ids, tags, profiles or all")
        if self.all and (self.devices or self.tags or self.profiles):
            raise RolloutError("'all' cannot be combined with device ids, tags or profiles")

    @property
    def dynamic(self) -> bool:
        return self.all or bool(self.tags or self.profiles)

    def matches(self, device_id: str, tags: Iterable[str], profile: str | None) -> bool:
        if self.all or device_id in self.devices:
            return True
        if profile is not None and profile in self.profiles:
            return True
        return any(t in self.tags for t in tags)

    def to_dict(self) -> dict[str, Any]:
        return {
            "devices": list(self.devices),
            "tags": list(self.tags),
            "profiles": list(self.profiles),
            "all": self.all,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Selector:
        return cls(
            devices=tuple(d.get("devices", ())),
            tags=tuple(d.get("tags", ())),
            profiles=tuple(d.get("profiles", ())),
            all=bool(d.get("all", False)),
        )

    def describe(self) -> str:
        if self.all:
            return "all devices"
        parts = []
        if self.devices:
            parts.append("devices " + ", ".join(self.devices))
        if self.tags:
            parts.append("tags " + ", ".join(self.tags))
        if self.profiles:
            parts.append("profiles " + ", ".join(self.profiles))
        return "; ".join(parts)
