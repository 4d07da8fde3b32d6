"""The responses kept in memory, for previous_response_id and GET / DELETE /v1/responses/{id}.

Invariant: the store is bounded: at most `max_responses` responses whose encoded size (the
response and its conversation) sums to at most `max_bytes`; the oldest stored go first, and a
response too large on its own is not kept. It lives on the event loop (no locking).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import msgspec

from pyllama4.server import protocol as p
from pyllama4.server.responses_protocol import Response

MAX_STORED_RESPONSES = 1000
MAX_STORED_BYTES = 64 << 20


@dataclass(frozen=True)
class StoredResponse:
    response: Response
    messages: list[p.ChatMessage]  # its conversation and output, without instructions
    size: int  # encoded bytes, what the store counts


def encoded_size(response: Response, messages: list[p.ChatMessage]) -> int:
    """What a stored response counts for: its JSON and its conversation's, in bytes."""
    return len(msgspec.json.encode(response)) + len(msgspec.json.encode(messages))


class ResponseStore:
    def __init__(
        self, max_responses: int = MAX_STORED_RESPONSES, max_bytes: int = MAX_STORED_BYTES
    ):
        self.max_responses, self.max_bytes = max_responses, max_bytes
        self.entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self.size = 0

    def put(self, response: Response, messages: list[p.ChatMessage], size: int) -> None:
        """Keeps the response and its conversation (`size`: their encoded_size), dropping the
        oldest beyond the bounds."""
        if size > self.max_bytes:
            return
        self.delete(response.id)
        self.entries[response.id] = StoredResponse(response, messages, size)
        self.size += size
        while len(self.entries) > self.max_responses or self.size > self.max_bytes:
            _, oldest = self.entries.popitem(last=False)
            self.size -= oldest.size

    def get(self, response_id: str) -> StoredResponse | None:
        return self.entries.get(response_id)

    def delete(self, response_id: str) -> bool:
        """Forgets the response; False if it was not stored."""
        entry = self.entries.pop(response_id, None)
        if entry is None:
            return False
        self.size -= entry.size
        return True
