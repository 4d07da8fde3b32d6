"""The server-sent events of a streamed Responses API response.

Invariants:
- A streamed response ends with the same output items, status and usage as the whole response
  would (pyllama4.server.responses_output): parsed tool calls by ToolCallStream (which matches
  parse_tool_calls), each sent whole; forced calls by ForcedCallStream (which matches
  read_forced_calls), each opened as soon as its name is complete, its arguments streamed as
  they are written.
- Every event carries `type` and a `sequence_number` counting up from 0; an item's events come
  between its output_item.added and output_item.done, and at most one item is open at a time;
  the last event is response.completed, response.incomplete (the output budget ran out) or
  response.failed (the server cut the response short).
"""

from __future__ import annotations

from typing import Any

import msgspec

from pyllama4.outputs import RequestOutput
from pyllama4.server.asgi import HTTPError
from pyllama4.server.forced_calls import CallPiece, ForcedCallStream
from pyllama4.server.responses_output import (
    finished,
    function_call_item,
    item_id,
    parsed_call_item,
)
from pyllama4.server.responses_protocol import (
    FunctionCallItem,
    OutputItem,
    OutputMessage,
    OutputText,
    Response,
    ResponseError,
)
from pyllama4.server.tool_parser import ToolCallStream
from pyllama4.server.tools import ToolPlan

Event = tuple[str, bytes]  # (event name, JSON data)


class ResponseEvents:
    """The events of one streamed response, in order, numbered from 0."""

    def __init__(self, draft: Response, tools: ToolPlan):
        self.draft = draft
        self.forced = ForcedCallStream() if tools.grammar is not None else None
        self.parser = ToolCallStream(tools.names) if tools.names and not self.forced else None
        self.sequence = 0
        self.output: list[OutputItem] = []  # the items done so far
        self.message: OutputMessage | None = None  # the message item being streamed
        self.call: FunctionCallItem | None = None  # the function call being streamed
        self.pieces: list[str] = []  # the open item's text (or arguments) so far

    def event(self, kind: str, **fields: Any) -> Event:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return kind, msgspec.json.encode(data)

    def start(self) -> list[Event]:
        return [
            self.event("response.created", response=self.draft),
            self.event("response.in_progress", response=self.draft),
        ]

    def push(self, delta: str, *, finished: bool) -> list[Event]:
        """The events for a completion's new text (and, when it finished, its last calls)."""
        if self.forced is not None:
            return [event for piece in self.forced.push(delta) for event in self.piece(piece)]
        calls = []
        if self.parser is not None:
            delta, calls = self.parser.push(delta)
            if finished:
                tail, more = self.parser.finish()
                delta, calls = delta + tail, calls + more
        events = self.text_delta(delta) if delta else []
        for call in calls:
            events += self.close("completed")
            item = parsed_call_item(call)
            events += self.open_call(item)
            events += self.arguments_delta(item.arguments)
            events += self.close("completed")
        return events

    def piece(self, piece: CallPiece) -> list[Event]:
        """A forced call's piece: a new call opens with its name, arguments stream."""
        events = []
        if piece.name is not None:
            events += self.close("completed")
            events += self.open_call(function_call_item(piece.name, ""))
        if piece.arguments:
            events += self.arguments_delta(piece.arguments)
        return events

    def text_delta(self, delta: str) -> list[Event]:
        events = self.open_message() if self.message is None else []
        assert self.message is not None
        self.pieces.append(delta)
        at = self.at(self.message.id)
        events.append(self.event("response.output_text.delta", delta=delta, logprobs=[], **at))
        return events

    def open_message(self) -> list[Event]:
        events = self.close("completed")
        self.message, self.pieces = OutputMessage(item_id("msg"), [], "in_progress"), []
        at = self.at(self.message.id)
        index = at["output_index"]
        added = self.event("response.output_item.added", item=self.message, output_index=index)
        events.append(added)
        events.append(self.event("response.content_part.added", part=OutputText(""), **at))
        return events

    def open_call(self, item: FunctionCallItem) -> list[Event]:
        self.call = msgspec.structs.replace(item, arguments="", status="in_progress")
        self.pieces = []
        index = len(self.output)
        return [self.event("response.output_item.added", item=self.call, output_index=index)]

    def arguments_delta(self, delta: str) -> list[Event]:
        assert self.call is not None
        self.pieces.append(delta)
        at = {"output_index": len(self.output), "item_id": self.call.id}
        return [self.event("response.function_call_arguments.delta", delta=delta, **at)]

    def at(self, message_id: str) -> dict[str, Any]:
        """Where the message being streamed is: its output index, id and content index."""
        return {"output_index": len(self.output), "item_id": message_id, "content_index": 0}

    def close(self, status: str) -> list[Event]:
        """The events that end the open item (none if none is open)."""
        text, index = "".join(self.pieces), len(self.output)
        if self.message is not None:
            at = self.at(self.message.id)
            part = OutputText(text)
            item: OutputItem = msgspec.structs.replace(self.message, content=[part], status=status)
            events = [
                self.event("response.output_text.done", text=text, logprobs=[], **at),
                self.event("response.content_part.done", part=part, **at),
            ]
        elif self.call is not None:
            item = msgspec.structs.replace(self.call, arguments=text, status=status)
            done = {"arguments": text, "name": item.name, "item_id": item.id}
            events = [
                self.event("response.function_call_arguments.done", output_index=index, **done)
            ]
        else:
            return []
        events.append(self.event("response.output_item.done", item=item, output_index=index))
        self.output.append(item)
        self.message = self.call = None
        return events

    def finish(self, final: RequestOutput) -> tuple[Response, list[Event]]:
        """The finished response and its last events (an empty answer is an empty message)."""
        incomplete = final.outputs[0].finish_reason == "length"
        events = []
        if self.message is None and self.call is None and not self.output:
            events += self.open_message()
        events += self.close("incomplete" if incomplete else "completed")
        response = finished(self.draft, final, self.output)
        events.append(self.event(f"response.{response.status}", response=response))
        return response, events

    def fail(self, error: HTTPError) -> list[Event]:
        """The last events of a response the server cut short."""
        events = self.close("incomplete")
        response = msgspec.structs.replace(
            self.draft,
            status="failed",
            output=self.output,
            error=ResponseError("server_error", error.message),
        )
        events.append(self.event("response.failed", response=response))
        return events
