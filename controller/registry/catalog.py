"""The catalog: models, their versions (with the release counter) and built bundles.

A model version's ``release`` is the per-model counter agents use for
rollback protection, so it is bumped under the model row's lock and never
reused. A bundle is one build of a version for a hardware class and runtime;
its TUF target path is unique because agents name what to fetch by it alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from edgefleet.controller.errors import DuplicateError, NotFoundError
from edgefleet.controller.registry import models as m
from edgefleet.controller.registry.database import Database, require_text
from edgefleet.controller.registry.dto import BundleInfo, ModelVersionInfo
from edgefleet.protocols.bundle import TensorSpec

__all__ = [
    "GENERIC_HARDWARE_CLASS",
    "Catalog",
    "Reissued",
    "bundle_info",
    "model_version_info",
    "reissue_bundle",
]

# Bundles of this class run anywhere the runtime does; they are the fallback
# when a model version has no bundle built for a device's own class.
GENERIC_HARDWARE_CLASS = "generic"


def model_version_info(row: m.ModelVersion) -> ModelVersionInfo:
    """The frozen view of a version row (its model is loaded with it)."""
    return ModelVersionInfo(
        id=row.id,
        name=row.model.name,
        version=row.version,
        release=row.release,
        source_sha256=row.source_sha256,
        inputs=tuple(TensorSpec.from_dict(d) for d in row.inputs),
        outputs=tuple(TensorSpec.from_dict(d) for d in row.outputs),
        description=row.description,
        created_at=row.created_at,
    )


def bundle_info(row: m.Bundle) -> BundleInfo:
    """The frozen view of a bundle row."""
    return BundleInfo(
        id=row.id,
        model_version_id=row.model_version_id,
        hardware_class=row.hardware_class,
        runtime=row.runtime,
        precision=row.precision,
        target_path=row.target_path,
        sha256=row.sha256,
        length=row.length,
        report=row.report,
        created_at=row.created_at,
        release=row.release,
        reissue_of=row.reissue_of,
    )


@dataclass(frozen=True)
class Reissued:
    """The outcome of :func:`reissue_bundle`: the re-issue, what it copies, and if it is new.

    A new re-issue (``created``) still has to be signed as a TUF target before
    the transaction commits; an existing one was signed when it was made.
    """

    bundle: m.Bundle
    source: m.Bundle
    version: m.ModelVersion
    created: bool


def reissue_bundle(s: Session, original: m.Bundle, *, above: int, now: datetime) -> Reissued:
    """A re-issue of ``original`` with a release above ``above``: reused, or made, inside ``s``.

    A re-issue signs the bytes of a bundle again under a new target path with
    a newer release (taken from the model's release counter under its row
    lock, like a new version's), so agents that refuse older releases accept
    going back to it. Re-issues always carry the bytes of the version's own
    bundle (a re-issue of a re-issue points at the same original), so the
    manifest inside still says the version's release; agents accept that
    because the signed custom says ``reissue_of`` that release.
    """
    source = original
    if original.reissue_of is not None:
        found = s.get(m.Bundle, original.reissue_of)
        if found is not None:
            source = found
    version = s.get(m.ModelVersion, source.model_version_id)
    assert version is not None
    existing = s.scalars(
        sa.select(m.Bundle)
        .where(m.Bundle.reissue_of == source.id, m.Bundle.release > above)
        .order_by(m.Bundle.release.desc())
        .limit(1)
    ).one_or_none()
    if existing is not None:
        return Reissued(existing, source, version, created=False)
    model = s.scalars(
        sa.select(m.Model).where(m.Model.id == version.model_id).with_for_update()
    ).one()
    model.last_release += 1
    release = model.last_release
    head, _, tail = source.target_path.rpartition("/")
    path = f"{head}/reissue-{release}/{tail}" if head else f"reissue-{release}/{tail}"
    row = m.Bundle(
        model_version_id=source.model_version_id,
        hardware_class=source.hardware_class,
        runtime=source.runtime,
        precision=source.precision,
        target_path=path,
        sha256=source.sha256,
        length=source.length,
        report=None,
        created_at=now,
        release=release,
        reissue_of=source.id,
    )
    s.add(row)
    s.flush()
    return Reissued(row, source, version, created=True)


class Catalog:
    """Models, model versions and bundles on a shared :class:`Database`."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def register_model_version(
        self,
        name: str,
        version: str,
        *,
        source_sha256: str,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        description: str = "",
    ) -> ModelVersionInfo:
        """Register a new version of a model, creating the model on first use.

        The version gets ``release`` = the model's highest release so far + 1.
        The counter lives on the model row and is bumped under that row's lock,
        so releases are unique and only ever increase, even with concurrent
        registrations.

        Raises:
            DuplicateError: this name and version are registered already.
            RegistryError: a name, version or hash is empty or too long.
        """
        require_text(name, "model name", 128)
        require_text(version, "model version", 64)
        require_text(source_sha256, "source sha256", 64)
        inputs_json = [spec.to_dict() for spec in inputs]
        outputs_json = [spec.to_dict() for spec in outputs]

        def work(s: Session) -> ModelVersionInfo:
            model = s.scalars(
                sa.select(m.Model).where(m.Model.name == name).with_for_update()
            ).one_or_none()
            if model is None:
                model = m.Model(name=name, last_release=0)
                s.add(model)
                s.flush()
            elif s.scalar(
                sa.select(m.ModelVersion.id).where(
                    m.ModelVersion.model_id == model.id, m.ModelVersion.version == version
                )
            ):
                raise DuplicateError(f"model version {name}@{version} is already registered")
            model.last_release += 1
            row = m.ModelVersion(
                model=model,
                version=version,
                release=model.last_release,
                source_sha256=source_sha256,
                inputs=inputs_json,
                outputs=outputs_json,
                description=description,
            )
            s.add(row)
            s.flush()
            return model_version_info(row)

        return self._db.write_retrying(work)

    def add_bundle(
        self,
        model_version_id: int,
        *,
        hardware_class: str,
        runtime: str,
        precision: str,
        target_path: str,
        sha256: str,
        length: int,
        report: dict[str, Any] | None = None,
    ) -> BundleInfo:
        """Record a built bundle of a model version.

        Raises:
            NotFoundError: the model version does not exist.
            DuplicateError: a bundle with this TUF target path exists already.
        """
        require_text(hardware_class, "hardware class", 64)
        require_text(runtime, "runtime", 32)
        require_text(precision, "precision", 16)
        require_text(target_path, "target path", 512)
        require_text(sha256, "bundle sha256", 64)

        def work(s: Session) -> BundleInfo:
            if s.get(m.ModelVersion, model_version_id) is None:
                raise NotFoundError(f"model version id {model_version_id} does not exist")
            if s.scalar(sa.select(m.Bundle.id).where(m.Bundle.target_path == target_path)):
                raise DuplicateError(f"a bundle with target path {target_path!r} exists already")
            row = m.Bundle(
                model_version_id=model_version_id,
                hardware_class=hardware_class,
                runtime=runtime,
                precision=precision,
                target_path=target_path,
                sha256=sha256,
                length=length,
                report=report,
            )
            s.add(row)
            s.flush()
            return bundle_info(row)

        # A concurrent add of the same path loses the insert and, retried, is a duplicate.
        return self._db.write_retrying(work)

    def get_model_version(self, name: str, version: str) -> ModelVersionInfo:
        """Return a model version by name and version.

        Raises:
            NotFoundError: no such model version.
        """
        with self._db.read() as s:
            row = s.scalars(
                sa.select(m.ModelVersion)
                .join(m.ModelVersion.model)
                .where(m.Model.name == name, m.ModelVersion.version == version)
            ).one_or_none()
            if row is None:
                raise NotFoundError(f"model version {name}@{version} does not exist")
            return model_version_info(row)

    def list_model_versions(self, name: str | None = None) -> list[ModelVersionInfo]:
        """List model versions, newest first.

        For one model that is descending release; across models it is
        registration order, which agrees with release order within each model.
        """
        stmt = sa.select(m.ModelVersion).join(m.ModelVersion.model)
        if name is not None:
            stmt = stmt.where(m.Model.name == name)
        stmt = stmt.order_by(m.ModelVersion.id.desc())
        with self._db.read() as s:
            return [model_version_info(row) for row in s.scalars(stmt)]

    def bundles_for(self, model_version_id: int) -> list[BundleInfo]:
        """List the bundles of a model version, oldest first."""
        with self._db.read() as s:
            rows = s.scalars(
                sa.select(m.Bundle)
                .where(m.Bundle.model_version_id == model_version_id)
                .order_by(m.Bundle.id)
            )
            return [bundle_info(row) for row in rows]
