"""Streaming detokenization and stop strings: text that is emitted is never taken back.

IncrementalDetokenizer turns a request's output tokens into text as they arrive.

Invariants:
- Prefix: at every moment, the concatenation of everything `push()` has returned (`text`) is a
  prefix of the text the whole output will finally decode to. Text that is emitted never changes.
- Exactness: `text` equals `tokenizer.decode(output_ids, skip_special_tokens=...)` whenever that
  decode does not end in U+FFFD (an incomplete multi-byte character, or a genuinely invalid byte,
  or a literal U+FFFD, which cannot be told apart until more tokens come); after `finish()` it
  equals that decode unconditionally. Special tokens are skipped or kept exactly as `decode` does.
- Cost: each push decodes only a short window (a few tokens before the last emitted boundary plus
  the tokens not yet emitted), so a push costs O(window + new tokens), never O(output length);
  the detokenizer keeps only that window, not the whole output.

How (the prefix/read-offset technique of vLLM and HF TGI): `_read` is the token index up to which
text has been emitted and `_prefix` a few tokens before it. With `prefix_text = decode(ids[_prefix:
_read])` and `full = decode(ids[_prefix:])`, the new text is `full[len(prefix_text):]`; it is held
back while `full` ends in U+FFFD. Decoding from a few tokens back (rather than from `_read`) gives
the tokenizer the context it needs at the boundary (e.g. leading-space handling); the window is
seeded with the prompt's last tokens so that this holds for the first output token too.

Exactness rests on the tokenizer's decode being local: decoding a window that starts at any token
and diffing against the same window's prefix must give the same text as decoding everything. That
holds for byte-level BPE (Llama 3/4, GPT-2, SmolLM2: the text is the lossy UTF-8 decoding of the
tokens' concatenated bytes, Rust's `from_utf8_lossy`, one U+FFFD per maximal invalid subpart). For
byte-level BPE the prompt seeding therefore changes nothing: output text == decode(output_ids).
For SentencePiece-style tokenizers (which drop the leading space of the first token decoded) the
seeding yields the in-context text, which can differ from a fresh decode of the output alone.

Held-back tails are bounded: if more than `MAX_PENDING` tokens are pending and the decode still
ends in U+FFFD (a run of invalid bytes, or literal U+FFFD characters), the last token boundary at
which decoding is additive (`decode(a) + decode(b) == decode(a + b)`, `b` non-empty) is found among
the last few tokens; for lossy UTF-8 decoding such a boundary is one no later bytes can reach
across, so everything before it is final and is emitted.

StopStrings cuts a stream of text at the first stop string.

Invariants:
- The stop found is the one that is complete earliest in the text (smallest end index; among stops
  ending there, the longest), whatever the chunking: exactly what a generator that checks after
  every character would stop at. The output is the text before it (plus the stop string itself
  with include_stop_str_in_output), and nothing after it.
- Hold-back: text that ends in a proper prefix of some stop string is held back (the longest such
  suffix), so a stop string that later completes is never partly shown; everything emitted is a
  prefix of the final output. With no stop strings it is a pass-through.
- Cost: an Aho-Corasick automaton over the stop strings reads each character once; a push costs
  O(new text + longest stop string). The automaton (StopAutomaton) is built once per set of stop
  strings, in time and memory linear in their total length, and never changes: the completions
  of a request share it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

__all__ = ["IncrementalDetokenizer", "StopAutomaton", "StopStrings", "compile_stops"]

REPLACEMENT_CHAR = "\ufffd"

# Prompt tokens that seed the window, and tokens kept before the emitted boundary (vLLM uses 5).
PREFIX_WINDOW = 5
# Pending (held-back) tokens beyond which a final boundary inside them is looked for. A complete
# UTF-8 character is at most 4 bytes, so valid text never needs more than 4 pending tokens.
MAX_PENDING = 8
# How far back from the end that boundary is looked for.
MAX_BOUNDARY_SCAN = 16


class IncrementalDetokenizer:
    """Output token ids in, new output text out; see the module docstring for the invariants.

    `tokenizer` is anything with `decode(ids, skip_special_tokens=bool) -> str` (a transformers
    tokenizer or a `tokenizers.Tokenizer`).
    """

    def __init__(
        self, tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        seed = [int(t) for t in prompt_ids[-PREFIX_WINDOW:]] if len(prompt_ids) else []
        # A prompt that ends inside a character would glue its bytes to the output's: start clean.
        if seed and self._decode(seed).endswith(REPLACEMENT_CHAR):
            seed = []
        self._ids: list[int] = seed  # the window: ids[0] is the prefix offset
        self._read = len(seed)  # text of ids[:_read] is emitted (or is prompt)
        self._prefix_text = self._decode(seed) if seed else ""
        self._chunks: list[str] = []
        self._num_tokens = 0
        self._finished = False

    @property
    def text(self) -> str:
        """All output text emitted so far."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def num_tokens(self) -> int:
        """Output tokens pushed so far."""
        return self._num_tokens

    @property
    def has_pending(self) -> bool:
        """Whether tokens are held back (their text is not emitted yet)."""
        return len(self._ids) > self._read

    def push(self, token_ids: Sequence[int]) -> str:
        """Add output tokens; return the new text they complete (possibly empty)."""
        if self._finished:
            raise RuntimeError("push() after finish()")
        if not len(token_ids):
            return ""
        self._ids.extend(int(t) for t in token_ids)
        self._num_tokens += len(token_ids)
        full = self._decode(self._ids)
        if not full.endswith(REPLACEMENT_CHAR):
            return self._emit(len(self._ids), full)
        if len(self._ids) - self._read > MAX_PENDING:
            self._drop_invisible_tail(full)
            boundary = self._final_boundary(full)
            if boundary is not None:
                return self._emit(*boundary)
        return ""

    def finish(self) -> str:
        """End of output: return whatever is held back, as decode gives it. Idempotent."""
        if self._finished:
            return ""
        self._finished = True
        if not self.has_pending:
            return ""
        return self._emit(len(self._ids), self._decode(self._ids))

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _emit(self, read: int, text: str) -> str:
        """Emit `text` (the decode of ids[:read]) beyond the prefix text; move the window on."""
        new = text[len(self._prefix_text) :]
        prefix = max(self._read, read - PREFIX_WINDOW)
        del self._ids[:prefix]
        self._read = read - prefix
        self._prefix_text = self._decode(self._ids[: self._read])
        if new:
            self._chunks.append(new)
        return new

    def _drop_invisible_tail(self, full: str) -> None:
        """Drop trailing pending tokens that decode to nothing, alone and in the window (skipped
        special tokens): they cannot change any later decode, and a run of them must not grow the
        window while its text ends in U+FFFD."""
        ids = self._ids
        n = len(ids)
        while n > self._read and not self._decode(ids[n - 1 : n]):
            n -= 1
        if n < len(ids) and self._decode(ids[:n]) == full:
            del ids[n:]

    def _final_boundary(self, full: str) -> tuple[int, str] | None:
        """The last pending token boundary no later token can decode across, with the window's text
        up to it; None if there is none among the last MAX_BOUNDARY_SCAN tokens."""
        ids = self._ids
        for j in range(len(ids) - 1, max(self._read, len(ids) - MAX_BOUNDARY_SCAN), -1):
            tail = self._decode(ids[j:])
            if not tail:
                continue  # only tokens that decode to nothing (skipped special tokens)
            head = self._decode(ids[:j])
            if head + tail == full:
                return j, head
        return None


