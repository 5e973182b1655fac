"""The fleet at a glance and the one-shot deploy: ``edgefleet devices``, ``deploy``, ``status``.

Staged rollouts with waves and health gates are ``edgefleet rollout``
(:mod:`edgefleet.controller.cli.rollout`); ``deploy`` sets the desired model
of its targets at once.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any

import click

from edgefleet.controller.cli.context import Context, pass_ctx
from edgefleet.controller.cli.output import (
    CommandError,
    device_counts,
    emit,
    friendly_errors,
    json_option,
    render_table,
)
from edgefleet.protocols.bounds import fold_reasons

if TYPE_CHECKING:
    from edgefleet.controller.cli.follow import FollowResult
    from edgefleet.controller.registry import Registry

__all__ = ["deploy", "devices", "status"]

BY_DEVICE_ROWS = 20
"""``status`` lists at most this many (device, kind, reason) rows, the largest first."""


def _count_rows(by_device: dict[str, dict[str, dict[str, int]]]) -> list[list[Any]]:
    rows: list[tuple[str, str, str, int]] = [
        (device, kind, reason, n)
        for device, kinds in by_device.items()
        for kind, reasons in kinds.items()
        for reason, n in reasons.items()
    ]
    rows.sort(key=lambda r: (-r[3], r[0], r[1], r[2]))
    return [list(r) for r in rows]


ACK_TIMEOUT_S = 300.0
"""Default seconds after which a published desired state no device reported is flagged."""


def _ack_timeout_option(f: Any) -> Any:
    return click.option(
        "--ack-timeout-s",
        type=click.FloatRange(min=0),
        default=None,
        envvar="EDGEFLEET_ACK_TIMEOUT_S",
        help="Flag a published desired state the device has not reported after this long. "
        f"Default: [service] ack_warning_s of the config ({ACK_TIMEOUT_S:g}).",
    )(f)


def _ack_timeout(ctx: Context, given: float | None) -> float:
    """``--ack-timeout-s``, else the config's ``[service] ack_warning_s``."""
    return given if given is not None else ctx.config().service.ack_warning_s


def _device_rows(
    registry: Registry,
    revoked: AbstractSet[str] = frozenset(),
    ack_timeout_s: float = ACK_TIMEOUT_S,
) -> list[dict[str, Any]]:
    from edgefleet.controller.registry import models as m
    from edgefleet.controller.registry.fleet import delivery_state

    now = m.utcnow()
    return [
        {
            "id": s.device_id,
            "online": s.online,
            "revoked": s.device_id in revoked,
            "hardware_class": s.hardware_class,
            "profile": s.profile,
            "variant": s.variant,
            "tags": list(s.tags),
            "duplicate_at": s.duplicate_at,
            "state": s.state,
            "active_version": s.active_version,
            "desired_version": s.desired_version,
            "delivery": delivery_state(s, now, ack_timeout_s),
            "inferences": s.inferences,
            "errors": s.errors,
            "p50_ms": s.p50_ms,
            "last_error": s.last_error_code,
            "last_seen": s.last_seen,
        }
        for s in registry.device_summaries()
    ]


@click.command()
@_ack_timeout_option
@json_option
@pass_ctx
def devices(ctx: Context, ack_timeout_s: float | None, as_json: bool) -> None:
    """List devices with what they run and how they are doing.

    DELIVERY says what became of the desired state: unpublished (no running
    `edgefleet serve` has sent it), waiting, unacknowledged (sent, and the
    device has not reported it within --ack-timeout-s) or acknowledged.
    """
    from edgefleet.controller.ca import revoked_device_ids

    with friendly_errors():
        # Revocation lives in the CA's index (`edgefleet device revoke`).
        revoked = revoked_device_ids(ctx.config().home / "ca")
        registry = ctx.registry()
        try:
            rows = _device_rows(registry, revoked, _ack_timeout(ctx, ack_timeout_s))
        finally:
            registry.close()
    emit(as_json, rows, lambda: _devices_table(rows))


