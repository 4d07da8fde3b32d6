"""Request ids for the log: which HTTP request a log line is about.

Invariant: while an HTTP request is served its task's context holds a RequestTag (set by
`tagged`, reset when the request ends); every log record formatted by a handler that carries
RequestIdFilter gets `request` = " [<id>]" (or "" outside a request or before it has an id).
A request's id is its response's id (`chatcmpl-...`, `cmpl-...`, the /generate meta_info id)
once its route made one with new_id(), else the client's X-Request-Id. A client's X-Request-Id
(visible ASCII, at most 256 characters; any other value is ignored) becomes the tail of the
response's id, as vLLM does, and is echoed in the response's X-Request-Id header.
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported by the launcher before the flags are checked: stays light
    from collections.abc import Awaitable, Callable

    from pyllama4.server.asgi import Receive, Scope, Send

    ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HEADER = b"x-request-id"
_VALID = re.compile(rb"[\x21-\x7e]{1,256}")


@dataclass
class RequestTag:
    route: str  # "POST /v1/chat/completions"
    client_id: str | None  # the X-Request-Id header, if valid
    id: str | None = None  # the response's id, once the route made it


_current: ContextVar[RequestTag | None] = ContextVar("pyllama4_request", default=None)


def current() -> RequestTag | None:
    return _current.get()


def current_id() -> str | None:
    """The id of the request being served (None outside one, or before it has an id)."""
    tag = _current.get()
    return None if tag is None else tag.id or tag.client_id


def new_id(prefix: str = "") -> str:
    """The response id of the request being served: prefix + its X-Request-Id, or prefix + a
    random hex; from now on its log lines carry it."""
    tag = _current.get()
    tail = tag.client_id if tag is not None and tag.client_id else uuid.uuid4().hex
    rid = prefix + tail
    if tag is not None:
        tag.id = rid
    return rid


def client_id(scope: Scope) -> str | None:
    """A valid X-Request-Id header's value (the first one), else None."""
    for name, value in scope.get("headers", ()):
        if name == HEADER:
            return value.decode("ascii") if _VALID.fullmatch(value) else None
    return None


class RequestIdFilter(logging.Filter):
    """Adds `request`: " [<id>]" for a record logged while a request with an id is served
    (and "" for one whose message names it: a record with a `request_id` attribute)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = None if hasattr(record, "request_id") else current_id()
        record.request = f" [{rid}]" if rid else ""
        return True


def tagged(app: ASGIApp) -> ASGIApp:
    """`app` with each HTTP request's RequestTag set while it is served, and the client's
    X-Request-Id echoed in the response."""

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        tag = RequestTag(f"{scope['method']} {scope['path']}", client_id(scope))
        token = _current.set(tag)
        try:
            await app(scope, receive, _echoing(send, tag.client_id))
        finally:
            _current.reset(token)

    return serve


def _echoing(send: Send, rid: str | None) -> Send:
    if rid is None:
        return send
    header = (HEADER, rid.encode("ascii"))

    async def echo(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), header]}
        await send(message)

    return echo
