"""Response objects of the Responses API from engine outputs.

Invariant: text is a `message` item (one output_text part), each tool call a `function_call`
item after the text before it: forced calls (tool_choice "required" or a function) as
read_forced_calls reads them, others as parse_tool_calls parses them, the same calls chat
completions return. A response cut by its output budget is "incomplete", with its items.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec

from pyllama4.outputs import RequestOutput
from pyllama4.server.forced_calls import read_forced_calls
from pyllama4.server.responses import new_call_id
from pyllama4.server.responses_protocol import (
    FunctionCallItem,
    IncompleteDetails,
    InputTokensDetails,
    OutputItem,
    OutputMessage,
    OutputText,
    Response,
    ResponsesRequest,
    ResponseUsage,
)
from pyllama4.server.tool_parser import ToolCall, parse_tool_calls
from pyllama4.server.tools import ToolPlan


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def draft_response(req: ResponsesRequest, rid: str, model: str) -> Response:
    """The response to `req` before any output: in progress, echoing the request's settings."""
    tool_choice: Any = req.tool_choice if req.tool_choice is not None else "auto"
    fmt = msgspec.to_builtins(req.text.format) if req.text else {"type": "text"}
    return Response(
        id=rid,
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


def function_call_item(name: str, arguments: str, status: str = "completed") -> FunctionCallItem:
    return FunctionCallItem(item_id("fc"), new_call_id(), name, arguments, status)


def parsed_call_item(call: ToolCall) -> FunctionCallItem:
    return function_call_item(call.name, call.arguments_json())


def output_items(text: str, tools: ToolPlan, status: str) -> list[OutputItem]:
    """A finished completion's output: its text as a message (if any, or if there are no
    calls), then its tool calls."""
    content: str | None = text
    calls: list[FunctionCallItem] = []
    if tools.grammar is not None:
        calls = [function_call_item(c.name, c.arguments, status) for c in read_forced_calls(text)]
        content = None if calls else text
    elif tools.names:
        parsed = parse_tool_calls(text, tools.names)
        if parsed.calls:
            content, calls = parsed.content, [parsed_call_item(call) for call in parsed.calls]
    items: list[OutputItem] = []
    if content or not calls:
        items.append(OutputMessage(item_id("msg"), [OutputText(content or "")], status))
    return items + calls


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


def whole_response(draft: Response, final: RequestOutput, tools: ToolPlan) -> Response:
    c = final.outputs[0]
    status = "incomplete" if c.finish_reason == "length" else "completed"
    return finished(draft, final, output_items(c.text, tools, status))
