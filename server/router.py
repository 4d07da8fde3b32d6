"""Routing an HTTP request to its endpoint, behind the API key and the request limits.

Invariants:
- With an API key, every request but `GET /health` must carry `Authorization: Bearer KEY`
  (compared in constant time), unknown paths included: a client without the key learns nothing
  of which routes exist (401 before 404/405). --public-metrics opens /metrics alone.
- /health is never refused (no key, no concurrency cap): it is a cheap liveness probe.
- At most `limit_concurrency` requests are in the app at once, counted from before their body
  is read; beyond it a request is answered 503 + Retry-After with `Connection: close`.
- A body must arrive whole within `body_timeout` seconds (else 408, `Connection: close`) and is
  cut at `max_body_bytes` (413). (A Content-Length over the limit never reaches the router:
  pyllama4.server.early_413 answers it from the headers, before the API key is looked at.)
- Every error is an OpenAI-style body with its status: a RequestError is a 400 naming its
  field; anything unexpected is a 500 naming only the exception's type (its traceback goes to
  the log); a 405 lists the path's methods in `Allow`. The server never dies on a request.
- HEAD is GET without the body, on every GET route.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import anyio

from pyllama4.server.asgi import (
    Handler,
    HTTPError,
    Receive,
    Scope,
    Send,
    error_body,
    read_body,
    respond,
)
from pyllama4.server.http_limits import HTTPLimits
from pyllama4.server.tools import RequestError

log = logging.getLogger("pyllama4.server")

# A route on a path prefix: the handler gets the rest of the path (which may hold "/") first.
PrefixHandler = Callable[[str, bytes, Send, Receive], Awaitable[None]]

HEALTH = "/health"
METRICS = "/metrics"
CLOSE = (b"connection", b"close")
UNAUTHORIZED = [(b"www-authenticate", b"Bearer")]


class Router:
    """Dispatches an HTTP request to its route by (method, path); counts requests in flight."""

    def __init__(
        self,
        routes: dict[tuple[str, str], Handler],
        api_key: str | None,
        *,
        prefix_routes: dict[tuple[str, str], PrefixHandler] | None = None,
        limits: HTTPLimits | None = None,
        public_metrics: bool = False,
    ):
        """routes: by (method, exact path); prefix_routes: by (method, path prefix ending in
        "/"), for the paths that start with it and go on. api_key: the bearer token every
        request but /health (and /metrics with public_metrics) must carry (None: no check)."""
        self.routes = routes
        self.prefix_routes = prefix_routes or {}
        self.expected = None if api_key is None else b"Bearer " + api_key.encode()
        self.limits = limits or HTTPLimits()
        self.public_metrics = public_metrics
        self.in_flight = 0  # requests past routing, their bodies still arriving included

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.dispatch(scope, receive, tracked_send)
        except HTTPError as e:
            if not started:
                body = error_body(e.status, e.message, e.kind, e.param)
                await respond(send, e.status, body, headers=e.headers)
        except RequestError as e:
            if not started:
                await respond(send, 400, error_body(400, str(e), "invalid_request_error", e.param))
        except Exception as e:  # noqa: BLE001 - the server never dies on a request
            log.exception("%s %s failed", scope["method"], scope["path"])
            if not started:
                message = f"internal error (logged by the server): {type(e).__name__}"
                await respond(send, 500, error_body(500, message, "internal_error"))

    async def dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        if method == "HEAD":  # a GET answered without its body (load balancers probe with it)
            method, send = "GET", _without_body(send)
        health = self.routes.get((method, path)) if (method, path) == ("GET", HEALTH) else None
        if health is not None:
            await health(b"", send, receive)
            return
        if not (path == METRICS and self.public_metrics):
            self.check_key(scope)
        handler = self.match(method, path)
        cap = self.limits.limit_concurrency
        if cap is not None and self.in_flight >= cap:
            raise HTTPError(
                503,
                f"the server is at its limit of {cap} concurrent requests; retry later",
                kind="server_overloaded",
                headers=[(b"retry-after", b"1"), CLOSE],
            )
        self.in_flight += 1
        try:
            body = await self.read(receive) if method == "POST" else b""
            await handler(body, send, receive)
        finally:
            self.in_flight -= 1

    def match(self, method: str, path: str) -> Handler:
        """The handler for (method, path); a 404, or a 405 with `Allow`, if there is none."""
        handler = self.routes.get((method, path))
        if handler is not None:
            return handler
        for (route_method, prefix), prefixed in self.prefix_routes.items():
            if route_method == method and _extends(path, prefix):
                return partial(prefixed, path[len(prefix) :])
        allowed = {m for m, p in self.routes if p == path}
        allowed |= {m for m, p in self.prefix_routes if _extends(path, p)}
        allowed = sorted(allowed | ({"HEAD"} if "GET" in allowed else set()))
        message = f"{method} {path} is not an endpoint"
        if not allowed:
            raise HTTPError(404, message, kind="not_found_error")
        allow = (b"allow", ", ".join(allowed).encode())
        raise HTTPError(405, message, headers=[allow])

    async def read(self, receive: Receive) -> bytes:
        """The whole body, within the body timeout (408) and the size limit (413)."""
        limits = self.limits
        with anyio.move_on_after(limits.body_timeout):
            return await read_body(receive, limits.max_body_bytes)
        raise HTTPError(
            408,
            f"the request body did not arrive within {limits.body_timeout:g} s",
            kind="timeout_error",
            headers=[CLOSE],
        )

    def check_key(self, scope: Scope) -> None:
        """A 401 (with `WWW-Authenticate: Bearer`) unless the request carries the API key."""
        if self.expected is None:
            return
        given = [value for name, value in scope["headers"] if name == b"authorization"]
        if len(given) != 1 or not hmac.compare_digest(given[0], self.expected):
            raise HTTPError(
                401, "missing or wrong API key", kind="authentication_error", headers=UNAUTHORIZED
            )


def _without_body(send: Send) -> Send:
    """`send` with every body chunk emptied: the answer to a HEAD request."""

    async def headers_only(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return headers_only


def _extends(path: str, prefix: str) -> bool:
    """Whether `path` is `prefix` followed by something (a prefix route's parameter)."""
    return path.startswith(prefix) and len(path) > len(prefix)
