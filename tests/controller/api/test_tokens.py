"""API tokens: stored hashed, checked in full, revocable, with roles in order."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from edgefleet.controller.cli import cli
from edgefleet.controller.errors import NotFoundError, RegistryError
from edgefleet.controller.registry import Registry
from edgefleet.controller.registry.tokens import Role, TokenStore

# "eft_" + 16 hex digits of public id + "_": what precedes the secret.
_PUBLIC = len("eft_") + 16 + 1


@pytest.fixture
def registry(database_url: str) -> Iterator[Registry]:
    reg = Registry(database_url)
    yield reg
    reg.close()


def test_only_a_hash_of_the_token_is_stored(registry: Registry) -> None:
    store = TokenStore(registry.database)
    created = store.create("ci", Role.OPERATOR)
    with registry.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM api_tokens")).mappings().all()
    assert len(rows) == 1
    stored = " ".join(str(v) for v in rows[0].values())
    secret = created.token[_PUBLIC:]  # the secret itself may contain "_"
    assert len(secret) == 43
    assert secret not in stored and created.token not in stored
    assert rows[0]["secret_sha256"] == hashlib.sha256(created.token.encode()).hexdigest()
    assert store.authenticate(created.token) == store.list_tokens()[0]
    assert store.list_tokens()[0].role is Role.OPERATOR


def test_tokens_are_random_and_a_changed_character_fails(registry: Registry) -> None:
    store = TokenStore(registry.database)
    a = store.create("a", "viewer").token
    b = store.create("b", "viewer").token
    assert a != b
    last = a[-1]
    forged = a[:-1] + ("A" if last != "A" else "B")
    assert store.authenticate(forged) is None
    # The public id of one token with the secret of another.
    assert store.authenticate(a[:_PUBLIC] + b[_PUBLIC:]) is None
    for junk in ("", "eft_", "Bearer " + a, a + "x", "eft_zzzz_abc", "x" * 10_000):
        assert store.authenticate(junk) is None
    assert store.authenticate(a) is not None


def test_revoked_token_never_authenticates_again(registry: Registry) -> None:
    store = TokenStore(registry.database)
    created = store.create("laptop", "admin")
    assert store.authenticate(created.token) is not None
    revoked = store.revoke(created.info.id)
    assert revoked.revoked_at is not None and not revoked.active
    assert store.authenticate(created.token) is None
    assert store.revoke(created.info.id).revoked_at == revoked.revoked_at  # idempotent
    assert [t.id for t in store.list_tokens()] == [created.info.id]  # the row stays
    with pytest.raises(NotFoundError):
        store.revoke("0" * 16)


def test_last_used_is_recorded_but_not_on_every_request(registry: Registry) -> None:
    store = TokenStore(registry.database)
    created = store.create("dash", "viewer")
    assert store.list_tokens()[0].last_used_at is None
    first = store.authenticate(created.token)
    assert first is not None
    used = store.list_tokens()[0].last_used_at
    assert used is not None
    store.authenticate(created.token, now=used + timedelta(seconds=5))
    assert store.list_tokens()[0].last_used_at == used
    later = used + timedelta(minutes=5)
    store.authenticate(created.token, now=later)
    assert store.list_tokens()[0].last_used_at == later


def test_roles_are_ordered_and_names_checked(registry: Registry) -> None:
    assert Role.ADMIN.allows(Role.OPERATOR) and Role.OPERATOR.allows(Role.VIEWER)
    assert not Role.VIEWER.allows(Role.OPERATOR) and not Role.OPERATOR.allows(Role.ADMIN)
    store = TokenStore(registry.database)
    with pytest.raises(RegistryError, match="unknown role"):
        store.create("x", "root")
    with pytest.raises(RegistryError, match="token name"):
        store.create("   ", "viewer")
    with pytest.raises(RegistryError, match="token name"):
        store.create("n" * 129, "viewer")


def test_token_cli_create_list_revoke(tmp_path: Path) -> None:
    runner = CliRunner()
    home = ["--home", str(tmp_path / "home")]
    assert runner.invoke(cli, [*home, "init"]).exit_code == 0
    made = runner.invoke(
        cli, [*home, "token", "create", "--role", "operator", "--name", "ci", "--json"]
    )
    assert made.exit_code == 0, made.output
    data = json.loads(made.output)
    assert data["token"].startswith("eft_") and data["role"] == "operator"

    listed = runner.invoke(cli, [*home, "token", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)
    assert [r["id"] for r in rows] == [data["id"]]
    assert "token" not in rows[0] and data["token"] not in listed.output

    table = runner.invoke(cli, [*home, "token", "list"])
    assert data["id"] in table.output and "operator" in table.output

    gone = runner.invoke(cli, [*home, "token", "revoke", data["id"]])
    assert gone.exit_code == 0 and "revoked" in gone.output
    reg = Registry(f"sqlite:///{tmp_path / 'home' / 'registry.db'}")
    try:
        assert TokenStore(reg.database).authenticate(data["token"]) is None
    finally:
        reg.close()

    missing = runner.invoke(cli, [*home, "token", "revoke", "nope"])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    bad_role = runner.invoke(cli, [*home, "token", "create", "--role", "root", "--name", "x"])
    assert bad_role.exit_code == 2
