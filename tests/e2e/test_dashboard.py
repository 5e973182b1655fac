"""The web dashboard in headless Chromium, against the live demo fleet.

The fleet is what ``edgefleet demo --dashboard`` runs: an embedded broker on
a free port, the controller on SQLite, one real agent process per device,
the management API and dashboard, and inference traffic. Debian's
``chromium`` is driven by Playwright (``executable_path``; never
``playwright install``). Every wait is on a condition in the page or the
registry, with generous timeouts, so a loaded machine only makes it slower.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgefleet.controller.demo import (
    DEMO_MODEL,
    DashboardSession,
    DemoFleet,
    run_demo,
    serve_dashboard,
)
from edgefleet.controller.registry.tokens import TokenStore
from edgefleet.controller.rollout.engine import RolloutConfig, RolloutStatus
from edgefleet.controller.rollout.selector import Selector
from edgefleet.controller.rollout.store import RolloutStore
from edgefleet.protocols.messages import ErrorInfo, Event, EventKind
from edgefleet.protocols.topics import Channel, DeviceTopic
from edgefleet.shared.link import MqttLink
from tests.e2e.harness import wait_for

CHROMIUM = os.environ.get("EDGEFLEET_CHROMIUM", "/usr/bin/chromium")
AGENTS = 3
TIMEOUT_MS = 60_000
NEXT_VERSION = "1.1.0"

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (the `dev` extra)"
)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)),
        reason=f"no chromium at {CHROMIUM} (apt-get install chromium; .ci/run installs it)",
    ),
]


@dataclass
class LiveFleet:
    fleet: DemoFleet
    session: DashboardSession
    viewer_token: str


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveFleet]:
    """``demo --dashboard`` in a thread, for every test of this module."""
    stop = threading.Event()
    ready = threading.Event()
    got: dict[str, Any] = {}
    failed: list[BaseException] = []

    def hold(fleet: DemoFleet) -> None:
        got["fleet"] = fleet

        def on_ready(session: DashboardSession) -> None:
            got["session"] = session
            ready.set()

        serve_dashboard(fleet, ready=on_ready, stop=stop, infer_interval_s=0.5)

    def run() -> None:
        try:
            run_demo(
                AGENTS, requests_per_agent=5, workdir=tmp_path_factory.mktemp("demo"), hold=hold
            )
        except BaseException as exc:  # handed to the test thread below
            failed.append(exc)
        finally:
            ready.set()

    thread = threading.Thread(target=run, name="demo-dashboard", daemon=True)
    thread.start()
    try:
        assert ready.wait(240), "the demo fleet did not come up"
        if failed:
            raise failed[0]
        fleet: DemoFleet = got["fleet"]
        assert fleet.result.ok, fleet.result.to_dict()
        viewer = TokenStore(fleet.registry.database).create("test-viewer", "viewer").token
        yield LiveFleet(fleet, got["session"], viewer)
    finally:
        stop.set()
        thread.join(120)
    if failed:
        raise failed[0]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


class Console:
    """Console errors and uncaught exceptions of one page."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))


