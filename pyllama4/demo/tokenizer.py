"""The demo GGUF's tokenizer and chat template as a transformers fast tokenizer.

Invariant: the saved tokenizer encodes like llama.cpp's: byte-level BPE with the "smollm"
pre-tokenizer (single digits split off first, then the GPT-2 regex, as in the original SmolLM2
tokenizer), the GGUF's control tokens special, and its chat template in both
tokenizer_config.json and the transformers 5 place, so transformers 4.x and 5.x load the same
tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer

_CONTROL = 3  # llama.cpp token type CONTROL: a special token such as <|im_start|>


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: every byte spelled as a printable character."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, codes, strict=True)}


def save_tokenizer(meta: dict[str, Any], hp: dict[str, Any], out_dir: Path) -> None:
    """Write the GGUF's tokenizer into `out_dir` as transformers' tokenizer files."""
    from transformers import PreTrainedTokenizerFast

    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    pre = meta.get("tokenizer.ggml.pre")
    if pre != "smollm":
        raise ValueError(f"expected the 'smollm' pre-tokenizer, the GGUF says {pre!r}")
    specials = [tokens[i] for i, kind in enumerate(types) if kind == _CONTROL]
    tk = _byte_level_bpe(tokens, meta["tokenizer.ggml.merges"], specials)

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(index)] if index is not None else None

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        pad_token=token("padding_token_id") or token("eos_token_id"),
        unk_token=token("unknown_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
        model_max_length=hp["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    )
    fast.save_pretrained(str(out_dir))
    # transformers 5 keeps the template in chat_template.jinja; tokenizer_config.json gets it too,
    # with a class name that transformers 4.x also knows, so older loaders see the same tokenizer.
    config_file = out_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = fast.chat_template
    config["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    config["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    if not (out_dir / "special_tokens_map.json").exists():
        special_map = {
            "bos_token": fast.bos_token,
            "eos_token": fast.eos_token,
            "pad_token": fast.pad_token,
            "unk_token": fast.unk_token,
            "additional_special_tokens": specials,
        }
        (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def _byte_level_bpe(tokens: list[str], merges: list[str], specials: list[str]) -> Tokenizer:
    """llama.cpp's "smollm" tokenizer as a `tokenizers.Tokenizer`: byte-level BPE over `tokens`
    (ids in order) and `merges` ("a b"), with `specials` as special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for index, token in enumerate(tokens):
        if not set(token) <= alphabet:  # written as raw text: spell it in the byte alphabet
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab[token] = index
    pairs = [tuple(m.split(" ")) for m in merges]

    tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    # llama.cpp "smollm": single digits split off first, then the GPT-2 regex.
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tk
