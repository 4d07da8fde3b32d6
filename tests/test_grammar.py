"""Grammar-constrained decoding (pyllama4.grammar) with the demo model's real tokenizer.

Random walks sample from masked random logits until the constraint finishes: every output is in
the grammar's language, ends with the stop token, and the stop token was allowed exactly at the
prefixes that are complete sentences. The model's vocabulary is padded past the tokenizer's so
that padding ids are seen to be masked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import jsonschema
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from pyllama4.grammar import Constraint, GrammarCompiler, GrammarError, GrammarSpec, mask_logits

EOS = 2
PAD = 64  # model vocabulary = tokenizer vocabulary + PAD
MAX_STEPS = 300
SEEDS = range(5)


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    return AutoTokenizer.from_pretrained(demo_dir)


@pytest.fixture(scope="module")
def vocab(tokenizer) -> int:
    assert len(tokenizer) == 49152 and tokenizer.eos_token_id == EOS
    return len(tokenizer) + PAD


@pytest.fixture(scope="module")
def compiler(tokenizer, vocab) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, vocab, [EOS])


# ---- the languages, each with an independent recogniser ----------------------------------------


def schema_check(schema: dict) -> Callable[[str], bool]:
    def check(text: str) -> bool:
        try:
            jsonschema.validate(json.loads(text), schema)
        except (ValueError, jsonschema.ValidationError):
            return False
        return "\n" not in text  # one line: no whitespace beyond json.dumps' separators

    return check


def regex_check(pattern: str) -> Callable[[str], bool]:
    return lambda text: re.fullmatch(pattern, text) is not None


ARITHMETIC = r"""
root ::= expr
expr ::= term (("+" | "*") term)*
term ::= num | "(" expr ")"
num ::= [1-9] [0-9]?
"""
_FLAT = r"[1-9][0-9]?(?:[+*][1-9][0-9]?)*"


def arithmetic_check(text: str) -> bool:
    """Innermost parenthesised flat expressions become a number until none is left."""
    while (reduced := re.sub(rf"\(({_FLAT})\)", "1", text)) != text:
        text = reduced
    return re.fullmatch(_FLAT, text) is not None


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {
            "type": "object",
            "properties": {
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "verified": {"type": "boolean"},
            },
            "required": ["zip", "verified"],
            "additionalProperties": False,
        },
        "nickname": {"type": ["string", "null"], "maxLength": 4},
    },
    "required": ["name", "age", "address"],
    "additionalProperties": False,
}
COLOURS = {
    "type": "array",
    "items": {"enum": ["red", "green", "blue"]},
    "minItems": 2,
    "maxItems": 4,
}
MEASUREMENT = {
    "type": "object",
    "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
        "value": {"type": "number", "minimum": -1.5, "maximum": 2},
        "delta": {"type": "integer", "minimum": -20, "maximum": 300},
        "tags": {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": 3},
            "maxItems": 3,
        },
    },
    "required": ["code", "value", "delta", "tags"],
}
DATE = r"\d{4}-\d{2}-\d{2}"
EMAIL = r"[a-z]{1,8}(\.[a-z]{1,8})?@[a-z]{2,8}\.(com|org|net)"

CASES = {
    "schema-person": (GrammarSpec("json_schema", json.dumps(PERSON)), schema_check(PERSON)),
    "schema-enum-array": (GrammarSpec("json_schema", json.dumps(COLOURS)), schema_check(COLOURS)),
    "schema-numbers": (
        GrammarSpec("json_schema", json.dumps(MEASUREMENT)),
        schema_check(MEASUREMENT),
    ),
    "json-object": (GrammarSpec("json_object", ""), schema_check({"type": "object"})),
    "regex-date": (GrammarSpec("regex", DATE), regex_check(DATE)),
    "regex-email": (GrammarSpec("regex", EMAIL), regex_check(EMAIL)),
    "ebnf-arithmetic": (GrammarSpec("ebnf", ARITHMETIC), arithmetic_check),
    "ebnf-yes-no": (GrammarSpec("ebnf", 'root ::= "yes" | "no"'), lambda t: t in ("yes", "no")),
}


def closing_bias(tokenizer, vocab: int) -> np.ndarray:
    """+8 on the tokens that close a JSON string, object or array or a parenthesis: unbounded
    grammars (any JSON object) then end in tens of tokens rather than wandering for thousands."""
    bias = np.zeros(vocab, dtype=np.float32)
    for text in ('"', '"}', '"]', "}", "]", "}}", "]}", ")"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1:
            bias[ids[0]] = 8.0
    return bias


@pytest.mark.parametrize("case", CASES)
def test_random_walk_stays_in_the_language(case, tokenizer, vocab, compiler):
    spec, valid = CASES[case]
    compiled = compiler.compile(spec)
    bias = closing_bias(tokenizer, vocab)
    outputs = set()
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        constraint = compiler.constraint(compiled)
        tokens: list[int] = []
        while not constraint.finished:
            assert len(tokens) < MAX_STEPS, f"seed {seed}: {tokenizer.decode(tokens)!r}"
            logits = rng.standard_normal((1, vocab), dtype=np.float32) + bias
            mask_logits(torch.from_numpy(logits), [0], [constraint])  # in place, shared memory
            assert np.isneginf(logits[0, len(tokenizer) :]).all()
            text = tokenizer.decode(tokens)
            assert np.isfinite(logits[0, EOS]) == valid(text), f"seed {seed}: {text!r}"
            token = int(np.argmax(logits[0] + rng.gumbel(size=vocab)))  # a softmax sample
            assert constraint.accept(token)
            tokens.append(token)
        assert tokens[-1] == EOS and EOS not in tokens[:-1]
        text = tokenizer.decode(tokens[:-1])
        assert valid(text), f"seed {seed}: {text!r}"
        outputs.add(text)
    assert len(outputs) > 1 or case == "ebnf-yes-no"  # the walks explore the language


def test_mask_logits_batch(tokenizer, vocab, compiler):
    """Rows 0 and 2 constrained (a date, yes/no), row 1 free: row 1 is untouched, and the
    constrained rows keep exactly the tokens their grammars allow, in float32 and bf16 alike."""
    date = compiler.compile(GrammarSpec("regex", DATE))
    yes_no = compiler.compile(GrammarSpec("ebnf", 'root ::= "yes" | "no"'))
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    masked = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.to(dtype)
        mask_logits(x, [0, 2], [compiler.constraint(date), compiler.constraint(yes_no)])
        assert torch.equal(x[1], logits[1].to(dtype))
        assert torch.isneginf(x[[0, 2], len(tokenizer) :]).all()
        masked[dtype] = torch.isfinite(x)
    assert torch.equal(masked[torch.float32], masked[torch.bfloat16])
    date_ids = masked[torch.float32][0].nonzero().flatten().tolist()
    assert date_ids and all(tokenizer.decode([i]).isdigit() for i in date_ids)
    yes_no_ids = masked[torch.float32][2].nonzero().flatten().tolist()
    assert {tokenizer.decode([i]) for i in yes_no_ids} <= {"y", "ye", "yes", "n", "no"}
    assert {"yes", "no"} <= {tokenizer.decode([i]) for i in yes_no_ids}


def allowed(constraint: Constraint, vocab: int) -> set[int]:
    logits = np.zeros((1, vocab), dtype=np.float32)
    mask_logits(torch.from_numpy(logits), [0], [constraint])
    return set(np.flatnonzero(np.isfinite(logits[0])).tolist())


def test_stop_token_only_when_complete(tokenizer, vocab, compiler):
    constraint = compiler.constraint(compiler.compile(GrammarSpec("regex", DATE)))
    assert not constraint.accept(tokenizer.encode("x", add_special_tokens=False)[0])
    ids = tokenizer.encode("2024-01-15", add_special_tokens=False)
    for token in ids:
        assert EOS not in allowed(constraint, vocab)
        assert constraint.accept(token)
    assert allowed(constraint, vocab) == {EOS}
    assert not constraint.finished
    assert constraint.accept(EOS)
    assert constraint.finished


def test_special_tokens_never_allowed_in_text(tokenizer, vocab, compiler):
    """Inside a JSON string almost any token fits, but never <|im_start|> and its kin (their
    literal spelling would match) nor a padding id."""
    constraint = compiler.constraint(compiler.compile(GrammarSpec("json_object", "")))
    for token in tokenizer.encode('{"', add_special_tokens=False):
        assert constraint.accept(token)
    ids = allowed(constraint, vocab)
    assert len(ids) > 40000
    assert not ids & set(tokenizer.all_special_ids)
    assert max(ids) < len(tokenizer)


@pytest.mark.parametrize(
    "kind, source, problem",
    [
        ("json_schema", "{not json", "not valid JSON"),
        ("json_schema", '{"type": "nonsense"}', 'Unsupported type "nonsense"'),
        ("regex", "(", "parenthesis is not closed"),
        ("ebnf", "root ::= foo", 'Rule "foo" is not defined'),
        ("ebnf", 'root := "a"', "Unexpected character"),
    ],
)
def test_invalid_grammar_is_a_short_clear_error(kind, source, problem, compiler):
    with pytest.raises(GrammarError) as error:
        compiler.compile(GrammarSpec(kind, source))
    message = str(error.value)
    assert message.startswith(f"invalid {kind}: ") and problem in message
    assert len(message) <= 200 and ".cc:" not in message and "\n" not in message


def test_unknown_kind():
    with pytest.raises(GrammarError, match="unknown grammar kind 'xml'"):
        GrammarSpec("xml", "<a/>")


def test_compile_is_cached_by_spec(compiler):
    schema = json.dumps(MEASUREMENT)
    first = compiler.compile(GrammarSpec("json_schema", schema))
    assert compiler.compile(GrammarSpec("json_schema", schema)) is first
    assert compiler.compile(GrammarSpec("json_object", "")) is not first
