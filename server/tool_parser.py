"""Tool calls in Llama 4 outputs, parsed whole or streamed.

Llama 4 answers with a Python list of calls, ``[f(a=1), g(b="x")]`` (keyword arguments, Python
literal values), some checkpoints with JSON: ``{"name": "f", "parameters": {...}}`` (``"type":
"function"`` allowed, ``"arguments"`` instead of ``"parameters"``, either an object or a JSON
string holding one), a JSON list of such objects, or several separated by ``;`` or whitespace.

What is a call list. A candidate starts at a ``[``, a ``{`` or a ``<|python_start|>``. The call
list is the first candidate p such that text[p:], once a trailing run of whitespace and
``<|python_end|>``/``<|eot|>``/``<|eom|>`` markers is cut off (and a leading
``<|python_start|>`` and whitespace after it), is one pythonic list or one JSON sequence as
above; every call names a declared tool; every value is a string, a number (finite, as JSON can
hold it), True/False/None, or a list, tuple (read as a list) or dict (string keys) of those;
no argument is repeated; nesting is at most _MAX_DEPTH deep. Then ``content`` is text[:p] with
trailing whitespace stripped (None if empty) and ``calls`` the calls. Otherwise the whole text is
content, unchanged, and there are no calls. Hence anything but whitespace and those markers after
a list makes the list prose. Leading whitespace is kept: stripping it would stop a stream from
emitting anything of an answer that starts with whitespace until the end (see below). Nothing
here raises on any text.

Invariant (streaming). For every text and every way to cut it into deltas, ToolCallStream's
content pieces (push and finish) concatenate to ``parse_tool_calls(text).content or ""`` and its
calls are ``parse_tool_calls(text).calls``.

How the stream keeps it. A left-to-right scanner (_scan) accepts every prefix of a call list's
text and rejects, for good, text that no continuation can make one (``[1, 2]``, ``[link](url)``,
``[f(x)]``, a list followed by prose). A candidate counts only if its scanner accepts the rest
of the text, so the stream emits the text before the earliest candidate not yet rejected,
trailing whitespace held back: every possible final content begins with it. Calls are returned by
finish() only: whether a list stands is known only at the end, since any later text (prose after
``]``, a malformed element) turns the whole output into content, and a call once returned cannot
be taken back. Cost: each delta is scanned once; a rejected candidate's text is scanned again
from the next candidate on, and finish() parses the held-back text once.
"""

from __future__ import annotations

import ast
import json
import re
import warnings
from collections.abc import Callable, Collection, Generator
from dataclasses import dataclass
from typing import Any

_START = "<|python_start|>"
_END_MARKERS = ("<|python_end|>", "<|eot|>", "<|eom|>")
_CANDIDATE = re.compile(r"[\[{<]")
_JSON_SEPARATORS = re.compile(r"[\s;]*")
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)  # a string or a bracket
_MAX_DEPTH = 32  # nesting of brackets within a value


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]

    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None  # the text that is not a call, see the module docstring; None when empty
    calls: list[ToolCall]  # empty: the whole output is content


def parse_tool_calls(text: str, tool_names: Collection[str]) -> ParsedOutput:
    found = _find_calls(text, frozenset(tool_names))
    if found is None:
        return ParsedOutput(text or None, [])
    start, calls = found
    return ParsedOutput(text[:start].rstrip() or None, calls)


