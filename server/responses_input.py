"""A Responses request as the chat completions request it stands for: its input items as chat
messages, its tools, tool_choice and text.format as chat's, so that it takes the chat path
(chat template, tool-call parser, grammar).

Invariants:
- Every item, part, tool, tool_choice and format kind the server cannot serve is a RequestError
  naming its field, raised before anything is rendered.
- The conversation is this request's instructions (as a system message), then the previous
  response's messages, then the new input: a previous response's instructions are not carried
  over (OpenAI's rule). Stored messages are never modified.
"""

from __future__ import annotations

import msgspec

from pyllama4.server import protocol as p
from pyllama4.server.responses_protocol import (
    FunctionCallItem,
    InputItem,
    InputPart,
    OutputItem,
    OutputMessage,
    ResponsesRequest,
)
from pyllama4.server.tools import RequestError

INPUT_ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text", "text")


def chat_request(
    req: ResponsesRequest, model: str, history: list[p.ChatMessage]
) -> p.ChatCompletionRequest:
    """The chat request for `req`, its conversation `history` (previous messages and new input)
    behind its instructions."""
    system = [p.ChatMessage("system", req.instructions)] if req.instructions else []
    return p.ChatCompletionRequest(
        model=model,
        messages=system + history,
        temperature=req.temperature,
        top_p=req.top_p,
        user=req.user,
        tools=chat_tools(req),
        tool_choice=chat_tool_choice(req),
        parallel_tool_calls=req.parallel_tool_calls,
        response_format=response_format(req),
    )


def input_messages(req: ResponsesRequest) -> list[p.ChatMessage]:
    """The request's input as chat messages: consecutive function_call items become one
    assistant message's tool calls."""
    if isinstance(req.input, str):
        return [p.ChatMessage("user", req.input)]
    messages: list[p.ChatMessage] = []
    for i, item in enumerate(req.input):
        if item.type == "message":
            messages.append(_message(i, item))
        elif item.type == "function_call":
            _add_call(i, item, messages)
        elif item.type == "function_call_output":
            messages.append(_call_output(i, item))
        else:
            raise RequestError(
                f"input[{i}].type {item.type!r}: expected message, function_call or "
                "function_call_output",
                "input",
            )
    return messages


def output_messages(output: list[OutputItem]) -> list[p.ChatMessage]:
    """A response's output as the assistant message a follow-up request's conversation holds."""
    text = "".join(
        part.text for item in output if isinstance(item, OutputMessage) for part in item.content
    )
    calls = [
        p.ToolCall(p.FunctionCall(item.name, item.arguments), id=item.call_id)
        for item in output
        if isinstance(item, FunctionCallItem)
    ]
    return [p.ChatMessage("assistant", text or None, tool_calls=calls or None)]


def _message(i: int, item: InputItem) -> p.ChatMessage:
    if item.role not in INPUT_ROLES:
        raise RequestError(
            f"input[{i}].role {item.role!r}: expected user, system, developer or assistant",
            "input",
        )
    if item.content is None:
        raise RequestError(f"input[{i}] is a message without content", "input")
    if isinstance(item.content, str):
        return p.ChatMessage(item.role, item.content)
    return p.ChatMessage(item.role, _parts(f"input[{i}].content", item.content, images=True))


def _parts(where: str, parts: list[InputPart], *, images: bool) -> list[p.ContentPart]:
    out = []
    for j, part in enumerate(parts):
        if part.type in TEXT_PARTS and part.text is not None:
            out.append(p.ContentPart("text", text=part.text))
        elif images and part.type == "input_image" and part.image_url is not None:
            out.append(p.ContentPart("image_url", image_url=p.ImageURL(part.image_url)))
        elif images and part.type == "input_image" and part.file_id is not None:
            raise RequestError(
                f"{where}[{j}]: this server keeps no files; send the image as image_url", "input"
            )
        elif part.type in TEXT_PARTS or (images and part.type == "input_image"):
            raise RequestError(f"{where}[{j}]: a {part.type} part needs its field", "input")
        else:
            kinds = "input_text or input_image" if images else "input_text"
            raise RequestError(
                f"{where}[{j}].type {part.type!r} is not served: expected {kinds}", "input"
            )
    return out


def _add_call(i: int, item: InputItem, messages: list[p.ChatMessage]) -> None:
    """A past function_call, added to the assistant message before it (a new one if none)."""
    if not item.call_id or not item.name:
        raise RequestError(f"input[{i}]: a function_call needs call_id and name", "input")
    call = p.ToolCall(p.FunctionCall(item.name, item.arguments or "{}"), id=item.call_id)
    last = messages[-1] if messages else None
    if last is not None and last.role == "assistant":
        calls = [*(last.tool_calls or []), call]
        messages[-1] = msgspec.structs.replace(last, tool_calls=calls)
    else:
        messages.append(p.ChatMessage("assistant", None, tool_calls=[call]))


def _call_output(i: int, item: InputItem) -> p.ChatMessage:
    if not item.call_id or item.output is None:
        raise RequestError(f"input[{i}]: a function_call_output needs call_id and output", "input")
    output = item.output
    if not isinstance(output, str):
        parts = _parts(f"input[{i}].output", output, images=False)
        output = "".join(part.text or "" for part in parts)
    return p.ChatMessage("tool", output, tool_call_id=item.call_id)


def chat_tools(req: ResponsesRequest) -> list[p.Tool] | None:
    """The request's function tools as chat's; any other kind of tool is refused by name."""
    if req.tools is None:
        return None
    tools = []
    for i, tool in enumerate(req.tools):
        if tool.type != "function":
            raise RequestError(
                f"tools[{i}].type {tool.type!r} is not served: only function tools", "tools"
            )
        if not tool.name:
            raise RequestError(f"tools[{i}] is a function tool without a name", "tools")
        definition = p.FunctionDefinition(tool.name, tool.description, tool.parameters, tool.strict)
        tools.append(p.Tool(definition))
    return tools


def chat_tool_choice(req: ResponsesRequest) -> str | p.NamedToolChoice | None:
    choice = req.tool_choice
    if choice is None or isinstance(choice, str):
        return choice
    if choice.type != "function" or not choice.name:
        raise RequestError(
            f'tool_choice {{"type": {choice.type!r}}}: expected "none", "auto", "required" or '
            '{"type": "function", "name": ...}',
            "tool_choice",
        )
    return p.NamedToolChoice(p.NamedFunction(choice.name))


def response_format(req: ResponsesRequest) -> p.ResponseFormat | None:
    """text.format as chat's response_format (None: plain text)."""
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return p.ResponseFormat("json_object")
    if fmt.type == "json_schema":
        if fmt.schema is None:
            raise RequestError("text.format json_schema needs schema", "text")
        schema = p.JsonSchemaFormat(fmt.name or "schema", fmt.schema, fmt.strict, fmt.description)
        return p.ResponseFormat("json_schema", schema)
    raise RequestError(
        f"text.format.type {fmt.type!r}: expected text, json_object or json_schema", "text"
    )
