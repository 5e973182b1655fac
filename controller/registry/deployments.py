"""Deployments and the desired-state outbox.

A deployment points each of its devices' desired state at the bundle chosen
for it (:func:`pick_bundle`) and bumps the device's *generation*. The
``desired_states`` table is also the outbox: ``published_generation`` trails
``generation`` until the service has published the state (retained) to the
broker, so a deploy made while the broker was down is sent later and a
restarted controller re-sends exactly what is missing.

The functions that work inside a caller's session (:func:`pick_bundle`,
:func:`assign_desired`, :func:`retarget_desired`) are shared with the device
ingest (a newly reported profile re-targets the desired bundle) and with the
rollout store, so every path chooses bundles and bumps generations the same way.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from edgefleet.controller.errors import NoMatchingBundleError, NotFoundError, RegistryError
from edgefleet.controller.registry import models as m
from edgefleet.controller.registry.catalog import GENERIC_HARDWARE_CLASS
from edgefleet.controller.registry.database import Database
from edgefleet.controller.registry.dto import DeploymentInfo, DeploymentTargetInfo
from edgefleet.protocols.messages import DesiredState, ModelRef

__all__ = [
    "DEPLOYMENT_ACTIVE",
    "Deployments",
    "Outbox",
    "assign_desired",
    "model_ref",
    "no_bundle_reason",
    "pick_bundle",
    "retarget_desired",
    "runtime_mismatch",
]

DEPLOYMENT_ACTIVE = "active"


def _runs_on(device: m.Device, bundle: m.Bundle) -> bool:
    """Whether ``device`` has ``bundle``'s runtime; unknown while it reported none."""
    return not device.runtimes or bundle.runtime in device.runtimes


def pick_bundle(device: m.Device, bundles: Sequence[m.Bundle]) -> m.Bundle | None:
    """Choose the bundle for a device: its matched profile, its own class, else generic.

    Once the device has reported its runtimes, a bundle for a runtime it
    lacks is never chosen: the search falls through profile, class and
    ``generic`` to the first one with a runtime it has, and returns ``None``
    when there is none (:func:`no_bundle_reason` says why). An empty
    runtimes list means "not reported yet" (a device that has not sent its
    hardware, or an agent without any runtime, which refuses every bundle
    itself with ``unsupported_runtime``); then the class order alone decides,
    preferring nothing. Ties go to the oldest bundle, so the choice is stable
    across deployments.
    """
    for hardware_class in (device.profile, device.hardware_class, GENERIC_HARDWARE_CLASS):
        if hardware_class is None:
            continue
        candidates = [
            b for b in bundles if b.hardware_class == hardware_class and _runs_on(device, b)
        ]
        if candidates:
            return min(candidates, key=lambda b: b.id)
    return None


def runtime_mismatch(device: m.Device, bundles: Sequence[m.Bundle]) -> str | None:
    """``no bundle for runtimes [tflite] (...)`` when runtimes alone rule ``bundles`` out.

    That is: the device reported its runtimes, and bundles of its profile,
    class or ``generic`` exist, but none for a runtime it has. ``None``
    otherwise (a bundle fits, or none exists for its hardware at all).
    """
    if not device.runtimes or pick_bundle(device, bundles) is not None:
        return None
    classes = {c for c in (device.profile, device.hardware_class, GENERIC_HARDWARE_CLASS) if c}
    fitting = sorted({b.runtime for b in bundles if b.hardware_class in classes})
    if not fitting:
        return None
    return (
        f"no bundle for runtimes [{', '.join(device.runtimes)}]"
        f" (it has bundles for: {', '.join(fitting)})"
    )


def no_bundle_reason(device: m.Device, bundles: Sequence[m.Bundle]) -> str:
    """Why :func:`pick_bundle` finds nothing for ``device`` among ``bundles``, for operators.

    The runtime reason of :func:`runtime_mismatch` when that is why, else
    ``no bundle for hardware class <class>``.
    """
    return runtime_mismatch(device, bundles) or (
        f"no bundle for hardware class {device.hardware_class}"
    )


