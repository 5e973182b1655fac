"""``deploy --wait``: follow the targeted devices until they run the new model, or fail.

A device is judged from what it reported, never from what was sent:

- ``active``: it runs ``model@version`` and has reported the deployment's
  generation (or a later one);
- ``failed``: it reported that generation (so it acted on it) and is in the
  ``failed`` state, or settled back on another model (refused, rolled back);
- otherwise it is still pending, in a phase the progress shows:
  ``unpublished`` (no controller has sent it), ``sent`` (published, not yet
  reported), ``downloading``, ``installing``.

The rows come from the management API (``GET /api/v1/devices``) or, without
one, from the registry; both give the same fields (:class:`DeviceProgress`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DeviceProgress",
    "FollowResult",
    "follow",
    "judge",
    "progress_from_api",
    "progress_from_summaries",
]

_BUSY = ("downloading", "installing")


@dataclass(frozen=True)
class DeviceProgress:
    """What one device last reported, as far as following a deployment needs."""

    device_id: str
    state: str | None
    active_model: str | None
    active_version: str | None
    reported_generation: int | None
    published: bool | None
    last_error: str | None = None


@dataclass(frozen=True)
class FollowResult:
    """Each target's last phase (``active``, ``failed`` or a pending one); did time run out."""

    phases: dict[str, str]
    errors: dict[str, str | None]
    timed_out: bool

    @property
    def active(self) -> list[str]:
        return sorted(d for d, p in self.phases.items() if p == "active")

    @property
    def failed(self) -> list[str]:
        return sorted(d for d, p in self.phases.items() if p == "failed")

    @property
    def pending(self) -> list[str]:
        return sorted(d for d, p in self.phases.items() if p not in ("active", "failed"))


def judge(row: DeviceProgress | None, model: str, version: str, generation: int) -> str:
    """The phase of one device for the deployment of ``model@version`` at ``generation``."""
    if row is None:
        return "missing"
    reported = row.reported_generation or 0
    if reported >= generation:
        if row.state in _BUSY:
            return str(row.state)
        if row.state != "failed" and (row.active_model, row.active_version) == (model, version):
            return "active"
        # Acted on this generation and failed, or settled on something else
        # (refused, rolled back, or a later deployment replaced this one).
        return "failed"
    if row.published is False:
        return "unpublished"
    return row.state if row.state in _BUSY else "sent"


def follow(
    fetch: Callable[[], Mapping[str, DeviceProgress]],
    targets: Mapping[str, int],
    model: str,
    version: str,
    *,
    timeout_s: float,
    interval_s: float = 1.0,
    show: bool = True,
) -> FollowResult:
    """Poll ``fetch`` until every target is active or failed, or ``timeout_s`` passes.

    ``targets`` maps device id to the generation the deployment gave it.
    Progress goes to stderr (a rich progress bar on a terminal, a line per
    change otherwise), so stdout keeps the command's result alone.
    """
    deadline = time.monotonic() + timeout_s
    display = _Display(len(targets)) if show else None
    phases: dict[str, str] = {}
    errors: dict[str, str | None] = {}
    try:
        while True:
            rows = fetch()
            for device_id, generation in targets.items():
                row = rows.get(device_id)
                phases[device_id] = judge(row, model, version, generation)
                errors[device_id] = None if row is None else row.last_error
            if display is not None:
                display.update(phases)
            if all(p in ("active", "failed") for p in phases.values()):
                return FollowResult(phases, errors, timed_out=False)
            if time.monotonic() >= deadline:
                return FollowResult(phases, errors, timed_out=True)
            time.sleep(min(interval_s, max(0.0, deadline - time.monotonic())))
    finally:
        if display is not None:
            display.close()


def _summary(phases: Mapping[str, str]) -> str:
    counts: dict[str, int] = {}
    for phase in phases.values():
        counts[phase] = counts.get(phase, 0) + 1
    order = ["active", "failed", "installing", "downloading", "sent", "unpublished", "missing"]
    return ", ".join(f"{counts[p]} {p}" for p in order if counts.get(p))


class _Display:
    """A rich progress bar on a terminal; otherwise one plain line whenever the counts change."""

    def __init__(self, total: int) -> None:
        self._total = total
        self._last = ""
        self._progress: Any = None
        self._task: Any = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._progress = Progress(
                TextColumn("devices"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.description}"),
                console=Console(stderr=True),
                transient=False,
            )
            self._task = self._progress.add_task("", total=total)
            self._progress.start()

    def update(self, phases: Mapping[str, str]) -> None:
        text = _summary(phases)
        done = sum(1 for p in phases.values() if p in ("active", "failed"))
        if self._progress is not None:
            self._progress.update(self._task, completed=done, description=text)
        elif text != self._last:
            print(f"{done}/{self._total} done: {text}", file=sys.stderr, flush=True)
        self._last = text

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def progress_from_api(devices: Sequence[Mapping[str, Any]]) -> dict[str, DeviceProgress]:
    """Rows of ``GET /api/v1/devices`` as :class:`DeviceProgress`, by id."""
    out: dict[str, DeviceProgress] = {}
    for d in devices:
        active = d.get("active") or {}
        delivery = d.get("delivery") or {}
        error = d.get("last_error") or {}
        out[str(d["id"])] = DeviceProgress(
            device_id=str(d["id"]),
            state=d.get("state"),
            active_model=active.get("model"),
            active_version=active.get("version"),
            reported_generation=delivery.get("reported_generation"),
            published=delivery.get("published"),
            last_error=error.get("code") if isinstance(error, dict) else None,
        )
    return out


def progress_from_summaries(summaries: Sequence[Any]) -> dict[str, DeviceProgress]:
    """Registry :class:`~edgefleet.controller.registry.DeviceSummary` rows as progress, by id."""
    return {
        s.device_id: DeviceProgress(
            device_id=s.device_id,
            state=s.state,
            active_model=s.active_model,
            active_version=s.active_version,
            reported_generation=s.reported_generation,
            published=s.desired_published,
            last_error=s.last_error_code,
        )
        for s in summaries
    }