def _online_cell(row: dict[str, Any]) -> str:
    online = "revoked" if row["revoked"] else "yes" if row["online"] else "no"
    return f"{online} (duplicate id?)" if row["duplicate_at"] is not None else online


def _devices_table(rows: list[dict[str, Any]]) -> str:
    text = render_table(
        [
            "device",
            "online",
            "profile",
            "variant",
            "state",
            "active",
            "desired",
            "delivery",
            "tags",
            "inferences",
            "p50 ms",
            "last error",
        ],
        [
            [
                r["id"],
                _online_cell(r),
                r["profile"],
                r["variant"],
                r["state"],
                r["active_version"],
                r["desired_version"],
                r["delivery"],
                ",".join(r["tags"]) or None,
                r["inferences"],
                None if r["p50_ms"] is None else f"{r['p50_ms']:.2f}",
                r["last_error"],
            ]
            for r in rows
        ],
    )
    duplicates = [r["id"] for r in rows if r["duplicate_at"] is not None]
    if duplicates:
        text += (
            f"\n\n{len(duplicates)} device id(s) seem to be used by two agents at once: "
            f"{', '.join(duplicates[:10])}{' ...' if len(duplicates) > 10 else ''} "
            "(`edgefleet device events ID`)"
        )
    return text


@click.command()
@click.argument("name")
@click.argument("version")
@click.option("--device", "device_ids", multiple=True, help="Target device id (repeatable).")
@click.option("--tag", "tags", multiple=True, help="Target devices with this tag (repeatable).")
@click.option("--all", "all_devices", is_flag=True, help="Target every enrolled device.")
@click.option(
    "--wait",
    is_flag=True,
    help="Follow the devices until they run the model; exit 1 if one fails or time runs out.",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0),
    default=600.0,
    show_default=True,
    help="With --wait: seconds to wait for every device.",
)
@click.option(
    "--publish-wait-s",
    type=click.FloatRange(0, 60),
    default=5.0,
    show_default=True,
    help="With --api: how long the controller waits for the broker to take each "
    "desired state before it answers.",
)
@json_option
@pass_ctx
def deploy(
    ctx: Context,
    name: str,
    version: str,
    device_ids: tuple[str, ...],
    tags: tuple[str, ...],
    all_devices: bool,
    wait: bool,
    timeout_s: float,
    publish_wait_s: float,
    as_json: bool,
) -> None:
    """Deploy NAME VERSION: set the desired model of the target devices.

    With --api (EDGEFLEET_API) the running controller deploys and publishes,
    and the answer says per device whether the broker took it. Without it the
    deployment is only recorded in the registry; a running `edgefleet serve`
    on that registry publishes it (`edgefleet status` shows what was not
    delivered). This command never connects to a broker itself.
    """
    if not (device_ids or tags or all_devices) or (all_devices and (device_ids or tags)):
        raise click.UsageError("give --device ID and/or --tag TAG (repeatable), or --all")
    with friendly_errors():
        api = ctx.api()
        if api is not None:
            reply = api.deploy(
                name,
                version,
                devices=list(device_ids),
                tags=list(tags),
                all_devices=all_devices,
                wait_published_s=publish_wait_s,
            )
            targets = {d["device_id"]: int(d["generation"]) for d in reply["devices"]}
            unpublished = sorted(d["device_id"] for d in reply["devices"] if not d["published"])
            deployment_id = str(reply["deployment"]["id"])
        else:
            deployment_id, targets = _record_deployment(
                ctx, name, version, list(device_ids), list(tags), all_devices
            )
            unpublished = sorted(targets)
    data: dict[str, Any] = {
        "deployment": deployment_id,
        "model": name,
        "version": version,
        "devices": list(targets),
        "via": "api" if api is not None else "registry",
        "api": None if api is None else api.base_url,
        "recorded": len(targets),
        "published": len(targets) - len(unpublished),
        "unpublished": unpublished,
    }
    text = _deploy_text(data)
    if not wait:
        emit(as_json, data, lambda: text)
        return
    if not as_json:
        click.echo(text)
    result = _follow(ctx, targets, name, version, timeout_s, show=not as_json)
    data["wait"] = {
        "active": result.active,
        "failed": {d: result.errors.get(d) for d in result.failed},
        "pending": {d: result.phases[d] for d in result.pending},
        "timed_out": result.timed_out,
    }
    if result.failed or result.pending:
        raise _wait_error(data, result, timeout_s)
    emit(as_json, data, lambda: f"all {len(result.active)} device(s) run {name}@{version}")


