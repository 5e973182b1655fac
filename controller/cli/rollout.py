"""``edgefleet rollout ...``: create, inspect, watch and steer staged rollouts.

With ``--api`` (``EDGEFLEET_API``), ``create``, ``start``, ``pause``,
``resume`` and ``abort`` ask the running controller through its management
API and show the rollout it answers with; without it they write the
registry. ``list``, ``show`` and ``watch`` read the registry. Either way the
running controller (``edgefleet serve``) steps the rollout. So ``create`` returns at once, and
``pause``/``resume``/``abort`` take effect at the controller's next step
(``abort``'s rollbacks included).
"""

from __future__ import annotations

import getpass
import json
import shutil
import sys
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click

from edgefleet.controller.cli.context import Context, pass_ctx
from edgefleet.controller.cli.output import (
    CommandError,
    emit,
    friendly_errors,
    json_option,
    render_table,
)
from edgefleet.controller.rollout.engine import RolloutConfig, RolloutStatus

if TYPE_CHECKING:
    from edgefleet.controller.rollout.store import (
        DecisionInfo,
        RolloutInfo,
        RolloutStore,
        WaveInfo,
    )

__all__ = ["rollout_group"]

_ENDED = {
    RolloutStatus.COMPLETED,
    RolloutStatus.HALTED,
    RolloutStatus.ABORTED,
    RolloutStatus.SUPERSEDED,
}


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (containers)
        return "cli"


def _store(ctx: Context) -> RolloutStore:
    # The store (SQLAlchemy) loads when a rollout command runs, not for --help.
    from edgefleet.controller.rollout.store import RolloutStore

    return RolloutStore(ctx.registry(), actor=_actor())


def _ts(value: datetime | None) -> str | None:
    return None if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _canary(value: str) -> dict[str, Any]:
    text = value.strip()
    try:
        if text.endswith("%"):
            return {"canary_count": None, "canary_pct": float(text[:-1])}
        return {"canary_count": int(text), "canary_pct": None}
    except ValueError:
        raise click.BadParameter(
            f"expected a device count (5) or a percentage (10%), got {value!r}"
        ) from None


def _info_dict(info: RolloutInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "model": info.model,
        "version": info.version,
        "release": info.release,
        "status": info.status.value,
        "reason": info.reason,
        "selector": info.selector.to_dict(),
        "config": info.config.to_dict(),
        "wave": info.wave,
        "created_at": info.created_at,
        "started_at": info.started_at,
        "deadline_at": info.deadline_at,
        "finished_at": info.finished_at,
        "next_wave_at": info.next_wave_at,
        "devices": info.devices,
        "counts": info.counts,
        "skipped": info.skipped,
    }


def _wave_dict(w: WaveInfo) -> dict[str, Any]:
    return {"wave": w.wave, "devices": w.devices, "counts": w.counts, "p95_ms": w.p95_ms}


def _decision_dict(d: DecisionInfo) -> dict[str, Any]:
    return {
        "id": d.id,
        "at": d.at,
        "kind": d.kind,
        "device": d.device_id,
        "wave": d.wave,
        "actor": d.actor,
        "reason": d.reason,
    }


def _wave_label(wave: int) -> str:
    return "unstarted" if wave < 0 else "canary" if wave == 0 else f"wave {wave}"


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none"


def _header(info: RolloutInfo) -> str:
    lines = [
        f"rollout {info.id}: {info.label} (release {info.release}) -> {info.selector.describe()}",
        f"status: {info.status.value}" + (f" - {info.reason}" if info.reason else ""),
        f"devices: {info.devices} ({_counts_text(info.counts)})",
        f"created {_ts(info.created_at)}, started {_ts(info.started_at) or '-'}, "
        f"deadline {_ts(info.deadline_at) or '-'}, finished {_ts(info.finished_at) or '-'}",
    ]
    lines += [f"skipped {d}: {why}" for d, why in sorted(info.skipped.items())]
    if info.next_wave_at is not None and info.status is RolloutStatus.RUNNING:
        lines.append(f"soaking until {_ts(info.next_wave_at)}")
    return "\n".join(lines)


