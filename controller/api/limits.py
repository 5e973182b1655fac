"""Request bodies are bounded before anything reads them.

FastAPI reads a JSON body before it runs the route's dependencies, the token
check included, so without a bound anyone who can reach the port could make
the controller buffer any amount of memory. This ASGI middleware answers 413
to a declared ``Content-Length`` over the limit and 411 to a body without one
(chunked uploads), in the API's JSON error shape; uvicorn then never reads
more than the declared length.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MAX_BODY_BYTES", "BodyLimit"]

MAX_BODY_BYTES = 1024 * 1024
"""The largest request body the API accepts (a deploy to 10,000 devices is ~250 KiB)."""

Scope = dict[str, Any]


class BodyLimit:
    """Refuse request bodies over ``max_bytes``, or of unknown length, before they are read."""

    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES) -> None:
        self._app = app
        self._max = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            length = headers.get(b"content-length")
            refusal: tuple[int, str, str] | None = None
            if length is None:
                if headers.get(b"transfer-encoding") is not None:
                    refusal = (411, "length_required", "send the body with a Content-Length")
            elif not length.isdigit() or int(length) > self._max:
                refusal = (
                    413,
                    "too_large",
                    f"request bodies are limited to {self._max} bytes",
                )
            if refusal is not None:
                await _refuse(send, *refusal)
                return
        await self._app(scope, receive, send)


async def _refuse(send: Any, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