def _record_deployment(
    ctx: Context,
    name: str,
    version: str,
    device_ids: list[str],
    tags: list[str],
    all_devices: bool,
) -> tuple[str, dict[str, int]]:
    """Record the deployment in the registry only; the running service publishes it."""
    from edgefleet.controller.fleet_actions import select_devices

    registry = ctx.registry()
    try:
        targets = select_devices(registry, devices=device_ids, tags=tags, all_devices=all_devices)
        mv = registry.get_model_version(name, version)
        deployment = registry.create_deployment(mv.id, targets)
    finally:
        registry.close()
    return deployment.id, {t.device_id: t.generation for t in deployment.targets}


def _deploy_text(data: dict[str, Any]) -> str:
    head = (
        f"deployment {data['deployment']}: {data['model']}@{data['version']} -> "
        f"{data['recorded']} device(s)"
    )
    if data["via"] == "registry":
        return (
            f"{head}; {data['recorded']} desired state(s) recorded in the registry, "
            "none published by this command.\nA running `edgefleet serve` on this registry "
            "publishes them; `edgefleet status` shows any it has not "
            "(or pass --api URL to deploy through the running controller)."
        )
    text = f"{head} via {data['api']}; the controller published {data['published']}"
    if data["unpublished"]:
        shown = ", ".join(data["unpublished"][:10]) + (
            " ..." if len(data["unpublished"]) > 10 else ""
        )
        text += (
            f"; {len(data['unpublished'])} not yet published ({shown}): it publishes them "
            "when its broker takes them (`edgefleet status`)"
        )
    return text


def _follow(
    ctx: Context,
    targets: dict[str, int],
    name: str,
    version: str,
    timeout_s: float,
    *,
    show: bool,
) -> FollowResult:
    """Poll the API (with --api) or the registry until the targets settle."""
    from edgefleet.controller.cli.follow import (
        DeviceProgress,
        follow,
        progress_from_api,
        progress_from_summaries,
    )

    with friendly_errors():
        api = ctx.api()
        if api is not None:
            client = api

            def fetch() -> dict[str, DeviceProgress]:
                return progress_from_api(client.devices())

            return follow(fetch, targets, name, version, timeout_s=timeout_s, show=show)
        registry = ctx.registry()
        try:
            return follow(
                lambda: progress_from_summaries(registry.device_summaries()),
                targets,
                name,
                version,
                timeout_s=timeout_s,
                show=show,
            )
        finally:
            registry.close()


def _wait_error(data: dict[str, Any], result: FollowResult, timeout_s: float) -> CommandError:
    parts = []
    if result.failed:
        parts.append(
            "failed: "
            + ", ".join(f"{d} ({result.errors.get(d) or 'rolled back'})" for d in result.failed)
        )
    if result.pending:
        parts.append(
            f"not active after {timeout_s:g}s: "
            + ", ".join(f"{d} ({result.phases[d]})" for d in result.pending)
        )
    code = "deploy_failed" if result.failed else "deploy_timeout"
    sentence = (
        f"deployment {data['deployment']} of {data['model']}@{data['version']}: "
        f"{len(result.active)}/{len(result.phases)} active; " + "; ".join(parts)
    )
    return CommandError(sentence, code, {"deployment": data["deployment"], **data["wait"]})


