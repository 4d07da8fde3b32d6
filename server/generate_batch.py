"""SGLang's /generate batches: a request split into one item per prompt, each with its own
sampling params, images, logprob options and output id.

Invariants: a request is one prompt (text: a string, input_ids: a list of ids) or a batch of k
prompts (text: a list of strings, input_ids: a list of id lists); every per-prompt field is one
value for all prompts or a list of exactly k (else a 400 naming the field); the outputs (k
prompts x n completions) number at most MAX_GENERATE_BATCH. Outputs are in SGLang's order:
prompt by prompt, each prompt's n completions together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyllama4.server import protocol as p
from pyllama4.server.asgi import HTTPError


@dataclass(frozen=True)
class LogprobOptions:
    """What a prompt's return_logprob asks for."""

    top: int  # top logprobs per position (0: the token's own logprob only)
    start: int  # the first prompt position in input_token_logprobs (-1: the last one)
    text: bool  # each token's text in the triples (else null)


@dataclass(frozen=True)
class GenerateItem:
    """One prompt of a /generate request."""

    text: str | None
    input_ids: list[int] | None
    images: list[str]
    params: p.NativeSamplingParams
    logprobs: LogprobOptions | None  # None: no logprobs
    rid: str | None  # the output's meta_info.id (None: a fresh one)


@dataclass(frozen=True)
class GenerateBatch:
    items: list[GenerateItem]
    listed: bool  # the answer is a list (a batch, or n > 1), each streamed event has "index"
    prompt_field: str  # "text" or "input_ids": where the prompts came from

    def offsets(self) -> list[int]:
        """The index of each item's first output in the answer's list."""
        starts, total = [], 0
        for item in self.items:
            starts.append(total)
            total += item.params.n
        return starts


def split(req: p.GenerateRequest) -> GenerateBatch:
    """The request's prompts as items, in order; a 400 naming the field for a bad shape."""
    if (req.text is None) == (req.input_ids is None):
        raise HTTPError(400, "give exactly one of text and input_ids", param="text")
    texts, ids, batch = _prompts(req)
    k = len(texts) if texts is not None else len(ids or [])
    params = _each(req.sampling_params or p.NativeSamplingParams(), k, "sampling_params")
    field = "text" if texts is not None else "input_ids"
    total = sum(sp.n for sp in params)
    if total > p.MAX_GENERATE_BATCH:
        raise HTTPError(
            400,
            f"{k} prompts x n = {total} outputs; at most {p.MAX_GENERATE_BATCH} in one request",
            param=field,
        )
    wants = _each(req.return_logprob, k, "return_logprob")
    tops = _each(req.top_logprobs_num, k, "top_logprobs_num")
    starts = _each(req.logprob_start_len, k, "logprob_start_len")
    items = [
        GenerateItem(
            text=None if texts is None else texts[i],
            input_ids=None if ids is None else ids[i],
            images=images,
            params=params[i],
            logprobs=LogprobOptions(tops[i], starts[i], req.return_text_in_logprobs)
            if wants[i]
            else None,
            rid=rid,
        )
        for i, (images, rid) in enumerate(
            zip(_images(req.image_data, k, batch), _rids(req.rid, k, batch), strict=True)
        )
    ]
    return GenerateBatch(items, batch or any(sp.n > 1 for sp in params), field)


def _prompts(req: p.GenerateRequest) -> tuple[list[str] | None, list[list[int]] | None, bool]:
    """(texts, id lists, whether the request is a batch)."""
    if req.text is not None:
        return ([req.text], None, False) if isinstance(req.text, str) else (req.text, None, True)
    ids = req.input_ids or []
    if all(isinstance(t, int) for t in ids):
        return None, [list(ids)], False  # type: ignore[list-item]
    if all(isinstance(t, list) for t in ids):
        return None, list(ids), True  # type: ignore[arg-type]
    message = "input_ids is a list of token ids or a list of such lists, not a mix"
    raise HTTPError(400, message, param="input_ids")


def _each(value: Any, k: int, param: str) -> list[Any]:
    """A per-prompt field as a list of k: one value for all, or exactly one per prompt."""
    if not isinstance(value, list):
        return [value] * k
    if len(value) != k:
        raise HTTPError(400, f"{param} has {len(value)} entries for {k} prompts", param=param)
    return value


def _images(data: p.Images | None, k: int, batch: bool) -> list[list[str]]:
    """Each prompt's image sources: one prompt's list, or per prompt in a batch."""
    if data is None:
        return [[] for _ in range(k)]
    if isinstance(data, str):
        return [[data] for _ in range(k)]
    if not batch:
        if any(not isinstance(d, str) for d in data):
            raise HTTPError(400, "image_data of one prompt is a list of images", param="image_data")
        return [list(data)]  # type: ignore[arg-type]
    return [[d] if isinstance(d, str) else list(d) for d in _each(data, k, "image_data")]


def _rids(rid: str | list[str] | None, k: int, batch: bool) -> list[str | None]:
    """Each prompt's output id: as given, or numbered from one id given for a batch."""
    if rid is None:
        return [None] * k
    if isinstance(rid, str):
        return [f"{rid}_{i}" for i in range(k)] if batch else [rid]
    return _each(rid, k, "rid")
