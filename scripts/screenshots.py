#!/usr/bin/env python3
"""Regenerate docs/screenshots/*.png from a live demo fleet.

Runs what ``edgefleet demo --dashboard`` runs (embedded broker, controller on
SQLite, real agent processes, the API and dashboard), then drives Debian's
headless chromium through Playwright: signs in with the operator token,
visits every page, starts a rollout of demo-mlp@1.1.0 from the rollouts page
and photographs it while it progresses.

    .venv/bin/python scripts/screenshots.py [--out docs/screenshots] [--agents 5]

Needs ``/usr/bin/chromium`` (apt-get install chromium) and the `dev` extra
(playwright); never ``playwright install``.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

from edgefleet.controller.demo import DashboardSession, DemoFleet, run_demo, serve_dashboard

CHROMIUM = "/usr/bin/chromium"
TIMEOUT_MS = 60_000


def _wait_loaded(page: Page, hash_: str) -> None:
    """The page sets body[data-loaded] to its route after its first successful refresh."""
    page.wait_for_function("h => document.body.dataset.loaded === h", arg=hash_, timeout=TIMEOUT_MS)


def _visit(page: Page, hash_: str) -> None:
    page.evaluate("h => { location.hash = h }", hash_)
    _wait_loaded(page, hash_)


def shoot(session: DashboardSession, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(session.url)
            page.wait_for_selector("#signin:not([hidden])")
            page.screenshot(path=str(out / "signin.png"))
            page.fill("#token", session.token)
            page.click("#signin-form button[type=submit]")
            _wait_loaded(page, "#/")
            page.wait_for_timeout(3000)  # a few polls, so the charts have points
            _visit(page, "#/")
            page.screenshot(path=str(out / "overview.png"), full_page=True)
            _visit(page, "#/devices")
            page.screenshot(path=str(out / "devices.png"), full_page=True)
            _visit(page, "#/device/gw-01")
            page.screenshot(path=str(out / "device.png"), full_page=True)
            _visit(page, "#/model/demo-mlp/1.0.0")
            page.screenshot(path=str(out / "model.png"), full_page=True)
            _visit(page, "#/rollouts")
            page.wait_for_selector("#rollout-model option[value*='1.1.0']", state="attached")
            page.select_option("#rollout-model", '["demo-mlp","1.1.0"]')
            page.fill("#rollout-observe", "4")  # a demo fleet needs no minute per wave
            page.fill("#rollout-soak", "4")
            page.click("#rollout-create")
            page.wait_for_function("() => location.hash.startsWith('#/rollout/')")
            page.wait_for_selector("#story li[data-decision]")
            page.wait_for_timeout(15000)  # let the canary wave move on
            page.screenshot(path=str(out / "rollout.png"), full_page=True)
            phone = browser.new_page(viewport={"width": 390, "height": 844})
            phone.set_default_timeout(TIMEOUT_MS)
            phone.goto(session.url)
            phone.fill("#token", session.token)
            phone.click("#signin-form button[type=submit]")
            _wait_loaded(phone, "#/")
            phone.screenshot(path=str(out / "overview-phone.png"), full_page=True)
            _visit(phone, "#/devices")
            phone.screenshot(path=str(out / "devices-phone.png"), full_page=True)
        finally:
            browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    parser.add_argument("--agents", type=int, default=5)
    args = parser.parse_args()
    stop = threading.Event()
    failed: list[BaseException] = []

    def ready(session: DashboardSession) -> None:
        def run() -> None:
            try:
                shoot(session, args.out)
            except Exception as exc:  # noqa: BLE001 - reported below, after the fleet stops
                failed.append(exc)
            finally:
                stop.set()

        threading.Thread(target=run, name="screenshots").start()

    def hold(fleet: DemoFleet) -> None:
        serve_dashboard(fleet, ready=ready, stop=stop, say=print)

    run_demo(args.agents, hold=hold, say=print)
    if failed:
        raise failed[0]
    print(f"screenshots in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
