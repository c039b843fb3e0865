"""Characters a reader would not see as written: C0 and C1 controls, DEL, Unicode's
bidirectional controls, and lone surrogates. A terminal obeys the controls (an escape sequence
in a task name could clear the operator's screen, retitle the window or hide the line after
it), a right-to-left override makes text read backwards, and a lone surrogate (a JSON escape
such as `\\udc9b`) is no character at all: a strict stream cannot write it, and one with
Python's `surrogateescape` writes it as the raw byte it stands for (0x9b: a terminal's CSI).

`hidden(text)` says whether text holds any (what agents may name is refused with them);
`shown(text)` writes each as a `\\uXXXX` escape, which reads plainly in a table and is the same
character in a JSON string; `one_line(text)` also escapes line ends and tabs, for a value
inside one line of a table, which no value may end or split.
"""

from __future__ import annotations

from typing import Final

_BIDI: Final = (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
_SURROGATES: Final = range(0xD800, 0xE000)
_HIDDEN: Final = frozenset((*range(0x20), *range(0x7F, 0xA0), *_BIDI, *_SURROGATES))
_ONE_LINE: Final = {c: f"\\u{c:04x}" for c in _HIDDEN}
# Line ends and tabs are text's own.
_SHOWN: Final = {c: e for c, e in _ONE_LINE.items() if c not in {0x09, 0x0A}}


def hidden(text: str) -> bool:
    """Whether `text` holds a control character (C0, DEL, C1), a bidirectional control or a
    lone surrogate."""
    return not _HIDDEN.isdisjoint(map(ord, text))


def shown(text: str) -> str:
    """`text` with each control but line ends and tabs, and each lone surrogate, written as
    a `\\uXXXX` escape."""
    return text.translate(_SHOWN)


def one_line(text: str) -> str:
    """`text` as `shown` writes it, with line ends and tabs escaped too."""
    return text.translate(_ONE_LINE)
