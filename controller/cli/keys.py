"""``edgefleet keys ...``: rotate TUF keys, keep the root key offline, renew root.

Rotating the targets, snapshot or timestamp key needs no visit to any device:
a new root version names the new key, signed by the root key, and agents
follow TUF's root chain on their next refresh. Keep the root key offline
(`keys offline-root`) and bring it back only for such root changes
(`--root-key FILE`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from edgefleet.controller.cli.context import Context, pass_ctx
from edgefleet.controller.cli.output import emit, friendly_errors, json_option, render_table

__all__ = ["keys_group"]

_ROOT_KEY = click.option(
    "--root-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The root private key file, if it is kept offline.",
)


@click.group("keys")
def keys_group() -> None:
    """Rotate TUF signing keys and manage the root key."""


@keys_group.command("show")
@json_option
@pass_ctx
def keys_show(ctx: Context, as_json: bool) -> None:
    """Show each role's key ids and the expiry of the current metadata."""
    with friendly_errors():
        repo = ctx.repository()
        root = json.loads(repo.root_bytes())["signed"]
    rows: list[dict[str, Any]] = [
        {"role": role, "keyids": info["keyids"], "threshold": info["threshold"]}
        for role, info in sorted(root["roles"].items())
    ]
    data = {
        "root_version": root["version"],
        "root_expires": root["expires"],
        "root_key_online": repo.root_key_online,
        "roles": rows,
    }
    emit(
        as_json,
        data,
        lambda: (
            f"root version {root['version']}, expires {root['expires']}, root key "
            f"{'online' if repo.root_key_online else 'OFFLINE'}\n"
            + render_table(
                ["role", "threshold", "key ids"],
                [[r["role"], r["threshold"], ", ".join(k[:16] for k in r["keyids"])] for r in rows],
            )
        ),
    )


@keys_group.command("rotate")
@click.argument("role", type=click.Choice(["targets", "snapshot", "timestamp"]))
@_ROOT_KEY
@json_option
@pass_ctx
def keys_rotate(ctx: Context, role: str, root_key: Path | None, as_json: bool) -> None:
    """Replace ROLE's key; agents pick up the new root through TUF's chain of trust."""
    with friendly_errors():
        keyid = ctx.repository().rotate_key(role, root_key=root_key)
    emit(
        as_json,
        {"role": role, "keyid": keyid},
        lambda: f"rotated the {role} key; new key id {keyid}",
    )


@keys_group.command("offline-root")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to move the root private key (e.g. removable media).",
)
@pass_ctx
def keys_offline_root(ctx: Context, out: Path) -> None:
    """Move the root key out of the controller's state directory."""
    with friendly_errors():
        ctx.repository().take_root_key_offline(out)
    click.echo(f"root key moved to {out}; pass it with --root-key for root changes")


@keys_group.command("renew-root")
@_ROOT_KEY
@pass_ctx
def keys_renew_root(ctx: Context, root_key: Path | None) -> None:
    """Sign a new root version with a fresh expiry."""
    with friendly_errors():
        version = ctx.repository().renew_root(root_key=root_key)
    click.echo(f"signed root version {version}")
