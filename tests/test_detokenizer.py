"""IncrementalDetokenizer and StopStrings against the demo model's real byte-level BPE tokenizer.

The detokenizer's oracle is `tokenizer.decode(output_ids, skip_special_tokens=...)`: streamed text
must equal it whenever it does not end in U+FFFD, must always be a prefix of the final decode, and
must equal the final decode after finish(). The stop-string oracle is the whole text cut at the
stop string that is complete earliest.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyllama4.detokenizer import (
    MAX_BOUNDARY_SCAN,
    MAX_PENDING,
    PREFIX_WINDOW,
    IncrementalDetokenizer,
    StopAutomaton,
    StopStrings,
    compile_stops,
)

FFFD = "\ufffd"
IM_START, IM_END = 1, 2

TEXTS = [
    "Hello, world!",
    " leading space",
    "  two leading spaces and   runs    of spaces  ",
    "line one\nline two\n\n\nafter blank lines\n",
    "digits 0123456789 and 3.14159, 1e-9, 2024-06-01",
    "thumbs 👍🏽 up 👍 and a family 👨‍👩‍👧",
    "你好世界，你好！",
    "café résumé naïve é",
    "مرحبا بالعالم",
    "def f(x):\n\treturn x  # tab\n\t\tif x:\n\t\t\tpass\n",
    "mixed: a👍b你c é\td\n  e",
    "a literal replacement char \ufffd in valid text \ufffd",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are written in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@pytest.fixture(scope="module")
def tok(demo_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_dir)


@pytest.fixture(scope="module")
def byte_tokens(tok) -> dict[int, int]:
    """byte value -> id of the vocabulary token that is exactly that one byte."""
    vocab = tok.get_vocab()
    out = {}
    for b, ch in _bytes_to_unicode().items():
        if ch in vocab:
            out[b] = vocab[ch]
    assert len(out) > 200
    return out


@pytest.fixture(scope="module")
def prompt_ids(tok) -> list[int]:
    chat = [{"role": "user", "content": "Hi"}]
    ids = encode(tok, tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
    assert ids[-3:] == tok.encode("<|im_start|>assistant\n", add_special_tokens=False)[-3:]
    return ids


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def stream(tok, prompt, out_ids, skip=True, chunks=None):
    """Push out_ids (in chunks of the given sizes, default one at a time), checking the invariants
    after every push; return (the pushed pieces, what finish() returned)."""
    final = tok.decode(out_ids, skip_special_tokens=skip)
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    pieces = []
    sizes = chunks or [1] * len(out_ids)
    pos = 0
    for size in sizes:
        piece = detok.push(out_ids[pos : pos + size])
        pos += size
        pieces.append(piece)
        emitted = "".join(pieces)
        assert detok.text == emitted
        assert final.startswith(emitted), "emitted text changed later"
        now = tok.decode(out_ids[:pos], skip_special_tokens=skip)
        if not now.endswith(FFFD):
            assert emitted == now
    assert pos == len(out_ids)
    rest = detok.finish()
    assert "".join(pieces) + rest == final
    assert detok.text == final
    assert detok.finish() == ""
    return pieces, rest


# ---------------------------------------------------------------------------------------------
# IncrementalDetokenizer


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("with_prompt", [True, False])
def test_one_token_at_a_time_equals_decode(tok, prompt_ids, text, with_prompt):
    ids = encode(tok, text)
    assert tok.decode(ids) == text  # byte-level BPE round-trips
    pieces, rest = stream(tok, prompt_ids if with_prompt else [], ids)
    # A decode that ends in U+FFFD is held back, even a literal one: finish() releases it.
    assert "".join(pieces) + rest == text
    assert rest == (FFFD if text.endswith(FFFD) else "")
    if FFFD not in text:
        assert not any(FFFD in p for p in pieces)


def test_multibyte_characters_are_held_until_complete(tok, byte_tokens):
    thumbs = [byte_tokens[b] for b in "👍".encode()]
    detok = IncrementalDetokenizer(tok, encode(tok, "Say:"))
    assert detok.push(encode(tok, " ok")) == " ok"
    assert [detok.push([t]) for t in thumbs] == ["", "", "", "👍"]
    assert detok.push(encode(tok, "!")) == "!"
    assert detok.text == " ok👍!"


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_follow_decode(tok, prompt_ids, byte_tokens, skip):
    out = encode(tok, "Sure, 你好 👍🏽.") + [IM_END] + encode(tok, "\n") + [IM_START]
    out += encode(tok, "assistant\n more") + [IM_END, IM_END]
    pieces, rest = stream(tok, prompt_ids, out, skip=skip)
    text = "".join(pieces) + rest
    assert ("<|im_end|>" in text) == (not skip)
    assert text == tok.decode(out, skip_special_tokens=skip)
    # A special token inside a character: skipped, the bytes around it join (one character);
    # kept, it splits them (each side is invalid UTF-8). Both are what decode gives.
    f0, rest_bytes = [byte_tokens[b] for b in "👍".encode()[:1]], "👍".encode()[1:]
    out = encode(tok, "x") + f0 + [IM_END] + [byte_tokens[b] for b in rest_bytes]
    pieces, rest = stream(tok, [], out, skip=skip)
    assert "".join(pieces) + rest == ("x👍" if skip else "x\ufffd<|im_end|>\ufffd\ufffd\ufffd")


@pytest.mark.parametrize("skip", [True, False])
def test_long_runs_of_special_tokens_inside_a_character(tok, byte_tokens, skip):
    """More pending tokens than MAX_PENDING while a character is incomplete: skipped special
    tokens between its bytes must neither flush the partial character nor grow the window."""
    b = [byte_tokens[x] for x in "👍".encode()]
    out = encode(tok, "a") + b[:1] + [IM_END] * 20 + b[1:2] + [IM_START] * 20 + b[2:] + [IM_END]
    pieces, rest = stream(tok, encode(tok, "q"), out, skip=skip)
    if skip:
        assert "".join(pieces) == "a👍" and FFFD not in "".join(pieces)
    assert "".join(pieces) + rest == tok.decode(out, skip_special_tokens=skip)


def test_chunked_pushes_give_the_same_text(tok, prompt_ids):
    rng = random.Random(0)
    text = "\n".join(TEXTS) + " end"
    ids = encode(tok, text)
    for _ in range(20):
        sizes = []
        while sum(sizes) < len(ids):
            sizes.append(min(rng.randint(1, 12), len(ids) - sum(sizes)))
        pieces, rest = stream(tok, prompt_ids, ids, chunks=sizes)
        assert "".join(pieces) == text and rest == ""
    pieces, rest = stream(tok, prompt_ids, ids, chunks=[len(ids)])
    assert pieces == [text]


@pytest.mark.parametrize("skip", [True, False])
def test_random_token_ids_never_change_emitted_text(tok, byte_tokens, skip):
    """Random ids: whole tokens, single bytes (lone lead and continuation bytes, partial
    characters, invalid sequences) and special tokens."""
    rng = random.Random(1 + skip)
    vocab_size = len(tok)
    singles = sorted(byte_tokens.values())
    lead_or_cont = [byte_tokens[b] for b in byte_tokens if b >= 0x80]
    for _ in range(150):
        out = []
        for _ in range(rng.randint(1, 40)):
            r = rng.random()
            if r < 0.4:
                out.append(rng.choice(lead_or_cont))
            elif r < 0.5:
                out.append(rng.choice(singles))
            elif r < 0.6:
                out.append(rng.randrange(17))  # special tokens
            else:
                out.append(rng.randrange(vocab_size))
        sizes = [] if rng.random() < 0.5 else None
        if sizes is not None:
            while sum(sizes) < len(out):
                sizes.append(min(rng.randint(1, 5), len(out) - sum(sizes)))
        stream(tok, [] if rng.random() < 0.3 else encode(tok, "prompt é"), out, skip, sizes)


def test_window_stays_bounded(tok, byte_tokens):
    """Each decode covers a bounded window, also through long runs of invalid bytes and literal
    U+FFFD characters (which can end a decode forever), and the text keeps coming out."""
    calls = []

    class CountingTokenizer:  # the real tokenizer, recording how many ids each decode gets
        def decode(self, ids, skip_special_tokens):
            calls.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    cont, lead = byte_tokens[0x80], byte_tokens[0xF0]
    literal = encode(tok, "\ufffd")
    out = encode(tok, " ".join(TEXTS * 4))
    out += [cont] * 300 + [lead] * 300 + literal * 100 + [IM_END] * 50 + encode(tok, "end👍")
    detok = IncrementalDetokenizer(CountingTokenizer(), encode(tok, "prompt"))
    longest_hold = held = 0
    for t in out:
        held = 0 if detok.push([t]) else held + 1
        longest_hold = max(longest_hold, held)
        assert len(detok._ids) <= PREFIX_WINDOW + MAX_BOUNDARY_SCAN + 1
    detok.finish()
    assert detok.text == tok.decode(out, skip_special_tokens=True)
    assert max(calls) <= PREFIX_WINDOW + MAX_BOUNDARY_SCAN + 1
    assert longest_hold <= MAX_BOUNDARY_SCAN + 1 + 50  # the 50 skipped <|im_end|> emit nothing
    assert len(calls) < 10 * len(out)
    assert MAX_PENDING < MAX_BOUNDARY_SCAN


def test_push_after_finish_raises(tok):
    detok = IncrementalDetokenizer(tok, [])
    assert detok.push([]) == ""
    assert detok.finish() == ""
    with pytest.raises(RuntimeError):
        detok.push(encode(tok, "x"))


def test_detokenizer_with_stop_strings_across_tokens(tok, prompt_ids):
    """The two together, as the engine uses them: the stop string spans token boundaries."""
    text = "The answer is 42.\nUser: what about 43?\nUser: bye"
    detok = IncrementalDetokenizer(tok, prompt_ids)
    stops = StopStrings(["\nUser:", "never"])
    shown = []
    for t in encode(tok, text):
        piece, stopped = stops.push(detok.push([t]))
        shown.append(piece)
        assert "\n" not in "".join(shown)
        if stopped:
            break
    assert stopped and stops.matched == "\nUser:"
    assert "".join(shown) == "The answer is 42."


# ---------------------------------------------------------------------------------------------
# StopStrings


def reference(text: str, stop: list[str], include: bool) -> tuple[str, str | None]:
    """The text cut at the stop string complete earliest (longest among those ending there)."""
    best = None
    for s in stop:
        i = text.find(s)
        if i >= 0 and (
            best is None or (i + len(s), -len(s)) < (best[0] + len(best[1]), -len(best[1]))
        ):
            best = (i, s)
    if best is None:
        return text, None
    i, s = best
    return text[: i + len(s)] if include else text[:i], s


def longest_held(text: str, stop: list[str]) -> int:
    return max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def run_stops(pieces: list[str], stop: list[str], include: bool = False):
    """Push the pieces, checking the hold-back invariant after each; return (output, matched)."""
    final, matched = reference("".join(pieces), stop, include)
    ss = StopStrings(stop, include_stop_str_in_output=include)
    emitted, seen = "", ""
    for piece in pieces:
        out, stopped = ss.push(piece)
        seen += piece
        emitted += out
        assert final.startswith(emitted)
        if stopped:
            assert emitted == final and ss.matched == matched
            assert ss.push("more text") == ("", True) and ss.finish() == ""
            return emitted, ss.matched
        # Exactly the longest suffix that could still become a stop string is held back.
        assert len(seen) - len(emitted) == longest_held(seen, stop)
        assert seen.startswith(emitted)
    emitted += ss.finish()
    assert emitted == final and matched is None and ss.matched is None
    return emitted, None


def test_stop_inside_one_push():
    assert run_stops(["Hello STOP world"], ["STOP"]) == ("Hello ", "STOP")
    assert run_stops(["Hello STOP world"], ["STOP"], include=True) == ("Hello STOP", "STOP")
    ss = StopStrings(["STOP"])
    assert ss.push("Hello STOP world STOP") == ("Hello ", True)


def test_stop_spanning_two_pushes():
    ss = StopStrings(["STOP"])
    assert ss.push("Hello ST") == ("Hello ", False)
    assert ss.push("OP world") == ("", True)
    ss = StopStrings(["STOP"], include_stop_str_in_output=True)
    assert ss.push("Hello ST") == ("Hello ", False)
    assert ss.push("OP world") == ("STOP", True)


def test_stop_spanning_many_single_character_pushes():
    text = "one two <|stop here|> three"
    assert run_stops(list(text), ["<|stop here|>"]) == ("one two ", "<|stop here|>")
    assert run_stops(list(text), ["<|stop here|>"], True) == (
        "one two <|stop here|>",
        "<|stop here|>",
    )


def test_earliest_stop_wins():
    assert run_stops(["Hello world"], ["world", "lo"]) == ("Hel", "lo")
    assert run_stops(list("Hello world"), ["world", "lo"]) == ("Hel", "lo")
    # The stop complete earliest wins, even if another began before it: "b" ends before "abc".
    for pieces in (["xabcd"], list("xabcd"), ["xa", "bcd"]):
        assert run_stops(pieces, ["abc", "b"]) == ("xa", "b")


def test_overlapping_prefixes():
    for pieces in (["xabcd"], list("xabcd"), ["xa", "bc"]):
        assert run_stops(pieces, ["ab", "abc"]) == ("x", "ab")
        assert run_stops(pieces, ["abc", "ab"], include=True) == ("xab", "ab")
    assert run_stops(list("xaxbc"), ["ab", "abc"]) == ("xaxbc", None)
    # A stop that ends where a longer one ends: the longer one (which began earlier) is cut.
    assert run_stops(list("xabc"), ["bc", "abc"]) == ("x", "abc")
    # Partial matches that restart inside themselves (the automaton's failure links).
    assert run_stops(list("aaab!"), ["aab"]) == ("a", "aab")
    assert run_stops(list("abababc"), ["ababc"]) == ("ab", "ababc")


def test_holdback_is_released_by_finish():
    ss = StopStrings(["STOP", "\n\n"])
    assert ss.push("Hello ST") == ("Hello ", False)
    assert ss.push("O") == ("", False)
    assert ss.push("p!") == ("STOp!", False)  # not a stop after all: released at once
    assert ss.push(" end\n") == (" end", False)
    assert ss.finish() == "\n"
    assert ss.finish() == ""
    assert not ss.stopped and ss.matched is None


def test_no_stop_strings_pass_through():
    ss = StopStrings([])
    assert ss.push("any text\n\n") == ("any text\n\n", False)
    assert ss.push("") == ("", False)
    assert ss.finish() == ""


def test_invalid_stop_strings():
    with pytest.raises(ValueError):
        StopStrings(["ok", ""])
    with pytest.raises(TypeError):
        StopStrings("STOP")


def test_completions_share_one_automaton_each_with_its_own_state():
    automaton = StopAutomaton(["STOP", "\n\n"])
    a, b = StopStrings(automaton), StopStrings(automaton, include_stop_str_in_output=True)
    assert a.push("one ST") == ("one ", False)
    assert b.push("two STO") == ("two ", False)
    assert a.push("OP") == ("", True) and a.matched == "STOP"
    assert b.push("x\n") == ("STOx", False) and not b.stopped
    assert b.push("\n") == ("\n\n", True) and b.matched == "\n\n"
    assert StopStrings(automaton).push("fresh STOP") == ("fresh ", True)
    with pytest.raises(AttributeError):
        automaton.goto.append({})  # a tuple: nodes are never added after compiling


def test_compiled_stops_are_cached_and_immutable():
    assert compile_stops(("STOP", "x")) is compile_stops(("STOP", "x"))
    automaton = compile_stops(("ab", "abc"))
    assert isinstance(automaton.goto, tuple) and isinstance(automaton.fail, tuple)
    assert automaton.stop == ("ab", "abc")
    assert run_stops(list("xabcd"), list(automaton.stop)) == ("x", "ab")
    with pytest.raises(ValueError):
        StopAutomaton(["ok", ""])


@st.composite
def stop_cases(draw, alphabet):
    text = draw(st.text(alphabet=alphabet, max_size=60))
    stop = draw(st.lists(st.text(alphabet=alphabet, min_size=1, max_size=5), max_size=4))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    return pieces, stop, draw(st.booleans())


@settings(max_examples=400, deadline=None)
@given(stop_cases("ab c"))
def test_stop_strings_property_small_alphabet(case):
    pieces, stop, include = case
    run_stops(pieces, stop, include)


@settings(max_examples=200, deadline=None)
@given(stop_cases(st.characters(codec="utf-8")))
def test_stop_strings_property_any_text(case):
    pieces, stop, include = case
    run_stops(pieces, stop, include)
