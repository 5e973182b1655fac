"""Reconcile desired against current: the agent's pure decision core.

No I/O here, so every rule is a unit test away. The daemon feeds in the
latest desired state (from the retained ``desired`` message), the model the
agent serves, and the outcome of earlier attempts, and gets back what to do.

Rules:
- No desired state, or a desired state without a model: nothing to do (we
  never uninstall a working model just because the controller forgot it).
- The desired target is already active: nothing to do - this is what makes a
  repeated or replayed retained message harmless.
- An attempt at this exact intent (deployment id + generation + target)
  failed for a reason that retrying cannot fix (bad signature, smoke test):
  nothing to do until the controller changes its intent.
- An attempt failed for a transient reason (link, timeout): retry after a
  backoff that doubles per failure, up to a ceiling.
- Otherwise: install.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgefleet.protocols.messages import DesiredState, ModelRef

__all__ = ["Attempt", "Decision", "IntentKey", "decide", "intent_key"]

IntentKey = tuple[str | None, int, str]


def intent_key(desired: DesiredState) -> IntentKey | None:
    """What identifies one intent: deployment id, generation and target."""
    if desired.model is None:
        return None
    return (desired.deployment_id, desired.generation, desired.model.target)


@dataclass
class Attempt:
    """Failures so far for one intent, and whether retrying can help."""

    failures: int = 0
    permanent: bool = False
    retry_at: float = 0.0


@dataclass(frozen=True)
class Decision:
    """``install`` is the model to install now; otherwise ``wait_s`` says when to look again."""

    install: ModelRef | None = None
    reason: str = ""
    wait_s: float | None = None
    already_active: bool = field(default=False)


def decide(
    desired: DesiredState | None,
    active: ModelRef | None,
    attempts: dict[IntentKey, Attempt],
    now: float,
) -> Decision:
    """Decide the next step. Pure: reads its arguments only."""
    if desired is None or desired.model is None:
        return Decision(reason="no model desired")
    want = desired.model
    if active is not None and active.target == want.target and active.release == want.release:
        return Decision(reason=f"{want.label} is already active", already_active=True)
    key = intent_key(desired)
    attempt = attempts.get(key) if key is not None else None
    if attempt is not None:
        if attempt.permanent:
            return Decision(reason=f"{want.label} was refused; waiting for a new desired state")
        if now < attempt.retry_at:
            return Decision(
                reason="backing off after a transient failure", wait_s=attempt.retry_at - now
            )
    return Decision(install=want, reason=f"install {want.label}")
