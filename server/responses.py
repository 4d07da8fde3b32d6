"""OpenAI response objects from engine outputs: choices, logprobs, usage, tool calls, and the
chunks of a stream.

Invariant: a streamed chat completion carries the same content, tool calls and finish reason as
the whole response would (tool calls parsed by ToolCallStream, which matches parse_tool_calls;
forced calls read by ForcedCallStream, which matches read_forced_calls); each choice's first
delta carries the role.
"""

from __future__ import annotations

import uuid
from typing import Any

from pyllama4.outputs import RequestOutput
from pyllama4.server import protocol as p
from pyllama4.server.forced_calls import CallPiece, ForcedCallStream, read_forced_calls
from pyllama4.server.tool_parser import ToolCall, ToolCallStream, parse_tool_calls
from pyllama4.server.tools import ToolPlan


def finish_reason(c: Any) -> str | None:
    return {"abort": "abort", "error": "error"}.get(c.finish_reason, c.finish_reason)


def usage(out: RequestOutput) -> p.Usage:
    completion = sum(len(c.token_ids) for c in out.outputs)
    prompt = len(out.prompt_token_ids)
    return p.Usage(prompt, completion, prompt + completion, {"cached_tokens": out.cached_tokens})


def token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id])


def token_bytes(tokenizer: Any, token_id: int) -> list[int]:
    return list(tokenizer.decode([token_id]).encode())


def chat_logprobs(tokenizer: Any, entries: Any) -> p.ChoiceLogprobs:
    content = []
    for e in entries or []:
        tops = [
            p.TopLogprob(token_text(tokenizer, t), lp, token_bytes(tokenizer, t)) for t, lp in e.top
        ]
        content.append(
            p.TokenLogprobEntry(
                token_text(tokenizer, e.token_id),
                e.logprob,
                token_bytes(tokenizer, e.token_id),
                tops,
            )
        )
    return p.ChoiceLogprobs(content)


def completion_logprobs(
    tokenizer: Any, entries: Any, prompt_ids: Any = (), offset: int = 0
) -> p.CompletionLogprobs:
    """Legacy completions logprobs of the entries, their text offsets counted from `offset`; an
    entry None is a token without a logprob (an echoed prompt's first: prompt_ids[i])."""
    tokens, lps, tops, offsets, at = [], [], [], [], offset
    for i, e in enumerate(entries or []):
        text = token_text(tokenizer, prompt_ids[i] if e is None else e.token_id)
        tokens.append(text)
        lps.append(None if e is None else e.logprob)
        tops.append(None if e is None else {token_text(tokenizer, t): lp for t, lp in e.top})
        offsets.append(at)
        at += len(text)
    return p.CompletionLogprobs(tokens, lps, tops, offsets)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call_out(call: ToolCall) -> tuple[str, p.FunctionCallOut]:
    """(id, function) of a parsed call, as the API returns it."""
    return new_call_id(), p.FunctionCallOut(call.name, call.arguments_json())


def tool_call_delta(call: ToolCall) -> tuple[str, str, p.FunctionCallOut]:
    """(id, type, function) of a streamed call: each call is sent whole, in one delta."""
    call_id, function = tool_call_out(call)
    return call_id, "function", function


def chat_message(c: Any, tools: ToolPlan) -> tuple[p.ChatResponseMessage, str | None]:
    """A finished completion as the assistant's message, its tool calls parsed out."""
    reason = finish_reason(c)
    if not tools.names:
        return p.ChatResponseMessage("assistant", c.text), reason
    if tools.grammar is not None:
        forced = [
            p.ToolCallOut(new_call_id(), p.FunctionCallOut(call.name, call.arguments))
            for call in read_forced_calls(c.text)
        ]
        if forced:
            return (
                p.ChatResponseMessage("assistant", None, forced),
                "tool_calls" if reason == "stop" else reason,
            )
    parsed = parse_tool_calls(c.text, tools.names)
    if not parsed.calls:
        return p.ChatResponseMessage("assistant", c.text), reason
    calls = [p.ToolCallOut(*tool_call_out(call)) for call in parsed.calls]
    return (
        p.ChatResponseMessage("assistant", parsed.content, calls),
        "tool_calls" if reason == "stop" else reason,
    )