def model_ref(model: m.Model, version: m.ModelVersion, bundle: m.Bundle) -> ModelRef:
    """The model reference a desired state carries for ``bundle``."""
    # A re-issued bundle carries its own, newer release (see models.Bundle).
    release = version.release if bundle.release is None else bundle.release
    return ModelRef(
        name=model.name, version=version.version, release=release, target=bundle.target_path
    )


def assign_desired(
    s: Session,
    deployment_id: str,
    version: m.ModelVersion,
    chosen: Mapping[str, m.Bundle],
    now: datetime,
) -> list[DeploymentTargetInfo]:
    """Point each device's desired state at its chosen bundle, inside ``s``.

    Bumps every device's generation and records a deployment target. The
    caller must have created the deployment row and locked the device rows;
    :meth:`Deployments.create_deployment` and the rollout store share this.
    """
    ids = sorted(chosen)
    desired = {
        d.device_id: d
        for d in s.scalars(
            sa.select(m.DesiredStateRecord).where(m.DesiredStateRecord.device_id.in_(ids))
        )
    }
    targets: list[DeploymentTargetInfo] = []
    for device_id in ids:
        bundle = chosen[device_id]
        record = desired.get(device_id)
        if record is None:
            record = m.DesiredStateRecord(device_id=device_id, generation=0, published_generation=0)
            s.add(record)
        record.generation += 1
        record.deployment_id = deployment_id
        record.bundle_id = bundle.id
        record.updated_at = now
        s.add(
            m.DeploymentTarget(
                deployment_id=deployment_id,
                device_id=device_id,
                bundle_id=bundle.id,
                generation=record.generation,
            )
        )
        targets.append(
            DeploymentTargetInfo(
                device_id=device_id,
                generation=record.generation,
                model=model_ref(version.model, version, bundle),
                bundle_id=bundle.id,
            )
        )
    return targets


def retarget_desired(s: Session, device: m.Device) -> bool:
    """Point the device's desired state at the best bundle of the same version, inside ``s``.

    Called when a device's reported hardware (or matched profile) changed: a
    device deployed to before it ever reported gets its own variant, not the
    generic fallback. Returns whether the desired state changed.
    """
    record = s.get(m.DesiredStateRecord, device.id)
    if record is None or record.bundle_id is None:
        return False
    current = s.get(m.Bundle, record.bundle_id)
    if current is None:
        return False
    bundles = list(
        s.scalars(
            sa.select(m.Bundle)
            .where(
                m.Bundle.model_version_id == current.model_version_id,
                # Stay on the same release: moving a device from a
                # re-issue back to the original bundle would go backwards.
                m.Bundle.release.is_(None)
                if current.release is None
                else m.Bundle.release == current.release,
            )
            .order_by(m.Bundle.id)
        )
    )
    best = pick_bundle(device, bundles)
    if best is None or best.id == current.id:
        return False
    record.generation += 1
    record.bundle_id = best.id
    record.updated_at = m.utcnow()
    if record.deployment_id is not None:
        target = s.get(m.DeploymentTarget, (record.deployment_id, device.id))
        if target is not None:
            target.bundle_id = best.id
            target.generation = record.generation
    return True