def open_page(browser: Any, live: LiveFleet, token: str, width: int = 1280) -> tuple[Any, Console]:
    """A new tab signed in with ``token`` through the form, on the overview."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    console = Console(page)
    page.goto(live.session.url)
    page.wait_for_selector("#signin:not([hidden])")
    page.fill("#token", token)
    page.click("#signin-form button[type=submit]")
    wait_loaded(page, "#/")
    return page, console


def wait_loaded(page: Any, hash_: str) -> None:
    """The page marks body[data-loaded] with its route after its first good refresh."""
    page.wait_for_function("h => document.body.dataset.loaded === h", arg=hash_)


def visit(page: Any, hash_: str) -> None:
    page.evaluate("h => { location.hash = h }", hash_)
    wait_loaded(page, hash_)


def device_ids(live: LiveFleet) -> list[str]:
    return sorted(d.id for d in live.fleet.registry.list_devices())


def rollout_status(live: LiveFleet, rollout_id: str) -> RolloutStatus:
    return RolloutStore(live.fleet.registry).get(rollout_id).status


# ------------------------------------------------------------------------ tests
def test_every_page_loads_without_console_errors_and_shows_the_fleet(
    live: LiveFleet, browser: Any
) -> None:
    page, console = open_page(browser, live, live.session.token)
    ids = device_ids(live)
    assert len(ids) == AGENTS
    try:
        # Overview: every device, and the online count the registry has.
        for device_id in ids:
            page.wait_for_selector(f"#all-devices a[href='#/device/{device_id}']")
        wait_for(
            lambda: (
                page.inner_text("[data-stat=online] .n")
                == str(live.fleet.registry.fleet_status().online)
            ),
            60,
            "the overview's online count to match the registry",
        )
        assert f"{DEMO_MODEL}@1.0.0" in page.inner_text("#versions")

        # Devices: one row per registered device; search and sort work.
        visit(page, "#/devices")
        for device_id in ids:
            page.wait_for_selector(f"#device-table tr[data-device='{device_id}']")
        page.fill("#device-search", ids[-1])
        page.wait_for_function(
            "id => [...document.querySelectorAll('#device-table tbody tr')]"
            ".map(r => r.dataset.device).join() === id",
            arg=ids[-1],
        )
        page.fill("#device-search", "")
        page.click("th[data-sort=id]")  # already ascending: now descending
        page.wait_for_function(
            "ids => [...document.querySelectorAll('#device-table tbody tr')]"
            ".map(r => r.dataset.device).join() === ids",
            arg=",".join(reversed(ids)),
        )

        # Device: its real events and charts drawn from its telemetry.
        visit(page, f"#/device/{ids[0]}")
        page.wait_for_selector("#events li[data-event]")
        assert "installed" in page.inner_text("#events")
        # A path per chart (state=attached: a flat 0 % error line has no height).
        for chart in ("Latency", "Error rate", "Memory (RSS)", "CPU"):
            page.wait_for_selector(f"[data-chart='{chart}'] svg path", state="attached")

        # Models, and one model's compile report drawn as bars per candidate.
        visit(page, "#/models")
        page.wait_for_selector(f"tr[data-model='{DEMO_MODEL}@1.0.0']")
        visit(page, f"#/model/{DEMO_MODEL}/1.0.0")
        profile = live.fleet.profile.name
        page.wait_for_selector(f"[data-variant='{profile}'] [data-chart=Size] svg rect")
        bars = page.locator(f"[data-variant='{profile}'] [data-chart=Size] svg rect").count()
        report = live.fleet.result.compile_report
        assert report is not None
        sized = [c for c in report["candidates"] if c["size_bytes"] is not None]
        assert sized and bars == len(sized)
        table = page.inner_text(f"[data-variant='{profile}'] table")
        for candidate in report["candidates"]:
            assert candidate["name"] in table

        visit(page, "#/rollouts")
        assert console.errors == []
    finally:
        page.close()


def test_a_rollout_started_and_paused_from_the_page_changes_the_registry(
    live: LiveFleet, browser: Any
) -> None:
    page, console = open_page(browser, live, live.session.token)
    try:
        visit(page, "#/rollouts")
        choice = f'["{DEMO_MODEL}","{NEXT_VERSION}"]'
        page.wait_for_selector(f"#rollout-model option[value='{choice}']", state="attached")
        page.select_option("#rollout-model", choice)
        page.click("#rollout-create")
        page.wait_for_function("() => location.hash.startsWith('#/rollout/')")
        rollout_id = page.evaluate("() => decodeURIComponent(location.hash.split('/')[2])")
        info = RolloutStore(live.fleet.registry).get(rollout_id)
        assert (info.model, info.version) == (DEMO_MODEL, NEXT_VERSION)
        wait_loaded(page, f"#/rollout/{rollout_id}")

        page.wait_for_selector("#btn-pause:not([disabled])")
        page.click("#btn-pause")
        wait_for(
            lambda: rollout_status(live, rollout_id) is RolloutStatus.PAUSED,
            60,
            "the rollout to be paused in the registry",
        )
        page.wait_for_selector("#rollout-status .pill.paused")
        page.wait_for_selector("#story li[data-decision=paused]")
        assert "from the dashboard" in page.inner_text("#story")

        page.click("#btn-resume:not([disabled])")
        wait_for(
            lambda: rollout_status(live, rollout_id) is not RolloutStatus.PAUSED,
            60,
            "the rollout to leave paused",
        )
        page.click("#btn-abort:not([disabled])")
        wait_for(
            lambda: rollout_status(live, rollout_id) is RolloutStatus.ABORTED,
            60,
            "the rollout to be aborted in the registry",
        )
        page.wait_for_selector("#rollout-status .pill.aborted")
        assert console.errors == []
    finally:
        page.close()


def test_a_viewer_sees_no_steering_buttons(live: LiveFleet, browser: Any) -> None:
    store = RolloutStore(live.fleet.registry)
    if not store.list_rollouts():  # run alone: make one to look at (not started)
        store.create(DEMO_MODEL, NEXT_VERSION, Selector(all=True), RolloutConfig(), start=False)
    rollouts = store.list_rollouts()
    page, console = open_page(browser, live, live.viewer_token)
    try:
        assert page.inner_text("#who").endswith("viewer")
        visit(page, "#/rollouts")
        page.wait_for_selector(f"#rollout-table tr[data-rollout='{rollouts[0].id}']")
        assert page.locator("#rollout-create").count() == 0
        visit(page, f"#/rollout/{rollouts[0].id}")
        page.wait_for_selector("#rollout-actions >> text=need an operator token")
        for button in ("#btn-pause", "#btn-resume", "#btn-abort"):
            assert page.locator(button).count() == 0
        assert console.errors == []
    finally:
        page.close()


def test_phone_width_has_no_horizontal_overflow(live: LiveFleet, browser: Any) -> None:
    page, console = open_page(browser, live, live.session.token, width=390)
    first = device_ids(live)[0]
    try:
        for hash_ in (
            "#/",
            "#/devices",
            f"#/device/{first}",
            "#/rollouts",
            "#/models",
            f"#/model/{DEMO_MODEL}/1.0.0",
        ):
            visit(page, hash_)
            overflow = page.evaluate(
                "() => document.documentElement.scrollWidth - window.innerWidth"
            )
            assert overflow <= 0, f"{hash_} is {overflow}px wider than a 390px screen"
        assert console.errors == []
    finally:
        page.close()


def test_bad_and_revoked_tokens_return_to_sign_in(live: LiveFleet, browser: Any) -> None:
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(live.session.url)
        page.fill("#token", "eft_not_a_real_token")
        page.click("#signin-form button[type=submit]")
        page.wait_for_selector("#signin-error >> text=refused")
        assert page.evaluate("() => sessionStorage.length") == 0

        tokens = TokenStore(live.fleet.registry.database)
        created = tokens.create("test-revoked", "viewer")
        page.fill("#token", created.token)
        page.click("#signin-form button[type=submit]")
        wait_loaded(page, "#/")
        tokens.revoke(created.info.id)
        # The next poll gets a 401 and drops the token.
        page.wait_for_selector("#signin:not([hidden])")
        assert page.evaluate("() => sessionStorage.length") == 0
    finally:
        page.close()


def test_hostile_device_strings_render_as_text(live: LiveFleet, browser: Any) -> None:
    """A tag and an event from a device, both HTML, show as text and run nothing."""
    registry = live.fleet.registry
    device_id = "gw-hostile"
    tag = "<script>window.__pwned='tag'</script>"
    registry.enroll_device(device_id, hardware_class="generic", tags=(tag,))
    code = "<img src=x onerror=\"window.__pwned='code'\">"
    message = "<script>window.__pwned='message'</script><b>bold</b>"
    event = Event(
        device_id,
        EventKind.INSTALL_FAILED,
        error=ErrorInfo(code, message),
        at=time.time(),
    )
    link = MqttLink(live.fleet.broker, "test-dashboard-hostile")
    link.start()
    try:
        link.publish(str(DeviceTopic(device_id, Channel.EVENTS)), event.encode(), qos=1, wait_s=10)
    finally:
        link.stop()
    wait_for(lambda: bool(registry.events_for(device_id, 10)), 60, "the hostile event stored")

    page, console = open_page(browser, live, live.session.token)
    try:
        visit(page, f"#/device/{device_id}")
        page.wait_for_selector("#events .event-error")
        assert page.inner_text("#events .event-error") == f"{code}: {message}"
        assert page.locator("#events img, #events script, #events b").count() == 0
        visit(page, "#/devices")
        page.wait_for_selector(f"#device-table tr[data-device='{device_id}'] .tag")
        assert page.inner_text(f"#device-table tr[data-device='{device_id}'] .tag") == tag
        assert page.locator("#device-table script").count() == 0
        assert page.evaluate("() => window.__pwned") is None
        assert console.errors == []
    finally:
        page.close()
