"""``edgefleet device ...``: enroll a device by hand and read its event log.

Token enrollment and revocation (``device token``, ``device revoke``) belong
to the security commands (:mod:`edgefleet.controller.cli.security`); the root
group adds them to this group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgefleet.controller.cli.context import Context, pass_ctx
from edgefleet.controller.cli.output import (
    device_counts,
    emit,
    friendly_errors,
    json_option,
    render_table,
)
from edgefleet.shared.durable import atomic_write

__all__ = ["device_group"]


@click.group("device")
def device_group() -> None:
    """Enroll devices."""


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
@json_option
@pass_ctx
def device_enroll(
    ctx: Context,
    device_id: str,
    hardware_class: str,
    tags: tuple[str, ...],
    out_dir: Path,
    state_dir: str,
    as_json: bool,
) -> None:
    """Enroll DEVICE_ID and write its agent.toml and root.json to --out.

    Copy the two files to the device; the TUF root reaches the agent this
    once, out of band, and is updated through TUF's chain of trust after.
    """
    with friendly_errors():
        cfg = ctx.config()
        registry = ctx.registry()
        try:
            registry.enroll_device(device_id, hardware_class=hardware_class, tags=tags)
        finally:
            registry.close()
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / "root.json", ctx.repository().root_bytes())
        b = cfg.broker
        lines = [
            f'device_id = "{device_id}"',
            f'state_dir = "{state_dir}"',
            'trust_root = "root.json"',
            f'hardware_class = "{hardware_class}"',
            "telemetry_interval_s = 10",
            "",
            "[broker]",
            f'host = "{b.host}"',
            f"port = {b.port}",
            f"tls = {'true' if b.tls else 'false'}",
            "",
            "[http]",
            'host = "127.0.0.1"',
            "port = 8470",
        ]
        atomic_write(out_dir / "agent.toml", ("\n".join(lines) + "\n").encode())
    data = {
        "device_id": device_id,
        "config": str(out_dir / "agent.toml"),
        "trust_root": str(out_dir / "root.json"),
    }
    emit(
        as_json,
        data,
        lambda: (
            f"enrolled {device_id}; copy {out_dir}/agent.toml and "
            f"{out_dir}/root.json to the device and run: edgefleet-agent --config agent.toml"
        ),
    )


@device_group.command("events")
@click.argument("device_id")
@click.option("--limit", default=30, show_default=True, type=click.IntRange(1, 10_000))
@json_option
@pass_ctx
def device_events(ctx: Context, device_id: str, limit: int, as_json: bool) -> None:
    """Show DEVICE_ID's recent events, newest first: installs, refusals and why."""
    with friendly_errors():
        registry = ctx.registry()
        try:
            if registry.get_device(device_id) is None:
                raise click.ClickException(f"no device {device_id!r} is enrolled")
            events = registry.events_for(device_id, limit)
            counts = device_counts(registry.counters(), device_id).get(device_id, {})
        finally:
            registry.close()
    rows: list[dict[str, Any]] = [
        {
            "at": e.at.isoformat(),
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
            ["at", "event", "generation", "code", "message"],
            [
                [
                    r["at"][:19],
                    r["kind"],
                    r["generation"],
                    r["code"],
                    None if r["message"] is None else r["message"][:80],
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
