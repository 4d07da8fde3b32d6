"""Response objects and stream events of the Responses API from engine outputs.

Invariants:
- A streamed response ends with the same output items, status and usage as the whole response
  would: text is a `message` item (one output_text part), each parsed tool call a
  `function_call` item after the text before it (tool calls parsed by ToolCallStream, which
  matches parse_tool_calls).
- A stream's events carry `type` and a `sequence_number` counting up from 0; an item's events
  come between its output_item.added and output_item.done; the last event is
  response.completed, response.incomplete (the output budget ran out) or response.failed.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec

from pyllama4.outputs import RequestOutput
from pyllama4.server.asgi import HTTPError
from pyllama4.server.responses import tool_call_out
from pyllama4.server.responses_protocol import (
    FunctionCallItem,
    IncompleteDetails,
    InputTokensDetails,
    OutputItem,
    OutputMessage,
    OutputText,
    Response,
    ResponseError,
    ResponsesRequest,
    ResponseUsage,
)
from pyllama4.server.tool_parser import ToolCall, ToolCallStream, parse_tool_calls

Event = tuple[str, bytes]  # (event name, JSON data)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def draft_response(req: ResponsesRequest, model: str) -> Response:
    """The response to `req` before any output: in progress, echoing the request's settings."""
    tool_choice: Any = req.tool_choice if req.tool_choice is not None else "auto"
    fmt = msgspec.to_builtins(req.text.format) if req.text else {"type": "text"}
    return Response(
        id=new_id("resp"),
        created_at=int(time.time()),
        model=model,
        status="in_progress",
        output=[],
        instructions=req.instructions,
        max_output_tokens=req.max_output_tokens,
        metadata=req.metadata,
        parallel_tool_calls=req.parallel_tool_calls,
        previous_response_id=req.previous_response_id,
        temperature=req.temperature,
        top_p=req.top_p,
        tool_choice=msgspec.to_builtins(tool_choice),
        tools=msgspec.to_builtins(req.tools or []),
        text={"format": fmt},
        store=req.store,
        user=req.user,
    )


def function_call_item(call: ToolCall) -> FunctionCallItem:
    call_id, function = tool_call_out(call)
    return FunctionCallItem(new_id("fc"), call_id, call.name, function.arguments or "{}")


def output_items(text: str, tools: frozenset[str], status: str) -> list[OutputItem]:
    """A finished completion's output: its text as a message (if any, or if there are no
    calls), then its tool calls."""
    content: str | None = text
    calls: list[ToolCall] = []
    if tools:
        parsed = parse_tool_calls(text, tools)
        if parsed.calls:
            content, calls = parsed.content, parsed.calls
    items: list[OutputItem] = []
    if content or not calls:
        items.append(OutputMessage(new_id("msg"), [OutputText(content or "")], status))
    items += [function_call_item(call) for call in calls]
    return items


def finished(draft: Response, final: RequestOutput, output: list[OutputItem]) -> Response:
    """The draft with its output, status and usage from the request's final output."""
    c = final.outputs[0]
    incomplete = c.finish_reason == "length"
    output_tokens, input_tokens = len(c.token_ids), len(final.prompt_token_ids)
    usage = ResponseUsage(
        input_tokens,
        output_tokens,
        input_tokens + output_tokens,
        InputTokensDetails(final.cached_tokens or 0),
    )
    return msgspec.structs.replace(
        draft,
        status="incomplete" if incomplete else "completed",
        output=output,
        usage=usage,
        incomplete_details=IncompleteDetails("max_output_tokens") if incomplete else None,
    )


def whole_response(draft: Response, final: RequestOutput, tools: frozenset[str]) -> Response:
    c = final.outputs[0]
    status = "incomplete" if c.finish_reason == "length" else "completed"
    return finished(draft, final, output_items(c.text, tools, status))


class ResponseEvents:
    """The events of one streamed response, in order, numbered from 0."""

    def __init__(self, draft: Response, tools: frozenset[str]):
        self.draft = draft
        self.parser = ToolCallStream(tools) if tools else None
        self.sequence = 0
        self.output: list[OutputItem] = []  # the items done so far
        self.message: OutputMessage | None = None  # the message item being streamed
        self.text: list[str] = []  # its text so far

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
        """The events for a completion's new text (and, when it finished, its end)."""
        calls: list[ToolCall] = []
        if self.parser is not None:
            delta, calls = self.parser.push(delta)
            if finished:
                tail, more = self.parser.finish()
                delta, calls = delta + tail, calls + more
        events = self.text_delta(delta) if delta else []
        for call in calls:
            events += self.close_message("completed")
            events += self.call_events(function_call_item(call))
        return events

    def text_delta(self, delta: str) -> list[Event]:
        events = self.open_message() if self.message is None else []
        assert self.message is not None
        self.text.append(delta)
        at = self.at_output(self.message.id)
        events.append(self.event("response.output_text.delta", delta=delta, logprobs=[], **at))
        return events

    def open_message(self) -> list[Event]:
        self.message = OutputMessage(new_id("msg"), [], "in_progress")
        self.text = []
        at = self.at_output(self.message.id)
        index = at["output_index"]
        item = self.event("response.output_item.added", item=self.message, output_index=index)
        return [item, self.event("response.content_part.added", part=OutputText(""), **at)]

    def at_output(self, item_id: str) -> dict[str, Any]:
        """Where the message item being streamed is: its output index, id and content index."""
        return {"output_index": len(self.output), "item_id": item_id, "content_index": 0}

    def close_message(self, status: str) -> list[Event]:
        if self.message is None:
            return []
        at = self.at_output(self.message.id)
        text = "".join(self.text)
        part = OutputText(text)
        done = msgspec.structs.replace(self.message, content=[part], status=status)
        events = [
            self.event("response.output_text.done", text=text, logprobs=[], **at),
            self.event("response.content_part.done", part=part, **at),
            self.event(
                "response.output_item.done",
                item=done,
                output_index=at["output_index"],
            ),
        ]
        self.output.append(done)
        self.message = None
        return events

    def call_events(self, item: FunctionCallItem) -> list[Event]:
        index = len(self.output)
        added = msgspec.structs.replace(item, arguments="", status="in_progress")
        at = {"output_index": index, "item_id": item.id}
        events = [
            self.event("response.output_item.added", item=added, output_index=index),
            self.event("response.function_call_arguments.delta", delta=item.arguments, **at),
            self.event(
                "response.function_call_arguments.done",
                arguments=item.arguments,
                name=item.name,
                **at,
            ),
            self.event("response.output_item.done", item=item, output_index=index),
        ]
        self.output.append(item)
        return events

    def finish(self, final: RequestOutput) -> tuple[Response, list[Event]]:
        """The finished response and its last events (an empty answer is an empty message)."""
        incomplete = final.outputs[0].finish_reason == "length"
        status = "incomplete" if incomplete else "completed"
        events = []
        if self.message is None and not self.output:
            events += self.open_message()
        events += self.close_message(status)
        response = finished(self.draft, final, self.output)
        events.append(self.event(f"response.{response.status}", response=response))
        return response, events

    def fail(self, error: HTTPError) -> list[Event]:
        """The last events of a response the server cut short."""
        events = self.close_message("incomplete")
        response = msgspec.structs.replace(
            self.draft,
            status="failed",
            output=self.output,
            error=ResponseError("server_error", error.message),
        )
        events.append(self.event("response.failed", response=response))
        return events
