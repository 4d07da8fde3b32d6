"""Tool calling and structured outputs at the API edge: what the chat template sees, what the
grammar forces, and which grammar a request asks for.

Invariants:
- With tool_choice "required" or a named function, the output is constrained by a JSON grammar
  (a list of {"name", "parameters"} objects, one per call, each naming a declared function with
  parameters valid for its schema), so it always parses into calls; with "auto" the pythonic
  parser decides; with "none" (or no tools) the output is plain content.
- A request names at most one grammar (response_format json, regex, ebnf or json_schema, or the
  forced tool-call format); anything malformed, a JSON text nested deeper than MAX_JSON_DEPTH
  included, is a RequestError naming the field, and a grammar that fails to compile is blamed on
  the field it came from (grammar_param).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pyllama4.grammar import GrammarSpec
from pyllama4.server import protocol as p
from pyllama4.server.json_depth import MAX_JSON_DEPTH, too_deep


class RequestError(ValueError):
    """A 400: the message names the problem, `param` the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolPlan:
    names: frozenset[str]  # declared functions the parser turns into calls; empty: no parsing
    template_tools: list[dict[str, Any]] | None  # what the chat template lists
    grammar: GrammarSpec | None  # the forced call format ("required" or a named function)


def plan_tools(req: p.ChatCompletionRequest, parser: str | None) -> ToolPlan:
    """How a chat request uses its tools. parser: the server's --tool-call-parser."""
    tools = req.tools or []
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    if isinstance(choice, str) and choice not in ("none", "auto", "required"):
        raise RequestError(
            f'tool_choice {choice!r}: expected "none", "auto", "required" or '
            '{"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    if choice == "none":
        return ToolPlan(frozenset(), None, None)
    if not tools:
        raise RequestError(f"tool_choice {_show(choice)} needs tools", "tool_choice")
    if parser is None:
        raise RequestError(
            "tool calling is off on this server: start it with --tool-call-parser pythonic",
            "tools",
        )
    by_name: dict[str, p.FunctionDefinition] = {}
    for i, tool in enumerate(tools):
        if tool.type != "function":
            raise RequestError(f"tools[{i}].type {tool.type!r}: only function tools", "tools")
        if tool.function.name in by_name:
            raise RequestError(f"tools: {tool.function.name!r} is declared twice", "tools")
        by_name[tool.function.name] = tool.function
    template_tools = [{"type": "function", "function": _definition(f)} for f in by_name.values()]
    grammar = None
    if isinstance(choice, p.NamedToolChoice):
        if choice.function.name not in by_name:
            raise RequestError(
                f"tool_choice names {choice.function.name!r}, which is not in tools",
                "tool_choice",
            )
        grammar = forced_calls([by_name[choice.function.name]], parallel=False)
    elif choice == "required":
        grammar = forced_calls(list(by_name.values()), parallel=req.parallel_tool_calls)
    return ToolPlan(frozenset(by_name), template_tools, grammar)


def forced_calls(functions: list[p.FunctionDefinition], *, parallel: bool) -> GrammarSpec:
    """A JSON list of calls to these functions (one call unless parallel), as a schema."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [f.name]},
                "parameters": f.parameters or {"type": "object"},
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    item = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema: dict[str, Any] = {"type": "array", "items": item, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return GrammarSpec("json_schema", json.dumps(schema))


def template_message(i: int, m: p.ChatMessage, content: Any) -> dict[str, Any]:
    """One message as chat templates take it: past tool calls with parsed arguments."""
    message: dict[str, Any] = {"role": m.role, "content": content}
    if m.tool_calls:
        calls = []
        for j, call in enumerate(m.tool_calls):
            arguments = call.function.arguments
            if isinstance(arguments, str):
                if too_deep(arguments):
                    raise RequestError(
                        f"messages[{i}].tool_calls[{j}].function.arguments nests more than "
                        f"{MAX_JSON_DEPTH} levels",
                        "messages",
                    )
                try:
                    arguments = json.loads(arguments) if arguments.strip() else {}
                except json.JSONDecodeError:
                    raise RequestError(
                        f"messages[{i}].tool_calls[{j}].function.arguments is not JSON",
                        "messages",
                    ) from None
            calls.append(
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": arguments or {}},
                }
            )
        message["tool_calls"] = calls
    if m.tool_call_id is not None:
        message["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        message["name"] = m.name
    return message


def grammar_of(req: Any) -> GrammarSpec | None:
    """The grammar a chat / completions request asks for (response_format, regex, ebnf,
    json_schema), or None."""
    asked: list[tuple[str, GrammarSpec]] = []
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        if fmt.type == "json_object":
            asked.append(("response_format", GrammarSpec("json_object", "")))
        elif fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema is None:
                raise RequestError(
                    "response_format json_schema needs json_schema.schema", "response_format"
                )
            asked.append(
                ("response_format", GrammarSpec("json_schema", json.dumps(fmt.json_schema.schema)))
            )
        else:
            raise RequestError(
                f"response_format type {fmt.type!r}: expected text, json_object or json_schema",
                "response_format",
            )
    return one_grammar(asked + native_grammars(req))


def native_grammars(fields: Any, prefix: str = "") -> list[tuple[str, GrammarSpec]]:
    """SGLang's regex / ebnf / json_schema fields (on a request, or with prefix
    "sampling_params." on its sampling_params), each with the field it came from."""
    asked = []
    for kind in ("regex", "ebnf", "json_schema"):
        value = getattr(fields, kind)
        if value is None:
            continue
        if kind == "json_schema" and too_deep(value):
            raise RequestError(
                f"json_schema nests more than {MAX_JSON_DEPTH} levels", prefix + kind
            )
        asked.append((prefix + kind, GrammarSpec(kind, value)))
    return asked


def grammar_param(fields: Any, tools: ToolPlan | None = None, prefix: str = "") -> str:
    """The field a grammar came from, where its compile error is reported: fields is the request
    (or, with prefix "sampling_params.", its sampling_params); tools its ToolPlan."""
    if tools is not None and tools.grammar is not None:
        return "tools"
    asked = native_grammars(fields, prefix)
    return asked[0][0] if asked else "response_format"


def one_grammar(asked: list[tuple[str, GrammarSpec]]) -> GrammarSpec | None:
    if len(asked) > 1:
        names = ", ".join(name for name, _ in asked)
        raise RequestError(f"give at most one structured-output constraint ({names})", asked[1][0])
    return asked[0][1] if asked else None


def _definition(f: p.FunctionDefinition) -> dict[str, Any]:
    out: dict[str, Any] = {"name": f.name}
    if f.description is not None:
        out["description"] = f.description
    out["parameters"] = f.parameters or {"type": "object", "properties": {}}
    return out


def _show(choice: Any) -> str:
    return repr(choice) if isinstance(choice, str) else f"function {choice.function.name!r}"
