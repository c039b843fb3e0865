"""Characters a reader would not see as written: C0 and C1 controls, DEL, Unicode's
bidirectional controls, and lone surrogates. A terminal obeys the controls (an escape sequence
in a task name could clear the operator's screen, retitle the window or hide the line after
it), a right-to-left override makes text read backwards, and a lone surrogate (a JSON escape
such as `\\udc9b`) is no character at all: a strict stream cannot write it, and one with
Python's `surrogateescape` writes it as the raw byte it stands for (0x9b: a terminal's CSI).

`hidden(text)` says whether text holds any (what agents may name is refused with them);
`shown(text)` writes each as a `\\uXXXX` escape, which reads plainly in a table and is the same
character in a JSON string; `one_line(text)` also escapes line ends and tabs, for a value
inside one line of a table, which no value may end or split, and the characters that show
nothing (Unicode's format characters, such as a zero-width space, and line and paragraph
separators), so that two values that differ never print alike.
"""

from __future__ import annotations

import unicodedata
from typing import Final

_BIDI: Final = (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
_SURROGATES: Final = range(0xD800, 0xE000)
_HIDDEN: Final = frozenset((*range(0x20), *range(0x7F, 0xA0), *_BIDI, *_SURROGATES))
_ESCAPES: Final = {c: f"\\u{c:04x}" for c in _HIDDEN}
# Line ends and tabs are text's own.
_SHOWN: Final = {c: e for c, e in _ESCAPES.items() if c not in {0x09, 0x0A}}
_INVISIBLE: Final = frozenset({"Cf", "Zl", "Zp"})


class _OneLine(dict[int, str]):
    """str.translate's table for `one_line`: the escapes of `_HIDDEN`, and each other
    character's own escape or itself, by its category, found as it is met. Kept for the
    Basic Multilingual Plane only, so the table stays within 65,536 entries whatever a
    hostile text holds."""

    def __missing__(self, c: int) -> str:
        char = chr(c)
        if unicodedata.category(char) in _INVISIBLE:
            char = f"\\u{c:04x}" if c <= 0xFFFF else f"\\U{c:08x}"
        if c <= 0xFFFF:
            self[c] = char
        return char


_ONE_LINE: Final = _OneLine(_ESCAPES)


def hidden(text: str) -> bool:
    """Whether `text` holds a control character (C0, DEL, C1), a bidirectional control or a
    lone surrogate."""
    return not _HIDDEN.isdisjoint(map(ord, text))


def shown(text: str) -> str:
    """`text` with each control but line ends and tabs, and each lone surrogate, written as
    a `\\uXXXX` escape."""
    return text.translate(_SHOWN)


def one_line(text: str) -> str:
    """`text` as `shown` writes it, with line ends, tabs and invisible characters (format
    characters, line and paragraph separators) escaped too."""
    return text.translate(_ONE_LINE)