class ToolCallStream:
    """Incremental parsing of a streamed output; see the module docstring for what it emits."""

    def __init__(self, tool_names: Collection[str]) -> None:
        self._names = frozenset(tool_names)
        self._prose = ""  # not emitted yet, before the candidate: whitespace once push returns
        self._candidate: list[str] = []  # the text from the earliest candidate not rejected
        self._scanner: Generator[None, str, None] | None = None  # that candidate's

    def push(self, delta: str) -> tuple[str, list[ToolCall]]:
        """The content to emit now, and the calls completed (always none: see the docstring)."""
        prose, text = self._prose, delta
        while text:
            if self._scanner is None:
                match = _CANDIDATE.search(text)
                if match is None:
                    prose += text
                    break
                prose += text[: match.start()]
                text = text[match.start() :]
                self._scanner = _new_scanner()
            if _feed(self._scanner, text):
                self._candidate.append(text)
                break
            text = "".join(self._candidate) + text  # rejected: go on from its second character
            self._candidate, self._scanner = [], None
            prose += text[0]
            text = text[1:]
        emit = prose.rstrip()
        self._prose = prose[len(emit) :]
        return emit, []

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The rest of the content and the calls, at the end of the output; resets the stream."""
        held = self._prose + "".join(self._candidate)
        self._prose, self._candidate, self._scanner = "", [], None
        found = _find_calls(held, self._names)
        if found is None:
            return held, []
        start, calls = found
        return held[:start].rstrip(), calls


def _find_calls(text: str, names: frozenset[str]) -> tuple[int, list[ToolCall]] | None:
    """The first candidate that is a call list (where it starts, its calls), if any."""
    for match in _CANDIDATE.finditer(text):
        start = match.start()
        if _feed(_new_scanner(), text, start):
            calls = _parse_calls(text[start:], names)
            if calls is not None:
                return start, calls
    return None


# Parsing a candidate (the text from it to the end), once its scanner has accepted it.


def _parse_calls(text: str, names: frozenset[str]) -> list[ToolCall] | None:
    body = _strip_tail(text)
    if body.startswith(_START):
        body = body[len(_START) :].lstrip()
    for parse in (_python_calls, _json_calls):
        try:
            return parse(body, names)
        except (SyntaxError, ValueError, TypeError):  # TypeError: {[1]: 2}
            pass
    return None


def _strip_tail(text: str) -> str:
    end = len(text)
    while True:
        while end and text[end - 1].isspace():
            end -= 1
        marker = next((m for m in _END_MARKERS if text.endswith(m, 0, end)), None)
        if marker is None:
            return text[:end]
        end -= len(marker)


def _python_calls(body: str, names: frozenset[str]) -> list[ToolCall]:
    with warnings.catch_warnings():  # invalid escapes ("\d") warn, or raise under -W error
        warnings.simplefilter("ignore")
        tree = ast.parse(body, mode="eval").body
    if not isinstance(tree, ast.List) or not tree.elts:
        raise ValueError("not a list of calls")
    calls = []
    for node in tree.elts:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)) or node.args:
            raise ValueError("not a call by name with keyword arguments")
        arguments = {}
        for keyword in node.keywords:
            if keyword.arg is None or keyword.arg in arguments:
                raise ValueError("**arguments or a repeated argument")
            arguments[keyword.arg] = ast.literal_eval(keyword.value)
        calls.append(_call(node.func.id, arguments, names))
    return calls


def _json_calls(body: str, names: frozenset[str]) -> list[ToolCall]:
    decoder = json.JSONDecoder(parse_constant=_reject_constant)
    calls = []
    position = 0
    while position < len(body):
        value, position = decoder.raw_decode(body, position)
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, dict) or item.get("type", "function") != "function":
                raise ValueError("not a function call object")
            if not item.keys() <= {"type", "name", "parameters", "arguments"}:
                raise ValueError("unknown keys")
            if ("parameters" in item) == ("arguments" in item):
                raise ValueError('needs one of "parameters" and "arguments"')
            arguments = item.get("parameters", item.get("arguments"))
            if isinstance(arguments, str):
                if _json_depth(arguments) > _MAX_DEPTH:  # a deterministic limit, before recursion
                    raise ValueError("nested too deep")
                arguments = decoder.decode(arguments)
            calls.append(_call(item.get("name"), arguments, names))
        position = _JSON_SEPARATORS.match(body, position).end()
    if not calls:
        raise ValueError("no calls")
    return calls


def _json_depth(text: str) -> int:
    depth = deepest = 0
    for token in _JSON_TOKEN.finditer(text):
        if token[0] in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif token[0] in "]}":
            depth -= 1
    return deepest


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _call(name: Any, arguments: Any, names: frozenset[str]) -> ToolCall:
    if not isinstance(name, str) or name not in names:
        raise ValueError("not a declared tool")
    if not isinstance(arguments, dict):
        raise ValueError("arguments are not an object")
    arguments = _to_json(arguments)
    json.dumps(arguments, allow_nan=False)  # ValueError: an infinite float, a huge integer
    return ToolCall(name, arguments)


def _to_json(value: Any) -> Any:
    """value with tuples as lists; ValueError where it is not JSON data."""
    if value is None or isinstance(value, (str, int, float)):  # bool is an int
        return value
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _to_json(v) for k, v in value.items()}
    raise ValueError(f"{type(value).__name__} is not JSON data")


# The scanner: a generator sent one character at a time, raising _Reject once no continuation of
# the text sent can be a call list. Each helper gets the current character and returns the first
# character after what it scanned. It is more lenient than the parser (numbers, JSON details):
# it only has to accept every prefix of what the parser accepts.

_Scan = Generator[None, str, str]


class _Reject(Exception):
    pass


def _new_scanner() -> Generator[None, str, None]:
    scanner = _scan()
    next(scanner)
    return scanner


def _feed(scanner: Generator[None, str, None], text: str, start: int = 0) -> bool:
    """Send text[start:]; False if the scanner rejected it."""
    try:
        for i in range(start, len(text)):
            scanner.send(text[i])
    except _Reject:
        return False
    return True


def _scan() -> Generator[None, str, None]:
    c = yield
    if c == "<":
        c = yield from _ws((yield from _expect(c, _START)))
    if c == "[":
        c = yield from _ws((yield))
        if c == "{":
            c = yield from _json_rest((yield from _items(c, "]", _json_item)))
        else:
            c = yield from _items(c, "]", _call_item)
    elif c == "{":
        c = yield from _json_rest((yield from _json_value(c, 0)))
    else:
        raise _Reject
    while True:  # the tail: whitespace and end markers
        if c == "<":
            marker = c
            while marker not in _END_MARKERS:
                if not any(m.startswith(marker) for m in _END_MARKERS):
                    raise _Reject
                marker += yield
        elif not c.isspace():
            raise _Reject
        c = yield


def _ws(c: str) -> _Scan:
    while c.isspace():
        c = yield
    return c


def _expect(c: str, literal: str) -> _Scan:
    for expected in literal:
        if c != expected:
            raise _Reject
        c = yield
    return c


def _identifier(c: str) -> Generator[None, str, tuple[str, str]]:
    if not c.isidentifier():
        raise _Reject
    word = c
    c = yield
    while ("_" + c).isidentifier():
        word += c
        c = yield
    return word, c


def _items(c: str, close: str, item: Callable[[str], _Scan]) -> _Scan:
    """``item, item, ...`` (a trailing comma allowed) then close; c follows the opening bracket."""
    c = yield from _ws(c)
    while c != close:
        c = yield from _ws((yield from item(c)))
        if c == ",":
            c = yield from _ws((yield))
        elif c != close:
            raise _Reject
    return (yield)


def _call_item(c: str) -> _Scan:
    _, c = yield from _identifier(c)
    if (yield from _ws(c)) != "(":
        raise _Reject
    return (yield from _items((yield), ")", _keyword))


def _keyword(c: str) -> _Scan:
    _, c = yield from _identifier(c)
    if (yield from _ws(c)) != "=":
        raise _Reject
    return (yield from _python_value((yield from _ws((yield))), 1))


def _python_value(c: str, depth: int) -> _Scan:
    if depth > _MAX_DEPTH:
        raise _Reject
    if c in "'\"":
        return (yield from _python_string(c))
    if c in "+-":
        return (yield from _number((yield from _ws((yield)))))
    if c == "[" or c == "(":
        close = "]" if c == "[" else ")"
        return (yield from _items((yield), close, lambda c: _python_value(c, depth + 1)))
    if c == "{":
        return (yield from _items((yield), "}", lambda c: _python_pair(c, depth + 1)))
    if not c.isidentifier():
        return (yield from _number(c))
    word, c = yield from _identifier(c)
    if c in "'\"" and word in ("r", "R", "u", "U"):
        return (yield from _python_string(c))
    if word in ("True", "False", "None"):
        return c
    raise _Reject


def _python_pair(c: str, depth: int) -> _Scan:
    if (yield from _ws((yield from _python_value(c, depth)))) != ":":
        raise _Reject
    return (yield from _python_value((yield from _ws((yield))), depth))


def _python_string(quote: str) -> _Scan:
    c = yield
    if c != quote:
        return (yield from _string_body(c, quote))
    c = yield
    if c != quote:
        return c  # the empty string
    return (yield from _string_body((yield), quote * 3))


def _string_body(c: str, end: str) -> _Scan:
    run = 0  # of closing quotes
    while run < len(end):
        if c == "\\":
            yield  # the escaped character
            run = 0
        elif c == end[0]:
            run += 1
        elif len(end) == 1 and c in "\r\n":
            raise _Reject
        else:
            run = 0
        c = yield
    return c


def _number(c: str) -> _Scan:
    if not (c.isdigit() or c == "."):
        raise _Reject
    previous = ""
    while c.isalnum() or c in "._" or (c in "+-" and previous in ("e", "E")):
        previous, c = c, (yield)
    return c


def _json_rest(c: str) -> _Scan:
    """After a JSON value: more of them, separated by whitespace and semicolons."""
    while True:
        while c.isspace() or c == ";":
            c = yield
        if c not in "{[":
            return c
        c = yield from _json_value(c, 0)


def _json_item(c: str) -> _Scan:
    return (yield from _json_value(c, 1))


def _json_value(c: str, depth: int) -> _Scan:
    if depth > _MAX_DEPTH:
        raise _Reject
    if c == '"':
        return (yield from _string_body((yield), '"'))
    if c == "[":
        return (yield from _items((yield), "]", lambda c: _json_value(c, depth + 1)))
    if c == "{":
        return (yield from _items((yield), "}", lambda c: _json_pair(c, depth + 1)))
    if c == "-":
        return (yield from _number((yield)))
    if not c.isidentifier():
        return (yield from _number(c))
    word, c = yield from _identifier(c)
    if word in ("true", "false", "null"):
        return c
    raise _Reject


def _json_pair(c: str, depth: int) -> _Scan:
    if c != '"':
        raise _Reject
    if (yield from _ws((yield from _string_body((yield), '"')))) != ":":
        raise _Reject
    return (yield from _json_value((yield from _ws((yield))), depth))
