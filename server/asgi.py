"""Raw ASGI plumbing: bodies in, JSON and server-sent events out, errors as OpenAI error bodies,
routing, the API key and the lifespan protocol.

Invariants:
- Every error a route raises before its response started is answered with an OpenAI-style body
  {"error": {"message", "type", "param", "code"}} and its status (a RequestError is a 400 naming
  its field; anything unexpected a 500); the server never dies on a request.
- A stream (stream_sse) stops producing the moment its client disconnects: the producer is
  cancelled, which aborts the request it reads from.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import msgspec

from pyllama4.server import protocol as p
from pyllama4.server.json_depth import MAX_JSON_DEPTH, too_deep_field
from pyllama4.server.tools import RequestError

log = logging.getLogger("pyllama4.server")

MAX_BODY_BYTES = 64 << 20  # room for a few base64 images
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[bytes, Send, Receive], Awaitable[None]]

SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


class HTTPError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        param: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers = headers or []


def error_body(status: int, message: str, kind: str, param: str | None = None) -> bytes:
    return msgspec.json.encode(p.ErrorResponse(p.ErrorDetail(message, kind, param, status)))


async def read_body(receive: Receive) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HTTPError(499, "client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise HTTPError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def decode(body: bytes, kind: type) -> Any:
    field = too_deep_field(body)
    if field is not None:
        message = f"the body nests more than {MAX_JSON_DEPTH} levels of JSON"
        raise HTTPError(400, message, param=field or None)
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as e:
        raise HTTPError(400, f"invalid request: {e}", param=_field(str(e))) from None
    except msgspec.DecodeError as e:
        raise HTTPError(400, f"the body is not valid JSON: {e}") from None


def _field(message: str) -> str | None:
    marker = "`$."
    if marker in message:
        return message.split(marker, 1)[1].split("`", 1)[0].split("[", 1)[0]
    return None


async def respond(
    send: Send,
    status: int,
    body: bytes,
    *,
    content_type: bytes = b"application/json",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


async def stream_sse(
    send: Send,
    receive: Receive,
    events: AsyncIterator[bytes],
    headers: list[tuple[bytes, bytes]] = SSE_HEADERS,
) -> None:
    """A 200 text/event-stream: one `data: <event>` chunk per event, then `data: [DONE]`. A
    client disconnect cancels the producer; a send to a client gone away ends the stream."""
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    async with anyio.create_task_group() as tg:
        tg.start_soon(cancel_on_disconnect, receive, tg.cancel_scope)
        try:
            async for payload in events:
                data = b"data: " + payload + b"\n\n"
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send(
                {"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False}
            )
        except OSError:
            pass  # the client went away; leaving the stream aborted the request
        tg.cancel_scope.cancel()


class Router:
    """Dispatches an HTTP request to its route by (method, path); counts requests in flight."""

    def __init__(self, routes: dict[tuple[str, str], Handler], api_key: str | None):
        """api_key: the bearer token every /v1/ request must carry (None: no check)."""
        self.routes = routes
        self.api_key = api_key
        self.in_flight = 0

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
                body = error_body(500, f"internal error: {type(e).__name__}: {e}", "internal_error")
                await respond(send, 500, body)

    async def dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self.routes.get((scope["method"], scope["path"]))
        if handler is None:
            known = {path for _, path in self.routes}
            status = 405 if scope["path"] in known else 404
            kind = "not_found_error" if status == 404 else "invalid_request_error"
            message = f"{scope['method']} {scope['path']} is not an endpoint"
            raise HTTPError(status, message, kind=kind)
        if self.api_key and scope["path"].startswith("/v1/"):
            self.check_key(scope)
        body = await read_body(receive) if scope["method"] == "POST" else b""
        self.in_flight += 1
        try:
            await handler(body, send, receive)
        finally:
            self.in_flight -= 1

    def check_key(self, scope: Scope) -> None:
        headers = dict(scope["headers"])
        if headers.get(b"authorization", b"").decode() != f"Bearer {self.api_key}":
            raise HTTPError(401, "missing or wrong API key", kind="authentication_error")


async def serve_lifespan(
    receive: Receive,
    send: Send,
    run: Callable[[], Awaitable[Any]],
    shutdown: Callable[[], Awaitable[None]],
) -> None:
    """ASGI lifespan: `run` goes on from startup until `shutdown` has returned."""
    await receive()  # lifespan.startup
    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await shutdown()
        tg.cancel_scope.cancel()
    await send({"type": "lifespan.shutdown.complete"})
