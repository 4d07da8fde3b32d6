"""Request and response bodies of OpenAI's Responses API (POST /v1/responses), as msgspec structs.

Invariant: decoding a body yields a typed request whose fields are in the ranges their
msgspec.Meta constraints state (the ones /openapi.json publishes) or a 400 naming the field; what
the item and tool fields may hold beyond their types (roles, part types, tool types) is checked
where the request becomes a chat prompt (pyllama4.server.responses_input). The response structs
encode exactly the shapes OpenAI's client parses: output items tagged by `type`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from pyllama4.server.protocol import Temperature, TokenBudget, TopP


class InputPart(msgspec.Struct, forbid_unknown_fields=False):
    """A content part of an input message: input_text, output_text (a past answer) or
    input_image."""

    type: str
    text: str | None = None
    image_url: str | None = None  # a URL or a data: URL
    file_id: str | None = None  # refused: the server keeps no files
    detail: str | None = None  # accepted; Llama 4 always tiles at full detail


class InputItem(msgspec.Struct, forbid_unknown_fields=False, kw_only=True):
    """One item of `input`: a message (type "message", or no type with a role), a past
    function_call or a function_call_output."""

    type: str = "message"
    role: str | None = None
    content: str | list[InputPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None  # JSON text
    output: str | list[InputPart] | None = None
    id: str | None = None
    status: str | None = None


class FunctionTool(msgspec.Struct, forbid_unknown_fields=False, kw_only=True):
    """A tool of the request; only type "function" is served."""

    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class ToolChoiceObject(msgspec.Struct, forbid_unknown_fields=False, kw_only=True):
    type: str  # "function" (other kinds are refused)
    name: str | None = None


class TextFormat(msgspec.Struct, forbid_unknown_fields=False, kw_only=True, omit_defaults=True):
    type: str = "text"  # "text", "json_object" or "json_schema"
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextConfig(msgspec.Struct, forbid_unknown_fields=False, kw_only=True):
    format: TextFormat = msgspec.field(default_factory=TextFormat)


class ResponsesRequest(msgspec.Struct, forbid_unknown_fields=False, kw_only=True):
    """POST /v1/responses."""

    input: str | list[InputItem]
    model: str | None = None  # None: the served model
    instructions: str | None = None
    max_output_tokens: TokenBudget | None = None  # None: all the room the context leaves
    temperature: Temperature | None = None
    top_p: TopP | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: str | ToolChoiceObject | None = None  # "none", "auto", "required" or a function
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None  # accepted, not used
    stream: bool = False
    background: bool = False  # refused when true: responses run while their request is open


class OutputText(msgspec.Struct, tag_field="type", tag="output_text"):
    text: str
    annotations: list[Any] = msgspec.field(default_factory=list)
    logprobs: list[Any] = msgspec.field(default_factory=list)


class OutputMessage(msgspec.Struct, tag_field="type", tag="message"):
    id: str
    content: list[OutputText]
    status: str = "completed"  # "in_progress", "completed" or "incomplete"
    role: str = "assistant"


class FunctionCallItem(msgspec.Struct, tag_field="type", tag="function_call"):
    id: str
    call_id: str
    name: str
    arguments: str  # JSON text
    status: str = "completed"


OutputItem = OutputMessage | FunctionCallItem


class InputTokensDetails(msgspec.Struct):
    cached_tokens: int = 0


class OutputTokensDetails(msgspec.Struct):
    reasoning_tokens: int = 0


class ResponseUsage(msgspec.Struct):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens_details: OutputTokensDetails = msgspec.field(default_factory=OutputTokensDetails)


class IncompleteDetails(msgspec.Struct):
    reason: str  # "max_output_tokens"


class ResponseError(msgspec.Struct):
    code: str  # "server_error"
    message: str


class Response(msgspec.Struct, kw_only=True):
    """A Response object: the answer to POST /v1/responses and GET /v1/responses/{id}."""

    id: str
    created_at: int
    model: str
    status: str  # "in_progress", "completed", "incomplete" or "failed"
    output: list[OutputItem]
    usage: ResponseUsage | None = None
    incomplete_details: IncompleteDetails | None = None
    error: ResponseError | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = msgspec.field(default_factory=list)
    text: dict[str, Any] = msgspec.field(default_factory=lambda: {"format": {"type": "text"}})
    store: bool = True
    user: str | None = None
    background: bool = False
    truncation: str = "disabled"
    reasoning: dict[str, Any] | None = None
    object: str = "response"


class DeletedResponse(msgspec.Struct):
    id: str
    deleted: bool = True
    object: str = "response.deleted"
