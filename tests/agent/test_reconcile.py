from __future__ import annotations

from edgefleet.agent.reconcile import Attempt, decide, intent_key
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
