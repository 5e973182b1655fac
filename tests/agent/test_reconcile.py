from __future__ import annotations

from edgefleet.agent.reconcile import (
    Attempt,
    Backoff,
    IntentKey,
    decide,
    intent_key,
    record_failure,
)
from edgefleet.protocols.errors import (
    SmokeTestError,
    TransferTimeoutError,
    UntrustedMetadataError,
)
from edgefleet.protocols.messages import DesiredState, ModelRef

V1 = ModelRef("m", "1", 1, "m/1/generic-fp32.bundle")
V2 = ModelRef("m", "2", 2, "m/2/generic-fp32.bundle")


def test_nothing_desired_means_nothing_to_do() -> None:
    assert decide(None, V1, {}, 0).install is None
    assert decide(DesiredState("gw", 1, None), V1, {}, 0).install is None


def test_install_when_desired_differs() -> None:
    assert decide(DesiredState("gw", 1, V2, "d"), V1, {}, 0).install == V2
    assert decide(DesiredState("gw", 1, V1, "d"), None, {}, 0).install == V1


def test_repeated_desired_state_is_a_no_op() -> None:
    decision = decide(DesiredState("gw", 7, V1, "d"), V1, {}, 0)
    assert decision.install is None
    assert decision.already_active


def test_permanent_failure_is_not_retried_until_intent_changes() -> None:
    desired = DesiredState("gw", 2, V2, "d")
    key = intent_key(desired)
    assert key is not None
    attempts = {key: Attempt(failures=1, permanent=True)}
    assert decide(desired, V1, attempts, 100).install is None
    # The controller re-deploys: a new generation is a new intent.
    assert decide(DesiredState("gw", 3, V2, "d2"), V1, attempts, 100).install == V2


def test_transient_failure_backs_off_then_retries() -> None:
    desired = DesiredState("gw", 2, V2, "d")
    key = intent_key(desired)
    assert key is not None
    attempts = {key: Attempt(failures=1, permanent=False, retry_at=50.0)}
    waiting = decide(desired, V1, attempts, 40.0)
    assert waiting.install is None
    assert waiting.wait_s == 10.0
    assert decide(desired, V1, attempts, 50.0).install == V2


def test_backoff_doubles_per_failure_up_to_the_ceiling() -> None:
    backoff = Backoff(base_s=5.0, max_s=300.0)
    assert [backoff.delay_s(n) for n in range(1, 9)] == [5, 10, 20, 40, 80, 160, 300, 300]
    assert backoff.delay_s(100_000) == 300.0  # a long outage does not overflow


def test_transfer_failures_are_retried_after_the_backoff() -> None:
    desired = DesiredState("gw", 2, V2, "d")
    key = intent_key(desired)
    assert key is not None
    attempts: dict[IntentKey, Attempt] = {}
    backoff = Backoff(base_s=5.0, max_s=300.0)
    record_failure(attempts, key, TransferTimeoutError("silent"), 100.0, backoff)
    attempt = record_failure(attempts, key, TransferTimeoutError("silent"), 200.0, backoff)
    assert attempts[key] is attempt
    assert (attempt.failures, attempt.permanent, attempt.retry_at) == (2, False, 210.0)
    assert decide(desired, V1, attempts, 205.0).wait_s == 5.0
    assert decide(desired, V1, attempts, 210.0).install == V2


def test_refusals_that_would_repeat_are_not_retried() -> None:
    desired = DesiredState("gw", 2, V2, "d")
    key = intent_key(desired)
    assert key is not None
    backoff = Backoff(base_s=5.0, max_s=300.0)
    for error in (UntrustedMetadataError("bad signature"), SmokeTestError("nan")):
        attempts: dict[IntentKey, Attempt] = {}
        assert record_failure(attempts, key, error, 0.0, backoff).permanent
        assert decide(desired, V1, attempts, 10_000.0).install is None
