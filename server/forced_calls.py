"""Forced tool calls read as they are written, so their arguments stream token by token.

With tool_choice "required" or a named function the grammar (tools.forced_calls) makes the output
a JSON list ``[{"name": "f", "parameters": {...}}, ...]``. ForcedCallStream reads that text as it
arrives: a call is reported as soon as its name is complete, then the text of its parameters
object piece by piece, exactly as the model writes it (the grammar's JSON: json.dumps'
separators).

Invariant: for every text and every way to cut it into deltas, the pieces pushed assemble into
the same calls as ``read_forced_calls(text)``: per call its index (in the order the list holds
them), its name, and its arguments text, complete once the call's object closed, a prefix of it
when the output was cut short. Text that does not have the forced shape (only possible if the
grammar was not applied) gives no further pieces; nothing here raises.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

_WS = " \t\r\n"


@dataclass
class CallPiece:
    """A part of call `index`: its name (the first piece of a call only) and more arguments."""

    index: int
    name: str | None
    arguments: str


@dataclass
class ForcedCall:
    name: str
    arguments: str


@dataclass
class _Value:
    """A JSON value being scanned character by character."""

    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    started: bool = False

    def feed(self, ch: str) -> bool | None:
        """Takes ch: True when it ended the value (ch belongs to it), False when the value ended
        before ch (a scalar's terminator, not part of it), None while the value goes on."""
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
                return True if self.depth == 0 else None
            return None
        if not self.started:
            self.started = True
            if ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth = 1
            return None
        if self.depth == 0:  # a number or literal: ends at a delimiter
            return False if ch in _WS + ",}]" else None
        if ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            return True if self.depth == 0 else None
        return None


@dataclass
class _Object:
    """The call object being read: its name once known, its arguments until then."""

    index: int
    name: str | None = None
    held: list[str] = field(default_factory=list)  # arguments read before the name


class ForcedCallStream:
    """Reads one completion's forced call list delta by delta."""

    def __init__(self) -> None:
        self.state = "open"  # open, item, key, keystr, colon, value, name, args, skip, done, bad
        self.calls = 0
        self.obj: _Object | None = None
        self.text = ""  # the key or name string being read, quotes included
        self.key = ""
        self.value = _Value()

    def push(self, delta: str) -> list[CallPiece]:
        out: list[CallPiece] = []
        for ch in delta:
            self._step(ch, out)
        return _merged(out)

    def _step(self, ch: str, out: list[CallPiece]) -> None:
        state = self.state
        if state in ("done", "bad"):
            return
        if state in ("keystr", "name"):
            self._string_char(ch, out)
        elif state in ("args", "skip"):
            self._value_char(ch, out)
        elif ch in _WS:
            return
        elif state == "open":
            self.state = "item" if ch == "[" else "bad"
        elif state == "item":
            if ch == "{":
                self.obj, self.state = _Object(self.calls), "key"
                self.calls += 1
            elif ch == "]":
                self.state = "done"
            elif ch != ",":
                self.state = "bad"
        elif state == "key":
            if ch == '"':
                self.text, self.state = ch, "keystr"
            elif ch == "}":
                self.state = "item"
            elif ch != ",":
                self.state = "bad"
        elif state == "colon":
            self.state = "value" if ch == ":" else "bad"
        elif state == "value":
            self._value_start(ch, out)

    def _string_char(self, ch: str, out: list[CallPiece]) -> None:
        self.text += ch
        if ch != '"' or _escaped(self.text):
            return
        text = _loads(self.text)
        if not isinstance(text, str):
            self.state = "bad"
        elif self.state == "keystr":
            self.key, self.state = text, "colon"
        else:
            assert self.obj is not None
            self.obj.name, self.state = text, "key"
            out.append(CallPiece(self.obj.index, text, "".join(self.obj.held)))
            self.obj.held.clear()

    def _value_start(self, ch: str, out: list[CallPiece]) -> None:
        if self.key == "name" and ch == '"':
            self.text, self.state = ch, "name"
            return
        self.value = _Value()
        self.state = "args" if self.key == "parameters" else "skip"
        self._value_char(ch, out)

    def _value_char(self, ch: str, out: list[CallPiece]) -> None:
        ended = self.value.feed(ch)
        if self.state == "args" and ended is not False:
            self._arguments(ch, out)
        if ended is not None:
            self.state = "key"
            if ended is False:
                self._step(ch, out)

    def _arguments(self, text: str, out: list[CallPiece]) -> None:
        assert self.obj is not None
        if self.obj.name is None:
            self.obj.held.append(text)
        else:
            out.append(CallPiece(self.obj.index, None, text))


def read_forced_calls(text: str) -> list[ForcedCall]:
    """The calls of a whole forced output, as its stream reports them."""
    calls: dict[int, ForcedCall] = {}
    for piece in ForcedCallStream().push(text):
        if piece.name is not None:
            calls[piece.index] = ForcedCall(piece.name, piece.arguments)
        else:
            calls[piece.index].arguments += piece.arguments
    return list(calls.values())


def _escaped(text: str) -> bool:
    """Whether the last character of text (a quote) is escaped by the backslashes before it."""
    run = len(text) - 1 - len(text[:-1].rstrip("\\"))
    return run % 2 == 1


def _loads(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _merged(pieces: list[CallPiece]) -> list[CallPiece]:
    """Consecutive argument pieces of one call joined into one."""
    out: list[CallPiece] = []
    for piece in pieces:
        if out and piece.name is None and out[-1].index == piece.index:
            out[-1].arguments += piece.arguments
        else:
            out.append(piece)
    return out