# Device states that count as "done" for a wave's progress bar.
_DONE = {"updated", "failed", "timed_out", "expired", "cancelled", "rolled_back", "rollback_failed"}


def _bar(done: int, total: int, width: int) -> str:
    filled = 0 if total == 0 else round(width * done / total)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def _waves_table(waves: list[WaveInfo], *, bars: bool) -> str:
    width = max(10, min(30, shutil.get_terminal_size((100, 20)).columns - 70))
    rows = []
    for w in waves:
        done = sum(n for k, n in w.counts.items() if k in _DONE)
        row: list[Any] = [_wave_label(w.wave), w.devices]
        if bars:
            row.append(f"{_bar(done, w.devices, width)} {done}/{w.devices}")
        row += [None if w.p95_ms is None else f"{w.p95_ms:.2f}", _counts_text(w.counts)]
        rows.append(row)
    headers = ["wave", "devices", *(["progress"] if bars else []), "p95 ms", "states"]
    return render_table(headers, rows)


@click.group("rollout")
def rollout_group() -> None:
    """Staged rollouts: canary, exponential waves, health gates, automatic rollback."""


@rollout_group.command("create")
@click.argument("model")
@click.argument("version")
@click.option("--device", "devices", multiple=True, help="Target device id (repeatable).")
@click.option(
    "--tag", "tags", multiple=True, help="Target devices with this tag/group (repeatable)."
)
@click.option(
    "--profile",
    "profiles",
    multiple=True,
    help="Target devices of this hardware profile (repeatable).",
)
@click.option(
    "--all", "all_devices", is_flag=True, help="Target every device, including later ones."
)
@click.option("--canary", default="1", show_default=True, help="Canary size: N devices or P%.")
@click.option("--base-rate", type=int, default=1, show_default=True, help="Devices in wave 1.")
@click.option(
    "--increment-factor", type=float, default=2.0, show_default=True, help="Growth per wave."
)
@click.option("--max-rate", type=int, default=50, show_default=True, help="Largest wave.")
@click.option("--max-in-flight", type=int, default=10, show_default=True)
@click.option("--soak-s", type=float, default=60.0, show_default=True, help="Pause between waves.")
@click.option(
    "--observe-s", type=float, default=60.0, show_default=True, help="Health window per device."
)
@click.option("--device-timeout-s", type=float, default=900.0, show_default=True)
@click.option(
    "--deadline-s",
    type=float,
    default=7 * 24 * 3600.0,
    show_default=True,
    help="Offline devices not started by then expire.",
)
@click.option("--failure-threshold-pct", type=float, default=10.0, show_default=True)
@click.option("--timeout-threshold-pct", type=float, default=20.0, show_default=True)
@click.option(
    "--min-executed",
    type=int,
    default=5,
    show_default=True,
    help="Devices finished before thresholds apply (the canary is always judged).",
)
@click.option("--max-error-rate", type=float, default=0.05, show_default=True)
@click.option(
    "--max-p95-ratio",
    type=float,
    default=1.5,
    show_default=True,
    help="Allowed p95 latency vs the device's previous version.",
)
@click.option("--p95-slack-ms", type=float, default=2.0, show_default=True)
@click.option("--start/--no-start", default=True, show_default=True, help="Start right away.")
@json_option
@pass_ctx
def create(
    ctx: Context,
    /,
    model: str,
    version: str,
    devices: tuple[str, ...],
    tags: tuple[str, ...],
    profiles: tuple[str, ...],
    all_devices: bool,
    canary: str,
    start: bool,
    as_json: bool,
    **strategy: Any,
) -> None:
    """Create (and start) a rollout of MODEL VERSION."""
    from edgefleet.controller.rollout.store import Selector

    with friendly_errors():
        selector = Selector(devices=devices, tags=tags, profiles=profiles, all=all_devices)
        config = RolloutConfig(**_canary(canary), **strategy)
        api = ctx.api()
        if api is not None:
            reply = api.create_rollout(
                {
                    "model": model,
                    "version": version,
                    "selector": selector.to_dict(),
                    "canary": canary,
                    "strategy": strategy,
                    "start": start,
                }
            )
            info = _info_from_api(reply)
            emit(as_json, _info_dict(info), lambda: _header(info))
            return
        store = _store(ctx)
        try:
            info = store.create(model, version, selector, config, start=start)
        finally:
            store.registry.close()
    emit(as_json, _info_dict(info), lambda: _header(info))