class StopAutomaton:
    """The compiled stop strings: an immutable Aho-Corasick automaton that any number of
    StopStrings (one per completion, each with its own state) read at once."""

    def __init__(self, stop: Sequence[str]) -> None:
        if isinstance(stop, str):
            raise TypeError("stop must be a sequence of strings, not a string")
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self.stop: tuple[str, ...] = tuple(dict.fromkeys(stop))
        # Node 0 is the root; a node is a prefix of some stop string.
        goto: list[dict[str, int]] = [{}]
        fail, depth = [0], [0]
        match = [0]  # length of the longest stop that ends at this node, or 0
        for s in self.stop:
            node = 0
            for ch in s:
                nxt = goto[node].get(ch)
                if nxt is None:
                    nxt = len(goto)
                    goto[node][ch] = nxt
                    goto.append({})
                    fail.append(0)
                    depth.append(depth[node] + 1)
                    match.append(0)
                node = nxt
            match[node] = len(s)
        queue = list(goto[0].values())  # breadth first: fail links point to shallower nodes
        for node in queue:
            for ch, child in goto[node].items():
                f = fail[node]
                while f and ch not in goto[f]:
                    f = fail[f]
                fail[child] = goto[f].get(ch, 0)
                if not match[child]:
                    match[child] = match[fail[child]]
                queue.append(child)
        self.goto, self.fail = tuple(goto), tuple(fail)
        self.depth, self.match = tuple(depth), tuple(match)


@functools.lru_cache(maxsize=32)
def compile_stops(stop: tuple[str, ...]) -> StopAutomaton:
    """The automaton of these stop strings, cached: a server compiles a request's in a worker
    thread, and the engine then finds it here."""
    return StopAutomaton(stop)


class StopStrings:
    """Cuts streamed text at the first stop string; see the module docstring for the invariants.

    `stop` is the stop strings or their compiled automaton (shared by the n completions of a
    request: it is read-only, the state is per StopStrings)."""

    def __init__(
        self, stop: Sequence[str] | StopAutomaton, include_stop_str_in_output: bool = False
    ) -> None:
        self._automaton = stop if isinstance(stop, StopAutomaton) else StopAutomaton(stop)
        self.stop = list(self._automaton.stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stopped = False
        self.matched: str | None = None  # the stop string found, once stopped
        self._held = ""  # not emitted yet: the longest suffix that is a proper prefix of a stop
        self._state = 0

    def push(self, new_text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit now, whether a stop string has been found)."""
        if self.stopped:
            return "", True
        if not self.stop:
            return new_text, False
        a = self._automaton
        goto, fail, match = a.goto, a.fail, a.match
        state = self._state
        for i, ch in enumerate(new_text):
            while state and ch not in goto[state]:
                state = fail[state]
            state = goto[state].get(ch, 0)
            if match[state]:
                self.stopped = True
                n = match[state]
                text = self._held + new_text[: i + 1]
                self.matched = text[len(text) - n :]
                self._held = ""
                return (text if self.include_stop_str_in_output else text[: len(text) - n]), True
        self._state = state
        text = self._held + new_text
        keep = a.depth[state]
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def finish(self) -> str:
        """End of the request without a stop: return the held-back text. Idempotent."""
        held, self._held = self._held, ""
        return held
