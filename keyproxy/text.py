"""Characters a reader would not see as written: C0 and C1 controls, DEL, and Unicode's
bidirectional controls. A terminal obeys them (an escape sequence in a task name could clear
the operator's screen, retitle the window or hide the line after it) and a right-to-left
override makes text read backwards.

`hidden(text)` says whether text holds any (what agents may name is refused with them);
`shown(text)` writes each as a `\\uXXXX` escape, which reads plainly in a table and is the same
character in a JSON string.
"""

from __future__ import annotations

from typing import Final

_BIDI: Final = (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
_HIDDEN: Final = frozenset((*range(0x20), *range(0x7F, 0xA0), *_BIDI))
# Line ends and tabs are text's own.
_SHOWN: Final = {c: f"\\u{c:04x}" for c in _HIDDEN - {0x09, 0x0A}}


def hidden(text: str) -> bool:
    """Whether `text` holds a control character (C0, DEL, C1) or a bidirectional control."""
    return not _HIDDEN.isdisjoint(map(ord, text))


def shown(text: str) -> str:
    """`text` with each control but line ends and tabs written as a `\\uXXXX` escape."""
    return text.translate(_SHOWN)
