"""Request bodies are bounded before anything reads them; each token's request rate too.

FastAPI reads a JSON body before it runs the route's dependencies, the token
check included, so without a bound anyone who can reach the port could make
the controller buffer any amount of memory. This ASGI middleware answers 413
to a declared ``Content-Length`` over the limit and 411 to a body without one
(chunked uploads), in the API's JSON error shape; uvicorn then never reads
more than the declared length.

The same middleware refuses a token's requests beyond a rate
(:class:`RateLimiter`: a bucket of ``burst`` requests refilled at
``rate_per_s``) with 429 and ``Retry-After``, before the token is even
looked up, so a runaway script cannot take every thread of the API's pool
or the database. Buckets are keyed by a hash of the whole ``Authorization``
value, not the token's public id: nobody can spend another token's budget
without its secret. Requests without a token share one bucket per client
address. Each refusal is counted as the rejection ``api_rate_limited``
(``edgefleet_rejected_messages{reason="api_rate_limited"}`` in ``/metrics``,
``edgefleet status``). The limiter lives on ``app.state.rate_limiter``
(default :data:`DEFAULT_RATE_PER_S`, :data:`DEFAULT_BURST`).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

__all__ = ["DEFAULT_BURST", "DEFAULT_RATE_PER_S", "MAX_BODY_BYTES", "BodyLimit", "RateLimiter"]

DEFAULT_RATE_PER_S = 50.0
"""Requests per second one token may make, sustained (a dashboard polls a few a second)."""
DEFAULT_BURST = 100.0
"""Requests one token may make at once before the rate applies."""

MAX_BODY_BYTES = 1024 * 1024
"""The largest request body the API accepts (a deploy to 10,000 devices is ~250 KiB)."""

Scope = dict[str, Any]


class RateLimiter:
    """Token buckets by key: ``burst`` requests at once, refilled at ``rate_per_s``.

    At most ``max_keys`` buckets are kept; the least recently used goes first
    (a full bucket, which is what a new key gets anyway, unless it was
    draining: a bound on memory that a flood of invented tokens cannot lift).
    """

    def __init__(
        self,
        rate_per_s: float = DEFAULT_RATE_PER_S,
        burst: float = DEFAULT_BURST,
        *,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.refused = 0

    def take(self, key: str) -> float:
        """Spend one request of ``key``: 0.0 if admitted, else the seconds until one is."""
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate_per_s)
            if tokens >= 1:
                wait, tokens = 0.0, tokens - 1
            else:
                wait = (1 - tokens) / self.rate_per_s
                self.refused += 1
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        return wait


def _rate_key(scope: Scope, headers: dict[bytes, bytes]) -> str:
    credential = headers.get(b"authorization")
    if credential:
        return "token:" + hashlib.sha256(credential).hexdigest()[:32]
    client = scope.get("client") or ("?", 0)
    return f"client:{client[0]}"


def _limiter(scope: Scope) -> RateLimiter | None:
    app = scope.get("app")
    state = getattr(app, "state", None)
    if state is None:
        return None
    limiter = getattr(state, "rate_limiter", None)
    if limiter is None:
        limiter = RateLimiter()
        state.rate_limiter = limiter
    return limiter if isinstance(limiter, RateLimiter) else None


def _count_refusal(scope: Scope, key: str, limiter: RateLimiter) -> None:
    service = getattr(getattr(scope.get("app"), "state", None), "service", None)
    reject = getattr(service, "reject", None)
    if callable(reject):
        reject("api_rate_limited", f"{key[:16]}: over {limiter.rate_per_s:g} requests/s")


class BodyLimit:
    """Refuse request bodies over ``max_bytes``, or of unknown length, before they are read."""

    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES) -> None:
        self._app = app
        self._max = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            limiter = _limiter(scope)
            if limiter is not None:
                key = _rate_key(scope, headers)
                wait = limiter.take(key)
                if wait > 0:
                    _count_refusal(scope, key, limiter)
                    retry = str(max(1, math.ceil(wait)))
                    await _refuse(
                        send,
                        429,
                        "rate_limited",
                        f"over {limiter.rate_per_s:g} requests/s for this token; "
                        f"retry after {retry}s",
                        [(b"retry-after", retry.encode())],
                    )
                    return
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


async def _refuse(
    send: Any,
    status: int,
    code: str,
    message: str,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                *(extra or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
