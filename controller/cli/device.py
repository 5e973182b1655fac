"""``edgefleet device ...``: enroll a device by hand and read its event log.

Token enrollment and revocation (``device token``, ``device revoke``) belong
to the security commands (:mod:`edgefleet.controller.cli.security`); the root
group adds them to this group.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
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
from edgefleet.shared.durable import atomic_write

if TYPE_CHECKING:
    from edgefleet.shared.link import BrokerSettings

__all__ = ["device_group"]


@click.group("device")
def device_group() -> None:
    """Enroll devices, tag them, read their events; tokens and revocation."""


def agent_config_text(
    device_id: str,
    *,
    state_dir: str,
    hardware_class: str,
    broker: BrokerSettings,
    http_host: str = "127.0.0.1",
    http_port: int = 8470,
) -> str:
    """The ``agent.toml`` an enrolled device starts with (strings quoted as TOML/JSON)."""

    def q(value: str) -> str:
        return json.dumps(value)  # a JSON string is a valid TOML basic string

    lines = [
        f"device_id = {q(device_id)}",
        f"state_dir = {q(state_dir)}",
        'trust_root = "root.json"',
        f"hardware_class = {q(hardware_class)}",
        "telemetry_interval_s = 10",
        "",
        "[broker]",
        f"host = {q(broker.host)}",
        f"port = {broker.port}",
        f"tls = {'true' if broker.tls else 'false'}",
        "",
        "[http]",
        f"host = {q(http_host)}",
        f"port = {http_port}",
    ]
    return "\n".join(lines) + "\n"


@device_group.command("enroll")
@click.argument("device_id")
@click.option("--hardware-class", default="generic", show_default=True)
@click.option("--tag", "tags", multiple=True, help="Tag the device (repeatable).")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory to write the agent's config and trusted root into.",
)
@click.option(
    "--state-dir",
    default="/var/lib/edgefleet-agent",
    show_default=True,
    help="State directory the agent will use on the device.",
)
@click.option(
    "--broker-host",
    default=None,
    help="Broker host the agent connects to. Default: [broker] of --config, else the "
    "address `edgefleet serve` last ran with in this home.",
)
@click.option(
    "--broker-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Broker port the agent connects to (default: as --broker-host).",
)
@click.option(
    "--agent-http-port",
    type=click.IntRange(0, 65535),
    default=8470,
    show_default=True,
    help="Port of the agent's local inference endpoint (0: any free port); "
    "give each agent on one machine its own.",
)
@json_option
@pass_ctx
def device_enroll(
    ctx: Context,
    device_id: str,
    hardware_class: str,
    tags: tuple[str, ...],
    out_dir: Path,
    state_dir: str,
    broker_host: str | None,
    broker_port: int | None,
    agent_http_port: int,
    as_json: bool,
) -> None:
    """Enroll DEVICE_ID and write its agent.toml and root.json to --out.

    Copy the two files to the device; the TUF root reaches the agent this
    once, out of band, and is updated through TUF's chain of trust after.
    The agent's broker address is printed with where it came from.
    """
    with friendly_errors():
        broker, origin = ctx.agent_broker()
        if broker_host is not None or broker_port is not None:
            broker = replace(
                broker, host=broker_host or broker.host, port=broker_port or broker.port
            )
            origin = "from --broker-host/--broker-port"
        root = ctx.repository().root_bytes()  # refuses a missing home before enrolling
        registry = ctx.registry()
        try:
            registry.enroll_device(device_id, hardware_class=hardware_class, tags=tags)
        finally:
            registry.close()
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / "root.json", root)
        text = agent_config_text(
            device_id,
            state_dir=state_dir,
            hardware_class=hardware_class,
            broker=broker,
            http_port=agent_http_port,
        )
        atomic_write(out_dir / "agent.toml", text.encode())
    data = {
        "device_id": device_id,
        "config": str(out_dir / "agent.toml"),
        "trust_root": str(out_dir / "root.json"),
        "broker": f"{broker.host}:{broker.port}",
        "broker_from": origin,
        "agent_http_port": agent_http_port,
    }
    emit(
        as_json,
        data,
        lambda: (
            f"enrolled {device_id}; agent broker {broker.host}:{broker.port} ({origin}), "
            f"agent HTTP port {agent_http_port}\ncopy {out_dir}/agent.toml and "
            f"{out_dir}/root.json to the device and run: edgefleet-agent --config agent.toml"
        ),
    )


@device_group.command("tag")
@click.argument("device_id")
@click.option("--add", "add", multiple=True, metavar="TAG", help="Add a tag (repeatable).")
@click.option("--remove", "remove", multiple=True, metavar="TAG", help="Remove a tag (repeatable).")
@json_option
@pass_ctx
def device_tag(
    ctx: Context, device_id: str, add: tuple[str, ...], remove: tuple[str, ...], as_json: bool
) -> None:
    """Add or remove DEVICE_ID's tags; without options, show them.

    With --api the running controller changes them (an operator token).

    Rollouts select by tag when they choose their devices; a running rollout
    keeps the devices it chose.
    """
    with friendly_errors():
        api = ctx.api()
        if api is not None:
            reply = (
                api.update_tags(device_id, list(add), list(remove))
                if add or remove
                else api.device(device_id)
            )
            tags = list(reply["tags"])
            emit(
                as_json,
                {"device_id": device_id, "tags": tags},
                lambda: f"{device_id}: {', '.join(tags) or '(no tags)'}",
            )
            return
        registry = ctx.registry()
        try:
            if add or remove:
                device = registry.update_tags(device_id, add=add, remove=remove)
            else:
                found = registry.get_device(device_id)
                if found is None:
                    raise CommandError(f"no device {device_id!r} is enrolled", "not_found")
                device = found
        finally:
            registry.close()
    data = {"device_id": device.id, "tags": list(device.tags)}
    emit(as_json, data, lambda: f"{device.id}: {', '.join(device.tags) or '(no tags)'}")


def _event_message(row: dict[str, Any]) -> str | None:
    """The error's message, or for an event without one the reason in its detail."""
    message = row["message"]
    if message is None and isinstance(row["detail"], dict):
        reason = row["detail"].get("reason")
        message = None if reason is None else str(reason)
    return None if message is None else message[:80]


