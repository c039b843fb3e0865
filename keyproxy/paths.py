"""Upstream paths, normalised once and checked as the upstream will see them (invariant 5).

    normalise(raw) -> segments    the caller's still-encoded path, decoded into segments, or
                                  BadRequest("bad_path") if it is in any way ambiguous
    encode(segments) -> path      the exact path sent upstream for those segments
    normalise_encoded(raw)        both at once, with a fast path for paths without escapes

Anything an upstream might read differently from us is refused, never repaired: `.` and `..`
(also encoded, also as `..;param` or Unicode look-alikes that NFKC folds to dots), encoded `/`
or `\\`, backslashes, control characters, empty segments, malformed or double
percent-encoding, and bytes that are not UTF-8. Policy then matches the decoded segments, and
`encode` turns exactly those segments back into the wire form, so what was checked is what is
sent. Pure: no I/O.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

from keyproxy.errors import BadRequest

# Where the proxy serves routes: /r/<route>/<path> (keyproxy.proxy; agents' base URLs too).
ROUTE_PREFIX: Final = "/r/"

# RFC 3986 pchar minus pct-encoded: the characters that may appear unencoded in a segment.
_PCHAR = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@"
)
# What the raw path may contain at all: pchar, "%" introducing an escape, and "/".
_RAW = _PCHAR | {"%", "/"}
_HEX = frozenset("0123456789abcdefABCDEF")
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
# The common case: a path with no escape, only pchar and "/". Its segments are the text
# between slashes (ASCII is unchanged by NFKC and holds no control character or backslash),
# and the path is already in the form `encode` would give.
_PLAIN = re.compile(r"(?:/[A-Za-z0-9\-._~!$&'()*+,;=:@]*)+")


def normalise_encoded(raw: str) -> tuple[tuple[str, ...], str]:
    """`normalise(raw)` and `encode` of the result: the segments policy checks and the exact
    path sent upstream for them."""
    if raw in ("", "/"):
        return (), "/"
    if _PLAIN.fullmatch(raw) is not None:
        parts = raw[1:].split("/")
        if "" in parts[:-1]:
            raise _bad("empty segment ('//')")
        for part in parts:
            if part and not part.split(";", 1)[0].strip("."):
                raise _bad("dot segment")
        return tuple(parts), raw
    segments = normalise(raw)
    return segments, encode(segments)


def normalise(raw: str) -> tuple[str, ...]:
    """Decode the caller's path into segments, or raise BadRequest("bad_path").

    `raw` is the path after `/r/<route>` exactly as sent (no query string); "" means "/".
    "/" gives (), "/a/b" gives ("a", "b"), and a trailing slash gives a last segment "".
    """
    if raw in ("", "/"):
        return ()
    if not raw.startswith("/"):
        raise _bad("must start with '/'")
    if bad := next((c for c in raw if c not in _RAW), None):
        raise _bad(_describe(bad))
    parts = raw[1:].split("/")
    if "" in parts[:-1]:
        raise _bad("empty segment ('//')")
    return tuple(_segment(part) for part in parts)


def encode(segments: tuple[str, ...]) -> str:
    """Percent-encode segments from `normalise` into the path sent upstream.

    Characters outside RFC 3986 pchar are UTF-8 percent-encoded with upper-case hex, so
    `normalise(encode(s)) == s`. Raises ValueError for segments `normalise` would never
    produce (an empty or dot segment, "/" inside a segment, ...): sending those upstream would
    break the guarantee that the path checked is the path sent.
    """
    path = "/" + "/".join(_quote(segment) for segment in segments)
    try:
        same = normalise(path) == segments
    except BadRequest:
        same = False
    if not same:
        raise ValueError("segments were not produced by normalise()")
    return path


def _segment(raw: str) -> str:
    """Decode one raw segment and refuse it if any reading of it is ambiguous."""
    data = bytearray()
    i = 0
    while i < len(raw):
        char = raw[i]
        if char != "%":
            data += char.encode("ascii")  # _RAW is ASCII-only, checked by the caller
            i += 1
            continue
        escape = raw[i + 1 : i + 3]
        if len(escape) != 2 or not set(escape) <= _HEX:
            raise _bad("invalid percent-encoding")
        byte = int(escape, 16)
        if byte in (0x2F, 0x5C):
            raise _bad("encoded '/' or '\\'")
        data.append(byte)
        i += 3
    try:
        text = data.decode("utf-8")  # strict: also refuses overlong forms such as %c0%ae
    except UnicodeDecodeError:
        raise _bad("not UTF-8 after decoding") from None
    _refuse_ambiguous(text)
    # SECURITY: an upstream (or a framework in front of it) that applies Unicode
    # compatibility folding would read fullwidth dots and slashes as "." and "/".
    folded = unicodedata.normalize("NFKC", text)
    if folded != text:
        if "/" in folded or "\\" in folded:
            raise _bad("character that folds to '/' or '\\'")
        _refuse_ambiguous(folded)
    return text


def _refuse_ambiguous(text: str) -> None:
    if any(unicodedata.category(c) == "Cc" for c in text):
        raise _bad("control character")
    if "\\" in text:
        raise _bad("backslash")
    if _ESCAPE.search(text):
        # SECURITY: double encoding; an upstream that decodes twice would see an escape.
        raise _bad("double percent-encoding")
    # SECURITY: ".", "..", "..." and "..;x" (Java servlet containers drop ";params" and then
    # resolve the dots), and ";x", which those containers turn into an empty segment.
    head = text.split(";", 1)[0]
    if text and not head.strip("."):
        raise _bad("dot segment")


def _quote(segment: str) -> str:
    return "".join(
        char if char in _PCHAR else "".join(f"%{b:02X}" for b in char.encode("utf-8"))
        for char in segment
    )


def _describe(char: str) -> str:
    if char == "\\":
        return "backslash"
    if unicodedata.category(char) == "Cc":
        return "control character"
    return "character that must be percent-encoded"


def _bad(why: str) -> BadRequest:
    return BadRequest("bad_path", f"path refused: {why}")
