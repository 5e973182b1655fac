"""The rollout engine's I/O: step every active rollout, and sign re-issued bundles.

The controller service calls :meth:`RolloutRunner.step_all` periodically. Each
rollout is stepped in its own transaction by
:meth:`~edgefleet.controller.rollout.store.RolloutStore.step`, which
locks it (several controllers may run this loop against one database; a
rollout held by another controller is skipped this round).

Rolling back signs a *re-issue*: the previous bundle's exact bytes under a new
target path, with the signed ``custom`` copied from the original target and
two changes - ``release`` raised to a fresh counter value (agents refuse
releases below the highest they ran) and ``reissue_of`` naming the original
release (the manifest inside the bytes still says that one; see
``Installer._check_manifest``). Because the bytes and so the sha256 are
unchanged, an agent that kept the previous slot installs it from there and
downloads nothing.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime

from edgefleet.controller.registry import Registry
from edgefleet.controller.rollout.errors import RolloutError
from edgefleet.controller.rollout.store import Reissue, RolloutStore, StepResult
from edgefleet.controller.trust import TrustRepository
from edgefleet.protocols.bundle import TargetCustom
from edgefleet.protocols.errors import MessageError

__all__ = ["RolloutRunner", "sign_reissue"]

log = logging.getLogger(__name__)


def sign_reissue(repository: TrustRepository, reissue: Reissue) -> None:
    """Publish the TUF target of ``reissue`` from its original target's bytes.

    Raises:
        RolloutError: the original target or its bytes are gone, or its signed
            custom metadata is unreadable.
        TrustError: the repository cannot be signed or written.
    """
    original = repository.get_target(reissue.original_target_path)
    if original is None:
        raise RolloutError(f"cannot re-issue {reissue.original_target_path}: no such TUF target")
    sha256 = original.hashes.get("sha256", "")
    head, sep, name = reissue.original_target_path.rpartition("/")
    data = repository.read_file(f"targets/{head}{sep}{sha256}.{name}")
    if data is None:
        raise RolloutError(f"cannot re-issue {reissue.original_target_path}: its bytes are gone")
    try:
        custom = TargetCustom.from_dict(original.unrecognized_fields.get("custom"))
    except MessageError as exc:
        raise RolloutError(f"cannot re-issue {reissue.original_target_path}: {exc}") from exc
    reissued = replace(
        custom,
        release=reissue.release,
        extra={**custom.extra, "reissue_of": reissue.original_release},
    )
    published = repository.add_target(reissue.target_path, data, reissued)
    if published.sha256 != sha256:  # pragma: no cover - read_file returned other bytes
        raise RolloutError(f"re-issue of {reissue.original_target_path} changed its bytes")
    log.info(
        "re-issued %s as %s (release %d, reissue of release %d)",
        reissue.original_target_path,
        reissue.target_path,
        reissue.release,
        reissue.original_release,
    )


class RolloutRunner:
    """Steps rollouts for one controller.

    Args:
        registry: the shared registry.
        repository: the TUF repository re-issues are signed into. Controllers
            sharing a database must share this directory too.
        actor: this controller's name in decision logs.
    """

    def __init__(
        self, registry: Registry, repository: TrustRepository, *, actor: str = "controller"
    ) -> None:
        self.store = RolloutStore(registry, actor=actor)
        self.repository = repository

    def step_all(self, now: datetime | None = None) -> list[StepResult]:
        """Step every active rollout once; a failing rollout does not stop the others."""
        results = []
        for rollout_id in self.store.active_ids():
            try:
                result = self.store.step(
                    rollout_id, lambda r: sign_reissue(self.repository, r), now=now
                )
            except Exception:  # one broken rollout must not stall all others
                log.exception("rollout %s: step failed; will retry", rollout_id)
                continue
            if result is not None:
                for d in result.plan.decisions:
                    log.info(
                        "rollout %s: %s%s: %s",
                        rollout_id,
                        d.kind,
                        f" {d.device_id}" if d.device_id else "",
                        d.reason,
                    )
                results.append(result)
        return results