@device_group.command("events")
@click.argument("device_id")
@click.option("--limit", default=30, show_default=True, type=click.IntRange(1, 10_000))
@json_option
@pass_ctx
def device_events(ctx: Context, device_id: str, limit: int, as_json: bool) -> None:
    """Show DEVICE_ID's recent events, newest first: installs, refusals and why.

    Events are in the device's own order (SEQ, its agent's event number),
    not by time: several can share a second, and replays arrive late.
    """
    with friendly_errors():
        registry = ctx.registry()
        try:
            if registry.get_device(device_id) is None:
                raise CommandError(f"no device {device_id!r} is enrolled", "not_found")
            events = registry.events_for(device_id, limit)
            counts = device_counts(registry.counters(), device_id).get(device_id, {})
        finally:
            registry.close()
    rows: list[dict[str, Any]] = [
        {
            "at": e.at.isoformat(),
            "seq": e.seq,
            "journal": e.journal,
            "kind": e.kind,
            "deployment": e.deployment_id,
            "generation": e.generation,
            "code": None if e.error is None else e.error.code,
            "message": None if e.error is None else e.error.message,
            "detail": e.detail,
        }
        for e in events
    ]

    def table() -> str:
        text = render_table(
            ["seq", "at", "event", "generation", "code", "message"],
            [
                [
                    r["seq"],
                    r["at"][:19],
                    r["kind"],
                    r["generation"],
                    r["code"],
                    _event_message(r),
                ]
                for r in rows
            ],
        )
        # What the device cost the fleet, summed since the registry started:
        # its refused requests (overloads) and the messages refused on either side.
        totals = "\n".join(
            f"  {kind}: " + ", ".join(f"{r}={n}" for r, n in sorted(reasons.items()))
            for kind, reasons in sorted(counts.items())
        )
        return f"{text}\n\noverloads and refusals:\n{totals or '  none'}"

    # --json keeps its shape (a list of events); `status --json` has the counts.
    emit(as_json, rows, table)