class Deployments:
    """Operator deployments of a model version to devices, on a shared :class:`Database`."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def create_deployment(self, model_version_id: int, device_ids: Sequence[str]) -> DeploymentInfo:
        """Deploy a model version to devices, all or nothing.

        For each device the bundle of its own hardware class is chosen, else a
        ``generic`` one, never one for a runtime it reported lacking
        (:func:`pick_bundle`); the device's desired-state generation is bumped and
        points at the deployment and bundle. Device rows are locked in id order
        so concurrent deployments to overlapping devices serialize instead of
        deadlocking or losing a generation; ingest is not blocked by that lock.

        Raises:
            RegistryError: no devices were given.
            NotFoundError: the model version or some devices do not exist.
            NoMatchingBundleError: some devices have no fitting bundle; the
                message names them with their hardware classes and why (for
                example ``no bundle for runtimes [tflite]``).
        """
        ids = list(dict.fromkeys(device_ids))
        if not ids:
            raise RegistryError("a deployment needs at least one device")
        with self._db.write() as s:
            version = s.get(m.ModelVersion, model_version_id)
            if version is None:
                raise NotFoundError(f"model version id {model_version_id} does not exist")
            devices = {
                d.id: d
                for d in s.scalars(
                    sa.select(m.Device)
                    .where(m.Device.id.in_(ids))
                    .order_by(m.Device.id)
                    # FOR NO KEY UPDATE on PostgreSQL: a plain FOR UPDATE would
                    # conflict with the FOR KEY SHARE locks that foreign-key
                    # checks of concurrent ingest batches take on these rows,
                    # and deadlock against them.
                    .with_for_update(key_share=True)
                )
            }
            missing = [i for i in ids if i not in devices]
            if missing:
                raise NotFoundError(f"unknown devices: {', '.join(missing)}")
            bundles = list(
                s.scalars(
                    sa.select(m.Bundle)
                    # Re-issues (rollbacks) are chosen by the rollout engine only.
                    .where(
                        m.Bundle.model_version_id == model_version_id,
                        m.Bundle.reissue_of.is_(None),
                    )
                    .order_by(m.Bundle.id)
                )
            )
            chosen: dict[str, m.Bundle] = {}
            unmatched: list[str] = []
            for device_id in ids:
                bundle = pick_bundle(devices[device_id], bundles)
                if bundle is None:
                    entry = f"{device_id} ({devices[device_id].hardware_class})"
                    why = runtime_mismatch(devices[device_id], bundles)
                    unmatched.append(entry if why is None else f"{entry}: {why}")
                else:
                    chosen[device_id] = bundle
            if unmatched:
                available = sorted({b.hardware_class for b in bundles}) or ["none"]
                raise NoMatchingBundleError(
                    f"{version.model.name}@{version.version} has no bundle for devices"
                    f" {'; '.join(unmatched)}; it has bundles for: {', '.join(available)}"
                )

            now = m.utcnow()
            deployment = m.Deployment(
                id=uuid.uuid4().hex,
                model_version_id=model_version_id,
                created_at=now,
                status=DEPLOYMENT_ACTIVE,
            )
            s.add(deployment)
            s.flush()  # the desired states and targets reference it
            targets = assign_desired(s, deployment.id, version, chosen, now)
            return DeploymentInfo(
                id=deployment.id,
                model_version_id=model_version_id,
                model=version.model.name,
                version=version.version,
                release=version.release,
                created_at=now,
                status=deployment.status,
                # Same order as get_deployment, so both describe it identically.
                targets=tuple(sorted(targets, key=lambda t: t.device_id)),
            )

    @staticmethod
    def _infos(s: Session, deployments: Sequence[m.Deployment]) -> list[DeploymentInfo]:
        """Build infos for deployments with one query for all their targets."""
        if not deployments:
            return []
        ids = [d.id for d in deployments]
        rows = s.execute(
            sa.select(m.DeploymentTarget, m.Bundle)
            .join(m.Bundle, m.Bundle.id == m.DeploymentTarget.bundle_id)
            .where(m.DeploymentTarget.deployment_id.in_(ids))
            .order_by(m.DeploymentTarget.device_id)
        ).all()
        versions = {
            v.id: v
            for v in s.scalars(
                sa.select(m.ModelVersion).where(
                    m.ModelVersion.id.in_({d.model_version_id for d in deployments})
                )
            )
        }
        version_of = {d.id: versions[d.model_version_id] for d in deployments}
        by_deployment: dict[str, list[DeploymentTargetInfo]] = {i: [] for i in ids}
        for target, bundle in rows:
            version = version_of[target.deployment_id]
            by_deployment[target.deployment_id].append(
                DeploymentTargetInfo(
                    device_id=target.device_id,
                    generation=target.generation,
                    model=model_ref(version.model, version, bundle),
                    bundle_id=bundle.id,
                )
            )
        result = []
        for d in deployments:
            version = versions[d.model_version_id]
            result.append(
                DeploymentInfo(
                    id=d.id,
                    model_version_id=d.model_version_id,
                    model=version.model.name,
                    version=version.version,
                    release=version.release,
                    created_at=d.created_at,
                    status=d.status,
                    targets=tuple(by_deployment[d.id]),
                )
            )
        return result

    def get_deployment(self, deployment_id: str) -> DeploymentInfo:
        """Return a deployment with its per-device targets.

        Raises:
            NotFoundError: no such deployment.
        """
        with self._db.read() as s:
            row = s.get(m.Deployment, deployment_id)
            if row is None:
                raise NotFoundError(f"deployment {deployment_id!r} does not exist")
            return self._infos(s, [row])[0]

    def list_deployments(self) -> list[DeploymentInfo]:
        """List deployments, newest first."""
        with self._db.read() as s:
            rows = list(
                s.scalars(
                    sa.select(m.Deployment).order_by(
                        m.Deployment.created_at.desc(), m.Deployment.id
                    )
                )
            )
            return self._infos(s, rows)


class Outbox:
    """Desired states to publish, and how far each was published."""

    def __init__(self, database: Database) -> None:
        self._db = database

    @staticmethod
    def _desired(s: Session, *where: sa.ColumnElement[bool]) -> list[DesiredState]:
        """Desired-state messages for the rows matching ``where``, by device id."""
        stmt = (
            sa.select(m.DesiredStateRecord, m.Bundle, m.ModelVersion)
            .outerjoin(m.Bundle, m.Bundle.id == m.DesiredStateRecord.bundle_id)
            .outerjoin(m.ModelVersion, m.ModelVersion.id == m.Bundle.model_version_id)
            .where(*where)
            .order_by(m.DesiredStateRecord.device_id)
        )
        result = []
        for record, bundle, version in s.execute(stmt):
            # Outer joins: no bundle (and so no version) means "run no model".
            model = (
                None
                if bundle is None or version is None
                else model_ref(version.model, version, bundle)
            )
            result.append(
                DesiredState(
                    device_id=record.device_id,
                    generation=record.generation,
                    model=model,
                    deployment_id=record.deployment_id,
                    issued_at=record.updated_at.timestamp(),
                )
            )
        return result

    def desired_for(self, device_id: str) -> DesiredState | None:
        """Return a device's desired state, or ``None`` if nothing was ever deployed to it."""
        with self._db.read() as s:
            found = self._desired(s, m.DesiredStateRecord.device_id == device_id)
            return found[0] if found else None

    def unpublished_desired(self) -> list[DesiredState]:
        """Desired states changed since they were last published, by device id."""
        with self._db.read() as s:
            return self._desired(
                s, m.DesiredStateRecord.published_generation < m.DesiredStateRecord.generation
            )

    def mark_published(self, device_id: str, generation: int) -> None:
        """Record that ``generation`` of a device's desired state was published.

        Never lowers the mark: if publishers finish out of order, the older
        generation's acknowledgement arriving last must not make the newer,
        already published generation look unpublished (and be sent again).
        Unknown devices and generations newer than the current one are ignored.
        """
        with self._db.write() as s:
            s.execute(
                sa.update(m.DesiredStateRecord)
                .where(
                    m.DesiredStateRecord.device_id == device_id,
                    m.DesiredStateRecord.published_generation < generation,
                    # A generation that does not exist yet was not published;
                    # recording it would hide the real one from the outbox.
                    m.DesiredStateRecord.generation >= generation,
                )
                .values(published_generation=generation)
            )

    def all_desired(self) -> list[DesiredState]:
        """Every device's desired state, by device id (e.g. to republish all)."""
        with self._db.read() as s:
            return self._desired(s)

    def published_digest(self) -> str:
        """A digest of every device's published generation (hex SHA-256).

        The service publishes it, retained, after desired states (the outbox
        marker). A broker that hands the same digest back on a reconnect still
        holds every desired state it was given, so none is re-published; a
        broker that lost its retained messages lost the marker with them.
        """
        with self._db.read() as s:
            rows = s.execute(
                sa.select(m.DesiredStateRecord.device_id, m.DesiredStateRecord.published_generation)
                .where(m.DesiredStateRecord.published_generation > 0)
                .order_by(m.DesiredStateRecord.device_id)
            )
            digest = hashlib.sha256()
            for device_id, generation in rows:
                digest.update(f"{device_id}:{generation}\n".encode())
            return digest.hexdigest()
