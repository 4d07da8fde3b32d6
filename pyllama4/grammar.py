"""Grammar-constrained decoding (structured output) on xgrammar.

Invariant: a constrained request samples only tokens its grammar allows next. mask_logits sets
every other logit of its row to -inf; ids past the tokenizer's vocabulary and the tokenizer's
special tokens are never allowed, and the stop tokens are allowed exactly when the text so far is
a complete sentence of the grammar, so once it is complete the stop tokens alone remain and the
request ends with one. Constraint.accept advances the request by each token it samples.

Grammars: OpenAI's response_format json_object (the JSON schema {"type": "object"}, as SGLang
maps it: any JSON object) and json_schema, SGLang's json_schema, regex (the whole output matches
it) and ebnf (xgrammar's GBNF dialect, root rule `root`). JSON schemas compile in xgrammar's
strict mode (its default and SGLang's: objects take only the listed properties unless the schema
allows more) with any_whitespace=False, unlike SGLang's default: the JSON is one line with
json.dumps' separators (", " and ": "), so a small model cannot loop on whitespace forever.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # imported on first use: `import xgrammar` takes seconds
    import xgrammar as xgr

_KINDS = ("json_object", "json_schema", "regex", "ebnf")
_ANY_OBJECT = '{"type": "object"}'
# xgrammar's errors start with "[time] file.cc:line: " and may add "Check failed: (...) is false: ".
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")
_MAX_MESSAGE = 200


class GrammarError(ValueError):
    """The grammar cannot be compiled; str(e) is a clear 400 message."""


@dataclass(frozen=True)
class GrammarSpec:
    """What a request constrains its output to (hashable: the compile cache's key)."""

    kind: str  # "json_object" | "json_schema" | "regex" | "ebnf"
    source: str  # the JSON schema as JSON text, the regex, the EBNF; "" for json_object

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise GrammarError(f"unknown grammar kind {self.kind!r}; expected one of {_KINDS}")


class Constraint:
    """One request's position in its grammar."""

    __slots__ = ("_matcher",)

    def __init__(self, matcher: xgr.GrammarMatcher) -> None:
        self._matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False if the grammar does not allow it (nothing moves)."""
        return self._matcher.accept_token(token_id)

    @property
    def finished(self) -> bool:
        """The grammar accepted a stop token: the request's output is complete."""
        return self._matcher.is_terminated()


class GrammarCompiler:
    """Compiles GrammarSpecs for one tokenizer and model vocabulary (an LRU cache of compiled
    grammars), and starts per-request Constraints on them. compile() may run in worker threads."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Collection[int],
        *,
        cache_size: int = 256,
    ) -> None:
        """tokenizer: a transformers tokenizer; vocab_size: the model's vocabulary (the logits'
        width, may exceed the tokenizer's); stop_token_ids: the engine's EOS ids."""
        import xgrammar as xgr

        stops = sorted(stop_token_ids)
        detected = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stops
        )
        # xgrammar never allows an empty token (nor the padding ids past the tokenizer's
        # vocabulary, which it leaves empty); emptying the special tokens keeps control tokens
        # such as <|im_start|> out of the output text, where their literal spelling would match.
        special = set(tokenizer.all_special_ids) | {
            i for i, t in tokenizer.added_tokens_decoder.items() if t.special
        }
        vocab = [""] * vocab_size
        for token, i in tokenizer.get_vocab().items():
            if i < vocab_size and i not in special:
                vocab[i] = token
        info = xgr.TokenizerInfo.from_vocab_and_metadata(vocab, detected.dump_metadata())
        # The cache here (keyed by spec, bounded in entries) replaces xgrammar's unbounded one.
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self._compile = functools.lru_cache(maxsize=cache_size)(self._compile_uncached)

    def compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        """The compiled grammar of spec (blocking: callers run it in a worker thread); cached.
        GrammarError when the schema, regex or EBNF is invalid or unsupported."""
        return self._compile(spec)

    def constraint(self, compiled: xgr.CompiledGrammar) -> Constraint:
        """A fresh per-request state at the start of the grammar."""
        import xgrammar as xgr

        return Constraint(xgr.GrammarMatcher(compiled))

    def _compile_uncached(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        try:
            if spec.kind == "json_object":
                return self._compiler.compile_json_schema(_ANY_OBJECT, any_whitespace=False)
            if spec.kind == "json_schema":
                json.loads(spec.source)  # Python's message for bad JSON is the clearer one
                return self._compiler.compile_json_schema(spec.source, any_whitespace=False)
            if spec.kind == "regex":
                return self._compiler.compile_regex(spec.source)
            return self._compiler.compile_grammar(spec.source)
        except json.JSONDecodeError as e:
            raise GrammarError(f"invalid json_schema: not valid JSON ({e})") from None
        except UnicodeDecodeError:  # xgrammar cut its error message inside a UTF-8 character
            raise GrammarError(f"invalid {spec.kind}") from None
        except RuntimeError as e:
            message = f"invalid {spec.kind}: " + _LOG_PREFIX.sub("", str(e).strip().split("\n")[0])
            if len(message) > _MAX_MESSAGE:
                message = message[: _MAX_MESSAGE - 3] + "..."
            raise GrammarError(message) from None


# Per thread (each engine's step loop is one): the CPU bitmask, sized for the largest batch seen
# (pinned when it feeds a GPU), and the event after its last copy to the GPU was enqueued.
_local = threading.local()


def _bitmask(rows: int, vocab_size: int, pin: bool) -> torch.Tensor:
    import xgrammar as xgr

    shape = xgr.get_bitmask_shape(rows, vocab_size)
    buffer: torch.Tensor | None = getattr(_local, "bitmask", None)
    if buffer is None or buffer.shape[0] < rows or buffer.shape[1] != shape[1]:
        buffer = torch.empty(shape, dtype=xgr.bitmask_dtype, pin_memory=pin)
        _local.bitmask = buffer
    return buffer[:rows]


def mask_logits(
    logits: torch.Tensor, rows: Sequence[int], constraints: Sequence[Constraint]
) -> None:
    """In place: for each i, logits[rows[i]] keeps only the tokens constraints[i] allows next
    (the others become -inf). logits: [S, vocab_size] float32/bf16 on the CPU or a CUDA/ROCm GPU;
    rows distinct; no constraint finished. The batch's bitmask is one reused CPU buffer, filled
    row by row by the matchers, copied to the GPU asynchronously, applied by xgrammar's kernel."""
    if not rows:
        return
    import xgrammar as xgr

    copied: torch.cuda.Event | None = getattr(_local, "copied", None)
    if copied is not None:
        copied.synchronize()  # the previous copy has read the buffer before it is refilled
    bitmask = _bitmask(logits.shape[0], logits.shape[1], pin=logits.is_cuda)
    for row, constraint in zip(rows, constraints, strict=True):
        constraint._matcher.fill_next_token_bitmask(bitmask, row)
    if logits.is_cuda:
        bitmask = bitmask.to(logits.device, non_blocking=True)
        _local.copied = torch.cuda.Event()
        _local.copied.record(torch.cuda.current_stream(logits.device))
    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=list(rows))
