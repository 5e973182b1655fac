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
- An attempt failed for a transient reason (link, timeout, too little free
  disk): retry after a backoff that doubles per failure, up to a ceiling.
- Otherwise: install.

:func:`record_failure` is the other half: after a failed install the daemon
reports the error here, and this module decides whether retrying can help
(only a :class:`~edgefleet.protocols.errors.TransferError` or an
:class:`~edgefleet.protocols.errors.InsufficientSpaceError` is transient) and
when the next try is due; the daemon only sleeps for the ``wait_s`` that
:func:`decide` then returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgefleet.protocols.errors import AgentError, InsufficientSpaceError, TransferError
from edgefleet.protocols.messages import DesiredState, ModelRef

__all__ = [
    "TRANSIENT_ERRORS",
    "Attempt",
    "Backoff",
    "Decision",
    "IntentKey",
    "decide",
    "intent_key",
    "record_failure",
]

IntentKey = tuple[str | None, int, str]

# Failures that may pass without the controller changing its intent: the link
# or the controller comes back, or someone frees disk space. Everything else
# (bad signature, wrong hardware, failed smoke test) fails the same way again.
TRANSIENT_ERRORS: tuple[type[AgentError], ...] = (TransferError, InsufficientSpaceError)


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
class Backoff:
    """Retry delays after transient failures: ``base_s`` doubling per failure, up to ``max_s``."""

    base_s: float
    max_s: float

    def delay_s(self, failures: int) -> float:
        """The wait after the ``failures``-th consecutive failure (1-based)."""
        # The exponent is capped so that a long outage cannot overflow the float.
        return min(self.base_s * 2.0 ** min(max(failures - 1, 0), 64), self.max_s)


def record_failure(
    attempts: dict[IntentKey, Attempt],
    key: IntentKey,
    error: AgentError,
    now: float,
    backoff: Backoff,
) -> Attempt:
    """Count a failed attempt at ``key`` and decide whether and when to retry it.

    A transfer failure (link down, controller silent) or a full disk may
    pass, so the intent is retried after :meth:`Backoff.delay_s` (a device
    whose disk was full installs on its own once space is freed); every other
    refusal (bad signature, wrong hardware, failed smoke test) would fail the
    same way again, so the intent is given up until the controller changes it.

    Returns:
        The updated attempt (also stored in ``attempts``).
    """
    attempt = attempts.setdefault(key, Attempt())
    attempt.failures += 1
    attempt.permanent = not isinstance(error, TRANSIENT_ERRORS)
    attempt.retry_at = now + backoff.delay_s(attempt.failures)
    return attempt


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
