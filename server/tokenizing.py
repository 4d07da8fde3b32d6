"""Text to token ids and back for the routes: off the event loop, with a size check first.

Invariants:
- Nothing here whose cost grows with the text runs on the event loop: encoding and decoding run
  in a worker thread, through the Rust tokenizer's batch calls, which release the GIL while they
  work (its one-text `encode` and `decode` hold it for their whole run), so the loop keeps
  answering meanwhile.
- Bytes before tokens: a text longer than `limit x chars_per_token` characters is refused (a 400)
  before it is tokenized. That is sound: every tokenization of it has more than `limit` tokens
  (see max_chars_per_token). An encoding of more than `limit` tokens is refused before its ids
  become a Python list, the one step that holds the GIL for time linear in the token count.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import anyio
import tokenizers

from pyllama4.server.asgi import HTTPError

# Pre-tokenizers that only split the text or map each byte to one character: none drops or
# merges input, so every input character stays in exactly one piece.
KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Digits", "Split"}


def max_chars_per_token(backend: tokenizers.Tokenizer | None) -> int | None:
    """The most input characters one token can stand for, or None where no bound is known.

    Known for byte-level BPE with no normalizer, no fused unknowns, no pre-tokenizer that drops
    text and no added token that swallows whitespace (Llama 3/4, GPT-2, SmolLM2). There each input
    character is at least one byte, the byte-level pre-tokenizer makes each byte one character,
    and a vocabulary token covers a run of those: at most len(token) input characters. An added
    (special) token is matched on the raw text, so it covers len(content) characters. A post-
    processor only adds tokens. So a text of C characters has at least C / bound tokens."""
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    pieces = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = {piece.get("type") for piece in pieces}
    if (
        spec.get("normalizer") is not None
        or model.get("type") != "BPE"
        or (model.get("unk_token") is not None and model.get("fuse_unk"))
        or "ByteLevel" not in kinds
        or not kinds <= KEEPING_PRE_TOKENIZERS
        or any(piece.get("behavior") == "Removed" for piece in pieces)
    ):
        return None
    added = spec.get("added_tokens") or []
    if any(a.get("lstrip") or a.get("rstrip") for a in added):
        return None
    lengths = [len(token) for token in model.get("vocab", {})]
    lengths += [len(a["content"]) for a in added]
    return max(lengths, default=1)


class TextCodec:
    """A tokenizer's encode and decode for the routes, limited to `limit` tokens a text."""

    def __init__(self, tokenizer: Any, limit: int):
        self.tokenizer = tokenizer
        self.limit = limit
        backend = getattr(tokenizer, "backend_tokenizer", None)
        plain = not getattr(tokenizer, "split_special_tokens", False)
        self.backend = backend if isinstance(backend, tokenizers.Tokenizer) and plain else None

    @functools.cached_property
    def chars_per_token(self) -> int | None:
        """max_chars_per_token of the tokenizer (read from its whole vocabulary: once)."""
        return max_chars_per_token(self.backend)

    def check_size(self, text: str | int, param: str) -> None:
        """A 400 for a text (or a number of characters) too long for `limit` tokens in any
        tokenization (no tokenizing)."""
        chars = text if isinstance(text, int) else len(text)
        if self.chars_per_token is None:
            return
        if chars > self.limit * self.chars_per_token:
            raise HTTPError(
                400,
                f"the text has {chars} characters: over the context length ({self.limit} "
                f"tokens) in any tokenization (a token is at most {self.chars_per_token} "
                "characters here)",
                param=param,
            )

    async def encode(self, text: str, param: str, *, add_special_tokens: bool = True) -> list[int]:
        """The text's token ids, tokenized in a worker thread; a 400 on `param` if they are
        more than `limit` (refused from its length alone where that is enough)."""
        if "chars_per_token" not in self.__dict__:  # the first text: found in a worker thread
            await anyio.to_thread.run_sync(lambda: self.chars_per_token)
        self.check_size(text, param)
        return await anyio.to_thread.run_sync(self._encode, text, param, add_special_tokens)

    def _encode(self, text: str, param: str, add_special_tokens: bool) -> list[int]:
        if self.backend is None:
            ids = list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
            self._check_count(len(ids), param)
            return ids
        encoding = self.backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0]
        self._check_count(len(encoding), param)
        return encoding.ids

    def _check_count(self, count: int, param: str) -> None:
        if count > self.limit:
            raise HTTPError(
                400,
                f"the text has {count} tokens: over the context length {self.limit}",
                param=param,
            )

    async def decode(self, ids: Sequence[int], vocab_size: int, param: str) -> str:
        """The ids' text (special tokens kept, as the tokenizer's decode gives it), made in a
        worker thread; a 400 on `param` for an id outside the vocabulary."""
        return await anyio.to_thread.run_sync(self._decode, ids, vocab_size, param)

    def _decode(self, ids: Sequence[int], vocab_size: int, param: str) -> str:
        if any(not 0 <= t < vocab_size for t in ids):
            raise HTTPError(400, "token ids must be in the vocabulary", param=param)
        cleans = getattr(self.tokenizer, "clean_up_tokenization_spaces", False)
        if self.backend is None or (cleans and type(self.backend.model).__name__ != "BPE"):
            return self.tokenizer.decode(list(ids))
        return self.backend.decode_batch([list(ids)], skip_special_tokens=False)[0]