def _agent_rejections(counters: dict[str, int]) -> dict[str, int]:
    """Sum the per-device ``agent_rejected.<device>.<reason>`` counters by reason.

    Reasons outside the known set (rows an older controller stored for
    whatever keys a device invented) are summed under ``other``, so the
    output stays a few lines whatever the database holds.
    """
    totals: dict[str, int] = {}
    for name, value in counters.items():
        if name.startswith("agent_rejected."):
            reason = name.rsplit(".", 1)[-1]
            totals[reason] = totals.get(reason, 0) + value
    return fold_reasons(totals)


@click.command()
@_ack_timeout_option
@json_option
@pass_ctx
def status(ctx: Context, ack_timeout_s: float | None, as_json: bool) -> None:
    """Fleet overview: devices online, version distribution, health, delivery."""
    with friendly_errors():
        ack_timeout_s = _ack_timeout(ctx, ack_timeout_s)
        registry = ctx.registry()
        try:
            fleet = registry.fleet_status()
            device_rows = _device_rows(registry, ack_timeout_s=ack_timeout_s)
        finally:
            registry.close()
    delivery = {
        state: sorted(r["id"] for r in device_rows if r["delivery"] == state)
        for state in ("unpublished", "unacknowledged")
    }
    rejected_by_controller = {
        k.removeprefix("rejected."): v
        for k, v in fleet.counters.items()
        if k.startswith("rejected.")
    }
    rejected_by_agents = _agent_rejections(fleet.counters)
    by_device = device_counts(fleet.counters)
    data = {
        "devices": fleet.devices,
        "online": fleet.online,
        "offline": fleet.offline,
        "failed": fleet.failed,
        "versions": fleet.versions,
        "inferences": fleet.inferences,
        "errors": fleet.errors,
        "duplicate_ids": fleet.duplicates,
        "delivery": {state: len(ids) for state, ids in delivery.items()},
        "rejected": rejected_by_controller,
        "agent_rejected": rejected_by_agents,
        "by_device": by_device,
    }

    def table() -> str:
        head = (
            f"devices: {fleet.devices} ({fleet.online} online, {fleet.offline} offline, "
            f"{fleet.failed} failed)\ninferences: {fleet.inferences}, errors: {fleet.errors}"
        )
        for state, ids in delivery.items():
            if ids:
                shown = ", ".join(ids[:5]) + (" ..." if len(ids) > 5 else "")
                head += f"\ndesired states {state}: {len(ids)} ({shown})"
        if delivery["unpublished"]:
            head += "\n  `edgefleet serve` publishes desired states: is it running and connected?"
        if delivery["unacknowledged"]:
            head += f"\n  published more than {ack_timeout_s:g}s ago and not reported by the device"
        if fleet.duplicates:
            head += (
                f"\nduplicate device ids: {fleet.duplicates} device(s) seem to run two agents "
                "(`edgefleet devices`)"
            )
        versions = render_table(["model version", "devices"], sorted(fleet.versions.items()))
        rejected = (
            ", ".join(f"{k}={v}" for k, v in sorted(rejected_by_controller.items())) or "none"
        )
        by_agents = ", ".join(f"{k}={v}" for k, v in sorted(rejected_by_agents.items())) or "none"
        rejected += f"\nrefused by agents: {by_agents}"
        text = f"{head}\n\n{versions}\n\nrejected messages: {rejected}"
        rows = _count_rows(by_device)
        if rows:
            more = len(rows) - BY_DEVICE_ROWS
            text += "\n\noverloads and refusals by device:\n" + render_table(
                ["device", "kind", "reason", "count"], rows[:BY_DEVICE_ROWS]
            )
            if more > 0:
                text += f"\n... and {more} more (`edgefleet status --json`)"
        return text

    emit(as_json, data, table)
