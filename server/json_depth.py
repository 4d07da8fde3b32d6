"""How deeply JSON text nests, measured without parsing it (so without recursion).

Invariant: the depth is counted over the brackets outside string literals in C-speed passes
(bytes methods and numpy, a chunk at a time), never by recursion or a loop per character; a
body no deeper than MAX_JSON_DEPTH decodes without reaching Python's recursion limit.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

MAX_JSON_DEPTH = 64  # levels of {} / [] in a request body or in a JSON text inside it

_QUOTE, _COLON = ord('"'), ord(":")
_OPEN, _CLOSE = b"{[", b"}]"
_DROP = bytes(c for c in range(256) if c not in b'{}[]:"')
_CHUNK = 1 << 22


def too_deep(text: bytes | str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text nests more than `limit` levels."""
    data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    unescaped = _unescaped(data, limit)
    return unescaped is not None and _first_over(_skeleton(unescaped), limit) is not None


def too_deep_field(body: bytes, limit: int = MAX_JSON_DEPTH) -> str | None:
    """None if the body nests at most `limit` levels; else the top-level field holding the
    first part nested deeper ("" if that part is in no member of a top-level object)."""
    unescaped = _unescaped(body, limit)
    if unescaped is None:
        return None
    skeleton = _skeleton(unescaped)
    at = _first_over(skeleton, limit)
    if at is None:
        return None
    key = _top_level_key(skeleton[:at])
    if key is None:
        return ""
    start = _nth_quote(unescaped, 2 * key) + 1
    return unescaped[start : unescaped.index(b'"', start)].decode("utf-8", "replace")


def _unescaped(data: bytes, limit: int) -> bytes | None:
    """The text without escaped backslashes and quotes, so that every quote left delimits a
    string (None: too few brackets to nest deeper than `limit`)."""
    if data.count(b"{") + data.count(b"[") <= limit:
        return None
    return data.replace(b"\\\\", b"").replace(b'\\"', b"")


def _skeleton(unescaped: bytes) -> bytes:
    """The brackets and colons outside strings, and each string's opening quote, in order."""
    kept = unescaped.translate(None, _DROP)
    parts, open_string = [], 0
    for _, chars, _ in _chunks(kept, depth=False):
        quotes = chars == _QUOTE
        parity = np.cumsum(quotes, dtype=np.int32) + open_string
        inside = (parity & 1).astype(bool)  # at or after an opening quote, before its closing
        parts.append(chars[(inside & quotes) | ~(inside | quotes)].tobytes())
        open_string = int(parity[-1]) & 1
    return b"".join(parts)


def _chunks(
    skeleton: bytes, depth: bool = True
) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """(start, characters, depth after each character) of the skeleton, a chunk at a time."""
    base = 0
    for start in range(0, len(skeleton), _CHUNK):
        chars = np.frombuffer(skeleton, np.uint8, min(_CHUNK, len(skeleton) - start), start)
        if not depth:
            yield start, chars, None
            continue
        steps = np.zeros(len(chars), np.int32)
        for c in _OPEN:
            steps[chars == c] = 1
        for c in _CLOSE:
            steps[chars == c] = -1
        depths = np.cumsum(steps, dtype=np.int32) + base
        base = int(depths[-1])
        yield start, chars, depths


def _first_over(skeleton: bytes, limit: int) -> int | None:
    """The index of the first skeleton character nested deeper than `limit`, or None."""
    for start, _, depths in _chunks(skeleton):
        over = np.flatnonzero(depths > limit)
        if len(over):
            return start + int(over[0])
    return None


def _top_level_key(prefix: bytes) -> int | None:
    """The index (among all strings) of the key of the last top-level member that starts in
    `prefix`, or None if the text is not an object or no member starts there."""
    if not prefix.startswith(b"{"):
        return None
    key, strings = None, 0
    for _, chars, depths in _chunks(prefix):
        quote = chars == _QUOTE
        colons = np.flatnonzero((chars == _COLON) & (depths == 1))
        if len(colons):
            key = strings + int(np.count_nonzero(quote[: colons[-1]])) - 1
        strings += int(np.count_nonzero(quote))
    return key


def _nth_quote(data: bytes, n: int) -> int:
    """The index of the n-th (from 0) quote in data, which has more than n."""
    start = 0
    while (count := data.count(b'"', start, start + _CHUNK)) <= n:
        n -= count
        start += _CHUNK
    chars = np.frombuffer(data, np.uint8, min(_CHUNK, len(data) - start), start)
    return start + int(np.flatnonzero(chars == _QUOTE)[n])