def _info_from_api(d: dict[str, Any]) -> RolloutInfo:
    """A rollout as the API returns it (``rollout_json``), for the same views as the registry's."""
    from edgefleet.controller.rollout.selector import Selector
    from edgefleet.controller.rollout.store import RolloutInfo

    def when(key: str) -> datetime | None:
        value = d.get(key)
        return None if value is None else datetime.fromisoformat(str(value))

    created = when("created_at")
    return RolloutInfo(
        id=str(d["id"]),
        model=str(d["model"]),
        version=str(d["version"]),
        release=int(d["release"]),
        status=RolloutStatus(d["status"]),
        selector=Selector.from_dict(d["selector"]),
        config=RolloutConfig.from_dict(d["config"]),
        wave=int(d["wave"]),
        created_at=created if created is not None else datetime.min,
        started_at=when("started_at"),
        deadline_at=when("deadline_at"),
        finished_at=when("finished_at"),
        next_wave_at=when("next_wave_at"),
        reason=str(d.get("reason") or ""),
        steps=int(d.get("steps") or 0),
        counts={str(k): int(v) for k, v in (d.get("counts") or {}).items()},
        skipped={str(k): str(v) for k, v in (d.get("skipped") or {}).items()},
    )


def _command(ctx: Context, rollout_id: str, verb: str, reason: str, as_json: bool) -> None:
    with friendly_errors():
        api = ctx.api()
        if api is not None:
            info = _info_from_api(api.steer_rollout(rollout_id, verb, reason))
            emit(as_json, _info_dict(info), lambda: _header(info))
            return
        store = _store(ctx)
        try:
            info = (
                getattr(store, verb)(rollout_id, reason)
                if verb != "start"
                else store.start(rollout_id)
            )
        finally:
            store.registry.close()
    emit(as_json, _info_dict(info), lambda: _header(info))


@rollout_group.command("start")
@click.argument("rollout_id")
@json_option
@pass_ctx
def start_cmd(ctx: Context, rollout_id: str, as_json: bool) -> None:
    """Start a rollout created with --no-start."""
    _command(ctx, rollout_id, "start", "", as_json)


@rollout_group.command("pause")
@click.argument("rollout_id")
@click.option("--reason", default="", help="Recorded in the decision log.")
@json_option
@pass_ctx
def pause_cmd(ctx: Context, rollout_id: str, reason: str, as_json: bool) -> None:
    """Start no more devices (started ones are still judged)."""
    _command(ctx, rollout_id, "pause", reason, as_json)


@rollout_group.command("resume")
@click.argument("rollout_id")
@click.option("--reason", default="", help="Recorded in the decision log.")
@json_option
@pass_ctx
def resume_cmd(ctx: Context, rollout_id: str, reason: str, as_json: bool) -> None:
    """Continue a paused rollout."""
    _command(ctx, rollout_id, "resume", reason, as_json)


@rollout_group.command("abort")
@click.argument("rollout_id")
@click.option("--reason", default="", help="Recorded in the decision log.")
@json_option
@pass_ctx
def abort_cmd(ctx: Context, rollout_id: str, reason: str, as_json: bool) -> None:
    """Stop the rollout and roll started devices back to their previous model."""
    _command(ctx, rollout_id, "abort", reason, as_json)


@rollout_group.command("list")
@json_option
@pass_ctx
def list_cmd(ctx: Context, as_json: bool) -> None:
    """All rollouts, newest first."""
    with friendly_errors():
        store = _store(ctx)
        try:
            infos = store.list_rollouts()
        finally:
            store.registry.close()
    emit(
        as_json,
        [_info_dict(i) for i in infos],
        lambda: render_table(
            ["id", "model", "status", "wave", "devices", "states", "created"],
            [
                [
                    i.id,
                    i.label,
                    i.status.value,
                    i.wave,
                    i.devices,
                    _counts_text(i.counts),
                    _ts(i.created_at),
                ]
                for i in infos
            ],
        ),
    )


