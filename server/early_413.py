"""A request whose Content-Length is over the body limit is answered 413 from its headers alone.

hypercorn's HTTP/1.1 protocol (hypercorn.protocol.h11.H11Protocol) answers `Expect:
100-continue` with `100 Continue` itself, right after it parsed the request's headers and before
the app runs; an app-level 413 would come after the client was invited to send its body.
BoundedH11Protocol checks the Content-Length where hypercorn creates the request's stream: over
the limit, it sends the 413 (an OpenAI-style body, `Connection: close`) and closes the
connection instead, so that neither the 100 Continue nor a body byte ever goes to the app.

Invariants:
- install() replaces the name hypercorn.protocol.ProtocolWrapper builds its HTTP/1.1 protocol
  from; it raises RuntimeError if hypercorn's internals it relies on have moved (the server then
  does not start), rather than serving without the check.
- Chunked bodies (no Content-Length) are still cut at the limit by read_body (413).
- HTTP/2 (prior knowledge only: no TLS here) is not covered; its bodies are cut by read_body.
"""

from __future__ import annotations

from itertools import chain

import h11
import hypercorn.protocol
from hypercorn.events import Closed
from hypercorn.protocol.h11 import H11Protocol

from pyllama4.server.asgi import error_body
from pyllama4.server.http_limits import MAX_BODY_BYTES

# The H11Protocol methods BoundedH11Protocol overrides or calls.
_HOOKS = ("_create_stream", "_send_h11_event")


class BoundedH11Protocol(H11Protocol):
    """hypercorn's HTTP/1.1 protocol, with requests over the body limit refused at their head."""

    max_body_bytes = MAX_BODY_BYTES  # set by install()

    async def _create_stream(self, request: h11.Request) -> None:
        length = content_length(request)
        if length is not None and length > self.max_body_bytes:
            await self._refuse_too_large(length)
            return
        await super()._create_stream(request)

    async def _refuse_too_large(self, length: int) -> None:
        message = f"the request body ({length} bytes) is over {self.max_body_bytes} bytes"
        body = error_body(413, message, "invalid_request_error")
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        own = self.config.response_headers("h11")
        await self._send_h11_event(h11.Response(status_code=413, headers=list(chain(headers, own))))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())
        await self.send(Closed())


def content_length(request: h11.Request) -> int | None:
    """The request's Content-Length (h11 has checked it is one well-formed number), if any."""
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)
    return None


def check_hypercorn() -> None:
    """RuntimeError unless hypercorn still builds its HTTP/1.1 protocol the way install() needs."""
    wrapper = getattr(hypercorn.protocol, "ProtocolWrapper", None)
    found = getattr(hypercorn.protocol, "H11Protocol", None)
    looks_up = wrapper is not None and "H11Protocol" in wrapper.__init__.__code__.co_names
    hooks = all(callable(getattr(H11Protocol, name, None)) for name in _HOOKS)
    if not (looks_up and hooks and found in (H11Protocol, BoundedH11Protocol)):
        raise RuntimeError(
            "hypercorn's HTTP/1.1 internals changed (ProtocolWrapper no longer builds "
            f"hypercorn.protocol.H11Protocol, or it lost {', '.join(_HOOKS)}): the early 413 "
            "cannot be installed"
        )


def install(max_body_bytes: int) -> None:
    """Makes every HTTP/1.1 connection hypercorn accepts from now on a BoundedH11Protocol."""
    check_hypercorn()
    BoundedH11Protocol.max_body_bytes = max_body_bytes
    hypercorn.protocol.H11Protocol = BoundedH11Protocol  # type: ignore[misc]
