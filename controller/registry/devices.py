"""Devices: enrollment, the state each agent reports, and online status.

A device is enrolled before the controller accepts any of its messages. Its
hardware columns start empty and are filled from the agent's reports; the
whole last report is kept so fields this controller does not model yet are
not lost. ``online`` follows the status channel (with its last will) only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from edgefleet.controller.errors import DuplicateError, InvalidNameError, NotFoundError
from edgefleet.controller.registry import models as m
from edgefleet.controller.registry.catalog import GENERIC_HARDWARE_CLASS
from edgefleet.controller.registry.database import Database, require_text, rowcount
from edgefleet.controller.registry.deployments import retarget_desired
from edgefleet.controller.registry.dto import DeviceInfo, error_info
from edgefleet.protocols.messages import ReportedState
from edgefleet.protocols.topics import validate_device_id

__all__ = ["MAX_TAGS", "Devices", "device_info", "known_device_ids", "validate_tag"]

MAX_TAGS = 64
"""Tags one device may carry."""


def validate_tag(tag: str) -> str:
    """Check a tag: 1-64 printable characters, no whitespace or commas (selectors split on them).

    Raises:
        InvalidNameError: the tag is empty, too long, or has such a character.
    """
    if not isinstance(tag, str) or not 0 < len(tag) <= 64:
        raise InvalidNameError(f"a tag must be 1-64 characters, got {tag!r}")
    if any(c.isspace() or c == "," or not c.isprintable() for c in tag):
        raise InvalidNameError(f"a tag may not contain whitespace or commas, got {tag!r}")
    return tag


def device_info(row: m.Device) -> DeviceInfo:
    """The frozen view of a device row."""
    return DeviceInfo(
        id=row.id,
        hardware_class=row.hardware_class,
        arch=row.arch,
        cpu_features=tuple(row.cpu_features),
        runtimes=tuple(row.runtimes),
        tags=tuple(row.tags),
        online=row.online,
        last_seen=row.last_seen,
        enrolled_at=row.enrolled_at,
        state=row.state,
        active_model=row.active_model,
        active_version=row.active_version,
        active_release=row.active_release,
        last_error=error_info(row.last_error),
        reported=row.reported,
        profile=row.profile,
    )


def known_device_ids(s: Session, device_ids: set[str]) -> set[str]:
    """Which of ``device_ids`` are enrolled, in one query inside ``s``."""
    if not device_ids:
        return set()
    return set(s.scalars(sa.select(m.Device.id).where(m.Device.id.in_(device_ids))))


class Devices:
    """Enrolled devices and their reported state, on a shared :class:`Database`."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def enroll_device(
        self,
        device_id: str,
        *,
        hardware_class: str = GENERIC_HARDWARE_CLASS,
        tags: Sequence[str] = (),
    ) -> DeviceInfo:
        """Enroll a device so that the controller accepts its messages.

        Raises:
            TopicError: the id is not a valid device id (it becomes an MQTT
                topic level and a file name).
            DuplicateError: the device is enrolled already.
        """
        validate_device_id(device_id)
        require_text(hardware_class, "hardware class", 64)
        tags = list(dict.fromkeys(validate_tag(t) for t in tags))
        if len(tags) > MAX_TAGS:
            raise InvalidNameError(f"a device may carry at most {MAX_TAGS} tags")

        def work(s: Session) -> DeviceInfo:
            if s.get(m.Device, device_id) is not None:
                raise DuplicateError(f"device {device_id!r} is already enrolled")
            row = m.Device(
                id=device_id,
                hardware_class=hardware_class,
                arch="",
                cpu_features=[],
                runtimes=[],
                tags=tags,
                online=False,
            )
            s.add(row)
            s.flush()
            return device_info(row)

        # A concurrent enrollment of the same id loses the insert and, retried, is a duplicate.
        return self._db.write_retrying(work)

    def update_tags(
        self, device_id: str, *, add: Sequence[str] = (), remove: Sequence[str] = ()
    ) -> DeviceInfo:
        """Add and remove a device's tags in one transaction; returns the device after.

        Adding a tag it has, or removing one it lacks, changes nothing. Tags
        keep their order; new ones go last. Selectors (rollouts) read tags
        when they select, so a rollout that already chose its devices is not
        changed.

        Raises:
            NotFoundError: the device is not enrolled.
            InvalidNameError: a tag is invalid, a tag is both added and
                removed, or the device would carry more than :data:`MAX_TAGS`.
        """
        added = [validate_tag(t) for t in add]
        removed = {validate_tag(t) for t in remove}
        both = sorted(removed.intersection(added))
        if both:
            raise InvalidNameError(f"tag(s) both added and removed: {', '.join(both)}")

        def work(s: Session) -> DeviceInfo:
            row = s.get(m.Device, device_id, with_for_update=True)
            if row is None:
                raise NotFoundError(f"no device {device_id!r} is enrolled")
            tags = [t for t in row.tags if t not in removed]
            tags += [t for t in dict.fromkeys(added) if t not in tags]
            if len(tags) > MAX_TAGS:
                raise InvalidNameError(f"a device may carry at most {MAX_TAGS} tags")
            row.tags = tags  # a new list: the JSON column sees the change
            s.flush()
            return device_info(row)

        return self._db.write_retrying(work)

    def get_device(self, device_id: str) -> DeviceInfo | None:
        """Return a device, or ``None`` if it is not enrolled."""
        with self._db.read() as s:
            row = s.get(m.Device, device_id)
            return None if row is None else device_info(row)

    def list_devices(self) -> list[DeviceInfo]:
        """List all enrolled devices by id."""
        with self._db.read() as s:
            return [
                device_info(row) for row in s.scalars(sa.select(m.Device).order_by(m.Device.id))
            ]

    def page_devices(
        self,
        *,
        tag: str | None = None,
        profile: str | None = None,
        status: str | None = None,
        version: str | None = None,
        after: str | None = None,
        limit: int = 1000,
    ) -> tuple[list[DeviceInfo], str | None]:
        """One page of devices by id matching every filter given, and the cursor of the next.

        The filters and the page run in SQL (a fleet of 100,000 devices is
        not loaded to show 50). ``status`` is ``online``, ``offline`` or an
        agent state; ``version`` matches ``name@version`` or the bare
        version. A tag is matched in SQL on the JSON text of the tag list
        (a ``LIKE`` on the tag as JSON encodes it, quotes included, valid on
        SQLite and PostgreSQL alike) and then exactly in Python, since a tag
        can be a substring of another's escaped form; a page short of
        ``limit`` after that check reads on until it is full.
        """
        limit = max(1, limit)
        d = m.Device
        where: list[sa.ColumnElement[bool]] = []
        if profile is not None:
            where.append(d.profile == profile)
        if status == "online":
            where.append(d.online.is_(True))
        elif status == "offline":
            where.append(d.online.is_(False))
        elif status is not None:
            where.append(d.state == status)
        if version is not None:
            name, at, bare = version.rpartition("@")
            exact = d.active_version == version
            where.append(
                sa.or_(exact, sa.and_(d.active_model == name, d.active_version == bare))
                if at
                else exact
            )
        if tag is not None:
            pattern = json.dumps(tag)
            for c in ("\\", "%", "_"):
                pattern = pattern.replace(c, "\\" + c)
            where.append(sa.cast(d.tags, sa.Text).like(f"%{pattern}%", escape="\\"))
        found: list[DeviceInfo] = []
        cursor = after
        with self._db.read() as s:
            while len(found) <= limit:
                query = sa.select(d).where(*where).order_by(d.id).limit(limit + 1)
                if cursor is not None:
                    query = query.where(d.id > cursor)
                rows = list(s.scalars(query))
                found += [device_info(r) for r in rows if tag is None or tag in (r.tags or [])]
                if len(rows) <= limit:
                    break
                cursor = rows[-1].id
        page = found[:limit]
        return page, (page[-1].id if len(found) > limit else None)

    def record_reported(self, reported: ReportedState, *, profile: str | None = None) -> bool:
        """Store a device's reported state.

        Updates hardware, agent state, active model, last error and last-seen
        time, and keeps the whole report. It does not touch ``online``: brokers
        replay retained reports of devices that are long gone, so only the
        status channel (with its last will) says whether a device is online.

        When ``profile`` (matched by the controller from the reported
        hardware) differs from the stored one and the device's desired bundle
        is no longer the best fit among its model version's bundles, the
        desired state is re-targeted (new generation, unpublished): a device
        deployed to before it ever reported gets its own variant, not the
        generic fallback. Both happen in one transaction.

        Returns:
            ``False``, writing nothing, if the device is not enrolled.
        """
        with self._db.write() as s:
            row = s.get(m.Device, reported.device_id)
            if row is None:
                return False
            stored_at = (row.reported or {}).get("updated_at")
            if isinstance(stored_at, int | float) and reported.updated_at < stored_at:
                # An older report arriving late (several controllers share the
                # ingestion, or the broker replayed a retained one) must not
                # overwrite a newer state; the agent stamps every report.
                return True
            hardware = reported.hardware
            profile_changed = (
                profile is not None and profile != row.profile
            ) or hardware.hardware_class != row.hardware_class
            row.hardware_class = hardware.hardware_class
            if profile is not None:
                row.profile = profile
            row.arch = hardware.arch
            row.cpu_features = list(hardware.cpu_features)
            row.runtimes = list(hardware.runtimes)
            row.state = reported.state.value
            active = reported.active
            row.active_model = None if active is None else active.name
            row.active_version = None if active is None else active.version
            row.active_release = None if active is None else active.release
            row.last_error = None if reported.last_error is None else reported.last_error.to_dict()
            row.reported = json.loads(reported.encode())
            row.last_seen = m.utcnow()
            if profile_changed:
                retarget_desired(s, row)
            return True

    def set_online(self, device_id: str, online: bool) -> bool:
        """Record a device's connection status; going online also counts as seen.

        Returns:
            ``False`` if the device is not enrolled.
        """
        values: dict[str, Any] = {"online": online}
        if online:
            values["last_seen"] = m.utcnow()
        with self._db.write() as s:
            result = s.execute(sa.update(m.Device).where(m.Device.id == device_id).values(values))
            return bool(rowcount(result))