@rollout_group.command("show")
@click.argument("rollout_id")
@click.option("--devices", "with_devices", is_flag=True, help="Also list every device.")
@json_option
@pass_ctx
def show_cmd(ctx: Context, rollout_id: str, with_devices: bool, as_json: bool) -> None:
    """The rollout's story: status, waves, and every decision with its reason."""
    with friendly_errors():
        store = _store(ctx)
        try:
            info = store.get(rollout_id)
            waves = store.waves(rollout_id)
            decisions = store.decisions(rollout_id)
            devices = store.devices(rollout_id)
        finally:
            store.registry.close()
    data = {
        **_info_dict(info),
        "waves": [_wave_dict(w) for w in waves],
        "decisions": [_decision_dict(d) for d in decisions],
        "device_states": [
            {
                "device": d.device_id,
                "state": d.state.value,
                "wave": d.wave,
                "reason": d.reason,
                "baseline_p95_ms": d.baseline_p95_ms,
                "observed_p95_ms": d.observed_p95_ms,
                "requests": d.observed_requests,
                "errors": d.observed_errors,
            }
            for d in devices
        ],
    }

    def table() -> str:
        parts = [_header(info), "", _waves_table(waves, bars=False)]
        if with_devices:
            parts += [
                "",
                render_table(
                    ["device", "wave", "state", "base p95", "p95", "req", "err", "reason"],
                    [
                        [
                            d.device_id,
                            d.wave,
                            d.state.value,
                            None if d.baseline_p95_ms is None else f"{d.baseline_p95_ms:.2f}",
                            None if d.observed_p95_ms is None else f"{d.observed_p95_ms:.2f}",
                            d.observed_requests,
                            d.observed_errors,
                            d.reason,
                        ]
                        for d in devices
                    ],
                ),
            ]
        parts += [
            "",
            render_table(
                ["time", "decision", "device", "wave", "by", "reason"],
                [[_ts(d.at), d.kind, d.device_id, d.wave, d.actor, d.reason] for d in decisions],
            ),
        ]
        return "\n".join(parts)

    emit(as_json, data, table)


@rollout_group.command("watch")
@click.argument("rollout_id")
@click.option(
    "--interval", type=float, default=2.0, show_default=True, help="Seconds between updates."
)
@click.option("--once", is_flag=True, help="Print one update and exit.")
@json_option
@pass_ctx
def watch_cmd(ctx: Context, rollout_id: str, interval: float, once: bool, as_json: bool) -> None:
    """Live per-wave progress and latency until the rollout ends (Ctrl-C to stop watching).

    Exit status: 0 when the rollout completed (or with --once), 1 when it
    ended any other way (halted, aborted, superseded), so scripts can wait on it.
    """
    info: RolloutInfo | None = None
    with friendly_errors():
        store = _store(ctx)
        last_decision = 0
        try:
            while True:
                info = store.get(rollout_id)
                waves = store.waves(rollout_id)
                new = store.decisions(rollout_id, after_id=last_decision)
                if new:
                    last_decision = new[-1].id
                if as_json:
                    click.echo(
                        json.dumps(
                            {
                                **_info_dict(info),
                                "waves": [_wave_dict(w) for w in waves],
                                "new_decisions": [_decision_dict(d) for d in new],
                            },
                            default=str,
                            sort_keys=True,
                        )
                    )
                else:
                    if not once and sys.stdout.isatty():
                        click.clear()
                    click.echo(_header(info))
                    click.echo("")
                    click.echo(_waves_table(waves, bars=True))
                    for d in new[-10:]:
                        device = f" {d.device_id}" if d.device_id else ""
                        click.echo(f"  {_ts(d.at)} {d.kind}{device}: {d.reason}")
                if once or (info.status in _ENDED and not _rolling_back(info)):
                    break
                time.sleep(interval)
        except KeyboardInterrupt:
            return
        finally:
            store.registry.close()
    if not once and info is not None and info.status is not RolloutStatus.COMPLETED:
        status = info.status.value
        reason = f": {info.reason}" if info.reason else ""
        raise CommandError(f"rollout {info.id} {status}{reason}", f"rollout_{status}")


def _rolling_back(info: RolloutInfo) -> bool:
    return bool(info.counts.get("rolling_back"))
