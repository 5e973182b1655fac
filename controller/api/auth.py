"""Bearer tokens and roles, checked on every route.

Each route depends on :func:`require` with the least role it needs. A request
without ``Authorization: Bearer <token>``, with a malformed, unknown or
revoked token gets 401; a valid token of too small a role gets 403. The
token's secret is compared in constant time by
:meth:`~edgefleet.controller.registry.tokens.TokenStore.authenticate`.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from edgefleet.controller.api.errors import ApiError
from edgefleet.controller.registry.tokens import ApiTokenInfo, Role, TokenStore

__all__ = ["bearer", "require"]

bearer = HTTPBearer(auto_error=False, description="An API token: `edgefleet token create`.")


def _tokens(request: Request) -> TokenStore:
    store: TokenStore = request.app.state.tokens
    return store


def require(role: Role) -> Callable[..., ApiTokenInfo]:
    """A dependency that admits tokens of ``role`` or a higher one."""

    def check(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ) -> ApiTokenInfo:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise ApiError(401, "unauthorized", "an API token is required (Authorization: Bearer)")
        info = _tokens(request).authenticate(credentials.credentials)
        if info is None:
            raise ApiError(401, "unauthorized", "the API token is invalid or revoked")
        if not info.role.allows(role):
            raise ApiError(
                403,
                "forbidden",
                f"this needs the {role.value} role; token {info.id} is {info.role.value}",
            )
        request.state.token = info
        return info

    return check
