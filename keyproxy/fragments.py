"""Find a key's forms, and any run of FRAGMENT or more of their characters, in an answer.

The redacted set of a text is every window of FRAGMENT bytes that equals a window of one of the
key's encodings (a *fragment*), and every occurrence of a whole form; each maximal connected
stretch of that set (overlapping or touching) becomes one `[REDACTED]`. An upstream that quotes
the first 8 and last 4 characters of the key it was sent (`Incorrect API key provided:
skJa6H7Q****...BjJp`) has its 8 redacted; the 4 are left, as is any shorter run.

Finding them at C speed when there are none, the common case, is what most of this module is
about. Matching every window with one automaton scans at about 2 ns a byte (ahocorasick-rs
without a prefilter, 110-250 us for 64 KiB), more than 20 times a `bytes.find`. Instead a few
*anchors* are chosen, substrings of ANCHOR bytes such that every window contains at least one;
an Aho-Corasick automaton of at most TEDDY anchors, in leftmost-first mode, runs Teddy, a SIMD
prefilter, at memchr speed (5-9 us for 64 KiB, about one `bytes.find`). A body without an anchor
holds no fragment and no form. When anchors are found, only the windows near each one are looked
up in a set: a leftmost-first search reports matches that do not overlap, so an anchor it
skipped starts inside one it reported, and every window holding an anchor starts at most
FRAGMENT - 1 bytes before a reported match and inside it.

Texts are searched as their UTF-8 bytes, so for a key beyond ASCII "8 characters" is 8 bytes
(more is redacted, never less). Pure: no I/O.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Sequence
from typing import Final, TypeVar

from ahocorasick_rs import BytesAhoCorasick, Implementation, MatchKind

from keyproxy.secret import REDACTED

FRAGMENT: Final = 8  # the shortest run of a key's characters that is redacted
ANCHOR: Final = 4  # anchor length: a window holds one in every FRAGMENT - ANCHOR + 1 bytes
TEDDY: Final = 64  # most patterns the SIMD prefilter takes: more anchors, more automata
_REDACTED: Final = REDACTED.encode()
_PAIRS: Final = 4096  # bits in the bitmap of a window's first two bytes (a power of two)

Span = tuple[int, int]
_T = TypeVar("_T", str, bytes)


def encode(text: str) -> bytes:
    """The bytes a text is searched as (a lone surrogate too: never an error)."""
    return text.encode("utf-8", "surrogatepass")


class Matcher:
    """The compiled forms of one key version. Holds secret values: never log it.

    `sources` are the key's own encodings: their windows are fragments. `wholes` are every form
    that is replaced whole; one made only of fragments needs nothing more, the others (a query
    parameter's `format` text around the key, the username inside a basic-auth token) are also
    searched whole.
    """

    def __init__(self, sources: Iterable[bytes], wholes: Iterable[bytes] = ()) -> None:
        sources = sorted({s for s in sources if s}, key=len, reverse=True)
        windows = {s[i : i + FRAGMENT] for s in sources for i in range(len(s) - FRAGMENT + 1)}
        self._windows: frozenset[bytes] = frozenset(windows)
        # For the tail's prefix test: the windows in order; the bytes they start with, and a
        # 512-byte bitmap of their first two (hashed), which most tails fail.
        self._sorted: tuple[bytes, ...] = tuple(sorted(windows))
        self._alphabet = frozenset(bytes([b]) for w in windows for b in w)
        self._firsts = frozenset(w[0] for w in windows)
        pairs = bytearray(_PAIRS // 8)
        for w in windows:
            bit = _pair(w[0], w[1])
            pairs[bit >> 3] |= 1 << (bit & 7)
        self._pairs = bytes(pairs)
        wholes = sorted({w for w in (*sources, *wholes) if w}, key=len, reverse=True)
        self._wholes: tuple[bytes, ...] = tuple(w for w in wholes if not self._covered(w))
        anchors = _anchors(sources)
        anchored = set(anchors)
        for whole in self._wholes:
            if not any(whole[i : i + ANCHOR] in anchored for i in range(len(whole) - ANCHOR + 1)):
                anchors.append(whole)  # no fragment in it (too short for one): itself
        # The contiguous NFA: as fast as the others behind the prefilter, and the smallest
        # (about 1 KiB an anchor; the default DFA takes 2 to 4 times that, per route).
        self._filters = tuple(
            BytesAhoCorasick(
                anchors[i : i + TEDDY],
                matchkind=MatchKind.LeftmostFirst,
                implementation=Implementation.ContiguousNFA,
            )
            for i in range(0, len(anchors), TEDDY)
        )

    def __repr__(self) -> str:
        return f"Matcher({REDACTED})"

    def _covered(self, whole: bytes) -> bool:
        """Whether every byte of `whole` lies in one of its windows that is a fragment."""
        reached = 0
        for i in range(len(whole) - FRAGMENT + 1):
            if whole[i : i + FRAGMENT] in self._windows:
                if i > reached:
                    return False
                reached = i + FRAGMENT
        return reached == len(whole)

    def stretches(self, data: bytes, known: int = 0) -> list[Span]:
        """The redacted stretches of `data`, in order, merged; `[0, known)` counts as
        redacted (the part of an open stretch a stream held back)."""
        hits: list[tuple[int, int, int]] = []
        for automaton in self._filters:
            hits += automaton.find_matches_as_indexes(data)
        if not hits:
            return [(0, known)] if known else []
        if len(self._filters) > 1:
            hits.sort(key=lambda hit: hit[1])
        spans = [(0, known)] if known else []
        windows = self._windows
        last = len(data) - FRAGMENT  # the last offset a whole window starts at
        decided = 0  # every window starting before this offset is accounted for
        for _, start, end in hits:
            if end <= decided:
                continue  # inside a stretch already found
            for i in range(max(decided, start - FRAGMENT + 1), min(end, last + 1)):
                if i >= decided and data[i : i + FRAGMENT] in windows:
                    stop = self._extended(data, i + FRAGMENT)
                    spans.append((i, stop))
                    decided = stop + 1
            decided = max(decided, end)
        for whole in self._wholes:
            i = data.find(whole)
            while i != -1:
                spans.append((i, i + len(whole)))
                i = data.find(whole, i + 1)
        return merged(spans)

    def _extended(self, data: bytes, stop: int) -> int:
        """The end of the stretch that a window ending at `stop` begins: the window reaching
        farthest from those starting at or before the end so far, until none does. A key
        quoted whole costs one look-up per FRAGMENT bytes, not one per byte."""
        windows = self._windows
        last = len(data) - FRAGMENT
        while True:
            for i in range(min(stop, last), stop - FRAGMENT, -1):
                if data[i : i + FRAGMENT] in windows:
                    stop = i + FRAGMENT
                    break
            else:
                return stop

    def _begins_window(self, tail: bytes) -> bool:
        """Whether `tail` is how a window begins."""
        ordered = self._sorted
        at = bisect.bisect_left(ordered, tail)
        return at < len(ordered) and ordered[at].startswith(tail)

    def settled_clean(self, data: bytes) -> bool:
        """Whether `data` holds no stretch and no end more bytes could make one: what
        `undecided` and `stretches` together say of most chunks, found with one search (a
        stream's every SSE event pays for this). False says nothing: ask them."""
        if data[-1:] in self._alphabet or self._wholes:
            return False
        for automaton in self._filters:  # noqa: SIM110  # all() over a generator: +0.3 us an event
            if automaton.find_matches_as_indexes(data):
                return False
        return True

    def undecided(self, data: bytes) -> int:
        """Length of the longest end of `data` that more bytes could make part of a stretch:
        a proper prefix of a window (at most FRAGMENT - 1 bytes) or of a form searched whole."""
        longest = 0
        if data[-1:] in self._alphabet:  # an event ending in "\n\n" stops here
            pairs, end = self._pairs, len(data)
            for at in range(max(0, end - FRAGMENT + 1), end - 1):
                bit = (data[at] << 5 ^ data[at + 1]) & (_PAIRS - 1)  # _pair(), inlined
                # Most two bytes begin no window: a bit test, the search only if set.
                if pairs[bit >> 3] >> (bit & 7) & 1 and self._begins_window(data[at:]):
                    longest = end - at
                    break
            else:
                longest = 1 if data[-1] in self._firsts else 0
        size = len(data)
        for whole in self._wholes:
            first = whole[:1]
            i = data.find(first, max(0, size - len(whole) + 1))
            while i != -1 and size - i > longest:
                if whole.startswith(data[i:]):
                    longest = size - i
                    break
                i = data.find(first, i + 1)
        return longest


def _pair(first: int, second: int) -> int:
    """The bit of the first two bytes of a window in the tail test's bitmap."""
    return (first << 5 ^ second) & (_PAIRS - 1)


def _anchors(sources: Sequence[bytes]) -> list[bytes]:
    """Substrings of ANCHOR bytes such that every window of every source holds one.

    Greedy, on content: a window that holds an anchor already chosen (for any source) needs
    none; otherwise one of its substrings is taken, the last one that looks least like
    ordinary text (see `_texture`): the further right, the more of the windows after it it
    also serves. An anchor found in an answer costs a look at the windows around it, so a
    key's fixed prefix (`sk-bench-`) should not give an anchor that is a word ("ench").
    A source shorter than a window has no fragments: it is searched whole."""
    chosen: dict[bytes, None] = {}  # ordered, for a repeatable automaton
    inner = range(FRAGMENT - ANCHOR, -1, -1)  # offsets in a window, the last first
    for source in sources:
        for i in range(len(source) - FRAGMENT + 1):
            window = source[i : i + FRAGMENT]
            grams = [window[k : k + ANCHOR] for k in inner]
            if not any(gram in chosen for gram in grams):
                best = max(grams, key=lambda gram: min(_texture(gram), 2))  # first of the best
                chosen[best] = None
    return list(chosen)


def _texture(gram: bytes) -> int:
    """How often the kind of byte changes along `gram` (lower-case letter, upper-case,
    digit, other): random key text changes often, a word, a number or a word with a dash
    at most once."""
    kinds = [
        0 if 97 <= b <= 122 else 1 if 65 <= b <= 90 else 2 if 48 <= b <= 57 else 3 for b in gram
    ]
    return sum(a != b for a, b in itertools.pairwise(kinds))


def merged(spans: Iterable[Span]) -> list[Span]:
    """`spans` sorted, each group that overlaps or touches joined into one."""
    out: list[Span] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def redacted(text: _T, spans: Sequence[Span], mark: _T) -> _T:
    """`text` with each of `spans` (merged, in order) replaced by `mark`."""
    pieces: list[_T] = []
    pos = 0
    for start, end in spans:
        pieces += (text[pos:start], mark)
        pos = end
    pieces.append(text[pos:])
    return text[:0].join(pieces)


class Stream:
    """The stretches of a body that arrives in chunks, redacted as in the whole body.

    A chunk is sent at once up to the point that more bytes could still change: the undecided
    end (at most FRAGMENT - 1 bytes, or a prefix of a form searched whole) is held back. A
    stretch reaching that point is sent as `[REDACTED]` at once and stays *open*: whatever
    continues it in the next chunk is dropped, not marked again. So nothing of a stretch is
    held, however long it runs, and a body split anywhere comes out as it would whole.
    """

    __slots__ = ("_carry", "_known", "_matcher", "_open")

    def __init__(self, matcher: Matcher) -> None:
        self._matcher = matcher
        self._carry = b""  # the undecided end of what came so far
        self._known = 0  # how much of it is already redacted (by a window that began before)
        self._open = False  # whether what was sent ends inside a stretch

    def feed(self, chunk: bytes) -> bytes:
        """What can be sent now of what was held back and `chunk`."""
        if not self._carry and not self._open and self._matcher.settled_clean(chunk):
            return chunk  # the common case (an SSE event), in one search: the state stands
        data = self._carry + chunk if self._carry else chunk
        return self._send(data, len(data) - self._matcher.undecided(data))

    def flush(self) -> bytes:
        """The end of the body: what was held back, decided now."""
        data = self._carry
        return self._send(data, len(data)) if data else b""

    def _send(self, data: bytes, cut: int) -> bytes:
        """What of `data` goes out now: everything before `cut`, stretches redacted."""
        if cut == 0:  # nothing decided yet: the state stands
            self._carry = data
            return b""
        spans = self._matcher.stretches(data, self._known)
        if not spans:  # an open stretch could only go on from offset 0, which is decided
            self._carry, self._known, self._open = data[cut:], 0, False
            return data if cut == len(data) else data[:cut]
        pieces: list[bytes] = []
        pos = 0
        still_open = False
        for start, end in spans:
            if start >= cut:
                break  # decided with the next chunk
            pieces.append(data[pos:start])
            if not (self._open and start == 0):  # else the stretch sent before goes on
                pieces.append(_REDACTED)
            pos = end
            still_open = end >= cut
        if still_open:
            self._carry, self._known, self._open = data[cut:], pos - cut, True
        else:
            pieces.append(data[pos:cut])
            self._carry, self._known, self._open = data[cut:], 0, False
        return b"".join(pieces)
