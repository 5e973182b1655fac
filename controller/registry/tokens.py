"""Management-API tokens: create, list, revoke, authenticate. Only hashes are stored.

A token is ``eft_<id>_<secret>``: ``id`` (16 hex digits) is public and finds
the row, ``secret`` is 32 random bytes (URL-safe base64). The row keeps the
SHA-256 of the whole token, never the token, so a copy of the database grants
nothing. A plain hash is enough (no slow KDF): the secret has 256 bits of
entropy, so there is nothing to guess. Authentication looks the row up by its
id and compares hashes with :func:`hmac.compare_digest`, so the time taken
does not tell how much of a guessed secret was right.

Roles are ordered: ``viewer`` reads; ``operator`` also deploys and steers
rollouts; ``admin`` also revokes devices and manages tokens. A revoked token
keeps its row (who had access, until when) and never authenticates again.
``last_used_at`` is written at most once a minute per token, so reads through
the API do not turn into a write each.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import Enum

import sqlalchemy as sa

from edgefleet.controller.errors import NotFoundError, RegistryError
from edgefleet.controller.registry import models as m
from edgefleet.controller.registry.database import Database, require_text

__all__ = [
    "ApiTokenInfo",
    "NewApiToken",
    "Role",
    "TokenStore",
]

TOKEN_PREFIX = "eft_"  # noqa: S105 - a public prefix, not a secret
_TOKEN_RE = re.compile(r"^eft_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
# last_used_at is refreshed at most this often per token.
_TOUCH_EVERY = timedelta(seconds=60)


class Role(str, Enum):
    """What a token may do; each role includes the ones before it."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def allows(self, needed: Role) -> bool:
        """Whether a token of this role may do what ``needed`` may."""
        return self.rank >= needed.rank

    @classmethod
    def parse(cls, value: str) -> Role:
        """The role named ``value``.

        Raises:
            RegistryError: not one of viewer, operator, admin.
        """
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(r.value for r in cls)
            raise RegistryError(f"unknown role {value!r}; use one of {names}") from None


_RANKS = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


@dataclass(frozen=True)
class ApiTokenInfo:
    """A stored token, without its secret."""

    id: str
    name: str
    role: Role
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class NewApiToken:
    """A token just created: ``token`` is shown once and stored nowhere."""

    info: ApiTokenInfo
    token: str


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _info(row: m.ApiToken) -> ApiTokenInfo:
    return ApiTokenInfo(
        id=row.id,
        name=row.name,
        role=Role(row.role),
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
    )


class TokenStore:
    """API tokens on a shared :class:`Database` (the registry's)."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def create(self, name: str, role: Role | str) -> NewApiToken:
        """Make a token with ``role``; the returned ``token`` is the only copy.

        Raises:
            RegistryError: the name is empty or longer than 128 characters, or
                the role is unknown.
        """
        role = Role.parse(role) if isinstance(role, str) else role
        name = require_text(name.strip() if isinstance(name, str) else name, "token name", 128)
        token_id = secrets.token_hex(8)
        token = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
        with self._db.write() as s:
            row = m.ApiToken(
                id=token_id,
                name=name,
                role=role.value,
                secret_sha256=_hash(token),
                created_at=m.utcnow(),
            )
            s.add(row)
            s.flush()
            info = _info(row)
        return NewApiToken(info=info, token=token)

    def list_tokens(self) -> list[ApiTokenInfo]:
        """Every token, revoked ones included, oldest first."""
        with self._db.read() as s:
            rows = s.scalars(sa.select(m.ApiToken).order_by(m.ApiToken.created_at, m.ApiToken.id))
            return [_info(r) for r in rows]

    def revoke(self, token_id: str) -> ApiTokenInfo:
        """Revoke a token by its id (revoking a revoked token changes nothing).

        Raises:
            NotFoundError: no token has that id.
        """
        with self._db.write() as s:
            row = s.get(m.ApiToken, token_id, with_for_update=True)
            if row is None:
                raise NotFoundError(f"API token {token_id!r} does not exist")
            if row.revoked_at is None:
                row.revoked_at = m.utcnow()
            return _info(row)

    def authenticate(self, token: str, *, now: datetime | None = None) -> ApiTokenInfo | None:
        """The token's info if it is well-formed, known, matches and is not revoked; else None."""
        match = _TOKEN_RE.match(token) if isinstance(token, str) else None
        if match is None:
            return None
        presented = _hash(token)
        with self._db.read() as s:
            row = s.get(m.ApiToken, match.group(1))
            if row is None or not hmac.compare_digest(row.secret_sha256, presented):
                return None
            info = _info(row)
        if not info.active:
            return None
        now = now or m.utcnow()
        if info.last_used_at is None or now - info.last_used_at >= _TOUCH_EVERY:
            with self._db.write() as s:
                s.execute(
                    sa.update(m.ApiToken).where(m.ApiToken.id == info.id).values(last_used_at=now)
                )
            info = replace(info, last_used_at=now)
        return info