class ChatChunks:
    """The chunks of one streamed chat completion. With tools: content until a call list
    starts, then each call as a tool_calls delta as soon as it is complete; a forced call
    (tools.grammar) is sent as soon as its name is complete, then its arguments as they come.
    A chunk that would carry nothing is not sent."""

    def __init__(self, rid: str, created: int, model: str, tools: ToolPlan, tokenizer: Any | None):
        """tokenizer: for logprobs (None: the request asked for none)."""
        self.rid, self.created, self.model = rid, created, model
        self.tools, self.tokenizer = tools, tokenizer
        self.sent_role: set[int] = set()
        self.parsers: dict[int, ToolCallStream] = {}
        self.forced: dict[int, ForcedCallStream] = {}
        self.calls_sent: dict[int, int] = {}
        self.ended: set[int] = set()  # completions whose finish_reason has been sent

    def chunk(self, c: Any) -> p.ChatCompletionChunk | None:
        """The chunk for one completion's latest output (None: nothing to send, or it ended in
        an earlier chunk: a request's outputs carry its finished completions too)."""
        if c.index in self.ended:
            return None
        if c.finished:
            self.ended.add(c.index)
        text, calls = self.split(c)
        delta = p.ChatDelta(content=text or None, tool_calls=calls or None)
        if c.index not in self.sent_role:
            delta.role = "assistant"
            self.sent_role.add(c.index)
        lp = chat_logprobs(self.tokenizer, c.delta_logprobs) if self.tokenizer is not None else None
        reason = finish_reason(c)
        if reason == "stop" and self.calls_sent.get(c.index):
            reason = "tool_calls"
        if delta == p.ChatDelta() and reason is None and not (lp and lp.content):
            return None
        choice = p.ChatChunkChoice(c.index, delta, reason, lp)
        return p.ChatCompletionChunk(self.rid, self.created, self.model, [choice])

    def split(self, c: Any) -> tuple[str, list[p.ToolCallDelta]]:
        """The delta's content and its tool-call deltas."""
        if not self.tools.names:
            return c.delta_text, []
        if self.tools.grammar is not None:
            stream = self.forced.setdefault(c.index, ForcedCallStream())
            return "", [self.call_delta(c.index, piece) for piece in stream.push(c.delta_text)]
        parser = self.parsers.setdefault(c.index, ToolCallStream(self.tools.names))
        text, calls = parser.push(c.delta_text)
        if c.finished:
            tail, more = parser.finish()
            text, calls = text + tail, calls + more
        first = self.calls_sent.get(c.index, 0)
        self.calls_sent[c.index] = first + len(calls)
        return text, [
            p.ToolCallDelta(k, *tool_call_delta(call)) for k, call in enumerate(calls, first)
        ]

    def call_delta(self, choice: int, piece: CallPiece) -> p.ToolCallDelta:
        """A forced call's piece: the first carries the call's id and name."""
        if piece.name is None:
            return p.ToolCallDelta(piece.index, function=p.FunctionCallOut(None, piece.arguments))
        self.calls_sent[choice] = piece.index + 1
        function = p.FunctionCallOut(piece.name, piece.arguments)
        return p.ToolCallDelta(piece.index, new_call_id(), "function", function)

    def usage_chunk(self, final: RequestOutput) -> p.ChatCompletionChunk:
        return p.ChatCompletionChunk(self.rid, self.created, self.model, [], usage(final))


class CompletionChunks:
    """The chunks of one streamed (text) completions request, over a batch of prompts: choice
    j of prompt i is index i * n + j; with echo, a choice's first chunk starts with its prompt's
    text (and logprobs); text offsets run on over the choice's chunks."""

    def __init__(
        self,
        rid: str,
        created: int,
        model: str,
        tokenizer: Any | None,
        *,
        n: int = 1,
        echo: list[str] | None = None,
        score_only: bool = False,
    ):
        """tokenizer: for logprobs (None: the request asked for none). echo: each prompt's
        text (None: no echo). score_only: max_tokens 0, the generated token is not shown."""
        self.rid, self.created, self.model, self.tokenizer = rid, created, model, tokenizer
        self.n, self.echo, self.score_only = n, echo, score_only
        self.ended: set[int] = set()  # choices whose finish_reason has been sent
        self.started: set[int] = set()  # choices whose echo has been sent
        self.offsets: dict[int, int] = {}  # text offset of each choice's next logprob token

    def needs_echo(self, prompt: int, c: Any) -> bool:
        return self.echo is not None and prompt * self.n + c.index not in self.started

    def chunk(self, prompt: int, out: RequestOutput, c: Any) -> p.Completion | None:
        """The chunk for one completion's latest output (None: nothing to send yet, or it
        ended in an earlier chunk)."""
        index = prompt * self.n + c.index
        echo = self.needs_echo(prompt, c)
        text, entries = ("", []) if self.score_only else (c.delta_text, c.delta_logprobs)
        if index in self.ended or not (text or c.finished or echo):
            return None
        if c.finished:
            self.ended.add(index)
        if echo:
            assert self.echo is not None
            self.started.add(index)
            text = self.echo[prompt] + text
            entries = list(out.prompt_logprobs or []) + list(entries)
        lp = None
        if self.tokenizer is not None:
            lp = completion_logprobs(
                self.tokenizer, entries, out.prompt_token_ids, self.offsets.get(index, 0)
            )
            if lp.tokens:
                self.offsets[index] = lp.text_offset[-1] + len(lp.tokens[-1])
        reason = ("length" if self.score_only else finish_reason(c)) if c.finished else None
        choice = p.CompletionChoice(index, text, reason, lp)
        return p.Completion(self.rid, self.created, self.model, [choice], None)

    def usage_chunk(self, usage: p.Usage) -> p.Completion:
        return p.Completion(self.rid, self.created, self.model, [], usage)
