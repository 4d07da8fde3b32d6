"""Raw ASGI plumbing: bodies in, JSON and server-sent events out, errors as OpenAI error bodies
and the lifespan protocol (routing, the API key and the request limits live in
pyllama4.server.router).

Invariants:
- An HTTPError carries everything its OpenAI-style answer needs: status, message, type, param
  and extra headers; error_body renders {"error": {"message", "type", "param", "code"}}.
- A body is never held past its limit: read_body stops at the first chunk over it (413).
- A stream (stream_sse) stops producing the moment its client disconnects: the producer is
  cancelled, which aborts the request it reads from.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import msgspec

from pyllama4.server import protocol as p
from pyllama4.server.http_limits import MAX_BODY_BYTES
from pyllama4.server.json_depth import MAX_JSON_DEPTH, too_deep_field

DECODE_INLINE_BYTES = 256 << 10  # larger bodies are decoded in a worker thread
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


async def read_body(receive: Receive, limit: int = MAX_BODY_BYTES) -> bytes:
    """The whole request body; a 413 as soon as it grows past `limit` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HTTPError(499, "client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"the request body is over {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def decode(body: bytes, kind: type) -> Any:
    """The body as a `kind` request, or a 400 naming the field; a body over DECODE_INLINE_BYTES
    is checked and decoded in a worker thread (its cost grows with its size)."""
    if len(body) <= DECODE_INLINE_BYTES:
        return decode_now(body, kind)
    return await anyio.to_thread.run_sync(decode_now, body, kind)


def decode_now(body: bytes, kind: type) -> Any:
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
