"""``edgefleet token create|list|revoke``: API tokens for the management API.

A token is printed once, by ``create``; the registry stores only its hash
(:mod:`edgefleet.controller.registry.tokens`). ``list`` and ``revoke`` name
tokens by their public id.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import click

from edgefleet.controller.cli.context import Context, pass_ctx
from edgefleet.controller.cli.output import emit, friendly_errors, json_option, render_table

if TYPE_CHECKING:
    from edgefleet.controller.registry.tokens import ApiTokenInfo

__all__ = ["token_group"]

_ROLES = ("viewer", "operator", "admin")


def _ts(value: datetime | None) -> str | None:
    return None if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _token_dict(info: ApiTokenInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "name": info.name,
        "role": info.role.value,
        "created_at": info.created_at,
        "last_used_at": info.last_used_at,
        "revoked_at": info.revoked_at,
    }


@click.group("token")
def token_group() -> None:
    """API tokens for the management API (viewer, operator, admin)."""


@token_group.command("create")
@click.option("--role", type=click.Choice(_ROLES), required=True, help="What the token may do.")
@click.option("--name", required=True, help="Who or what uses it (shown in listings).")
@json_option
@pass_ctx
def create_cmd(ctx: Context, role: str, name: str, as_json: bool) -> None:
    """Create a token; it is printed once and only its hash is stored."""
    from edgefleet.controller.registry.tokens import TokenStore

    with friendly_errors():
        registry = ctx.registry()
        try:
            created = TokenStore(registry.database).create(name, role)
        finally:
            registry.close()
    data = {**_token_dict(created.info), "token": created.token}
    emit(
        as_json,
        data,
        lambda: (
            f"{created.token}\n"
            f"(token {created.info.id}, role {role}, name {created.info.name!r}; "
            "it is shown only now - store it safely)"
        ),
    )


@token_group.command("list")
@json_option
@pass_ctx
def list_cmd(ctx: Context, as_json: bool) -> None:
    """Every token (revoked ones too), without secrets."""
    from edgefleet.controller.registry.tokens import TokenStore

    with friendly_errors():
        registry = ctx.registry()
        try:
            infos = TokenStore(registry.database).list_tokens()
        finally:
            registry.close()
    emit(
        as_json,
        [_token_dict(i) for i in infos],
        lambda: render_table(
            ["id", "name", "role", "created", "last used", "revoked"],
            [
                [
                    i.id,
                    i.name,
                    i.role.value,
                    _ts(i.created_at),
                    _ts(i.last_used_at),
                    _ts(i.revoked_at),
                ]
                for i in infos
            ],
        ),
    )


@token_group.command("revoke")
@click.argument("token_id")
@json_option
@pass_ctx
def revoke_cmd(ctx: Context, token_id: str, as_json: bool) -> None:
    """Revoke the token TOKEN_ID; the API refuses it from the next request on."""
    from edgefleet.controller.registry.tokens import TokenStore

    with friendly_errors():
        registry = ctx.registry()
        try:
            info = TokenStore(registry.database).revoke(token_id)
        finally:
            registry.close()
    emit(as_json, _token_dict(info), lambda: f"token {info.id} ({info.name}) revoked")
