"""Strict JSON: the one reading of a JSON text that every other reader would make too.

Python's `json.loads` is more forgiving than RFC 8259 and the readers on the other side of
keyproxy: on bytes it guesses UTF-16 or UTF-32, a repeated member name silently keeps the
last value, `NaN`, `Infinity` and numbers such as `1e400` become floats, and an escaped lone
surrogate becomes a string no UTF-8 reader can hold. Two readers that see one text
differently are how a checked value and a used value come apart (PRODUCT.md invariant 12),
so task tokens, workload tokens (keyproxy.jws) and MCP messages (keyproxy.mcp.jsonrpc) are
all read here.

`loads(data)` is the value, or a `ValueError` whose message says what was wrong without
quoting any value (a member name may be named: it is the shape, not the content).
`loads_text(text)` reads a text already decoded the same way, lone surrogates kept.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final


def loads(data: bytes) -> Any:
    """The JSON value in `data`: UTF-8 only (no byte order mark), no member given twice in
    any object, no NaN or Infinity, no number beyond a float, no lone surrogate."""
    try:
        # Strict UTF-8: refuses UTF-16/32, stray bytes and encoded surrogates.
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8") from None
    if text.startswith("\ufeff"):
        raise ValueError("starts with a byte order mark")
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except json.JSONDecodeError as exc:  # the hooks' own ValueErrors pass as they are
        raise ValueError(f"not JSON: {exc.msg} at {exc.pos}") from None
    if "\\u" in text:
        # Only an escape can produce a lone surrogate, which no UTF-8 text can carry.
        _refuse_lone_surrogates(value)
    return value


def loads_text(text: str) -> Any:
    """The JSON value of a text already decoded (a log line), read as `loads` reads it but for
    lone surrogates, which it keeps: a reader of what keyproxy wrote must not drop an event
    for a character it can escape on the way out (keyproxy.text)."""
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg} at {exc.pos}") from None


def dumps(value: Any) -> str:
    """`value` as compact JSON text that `loads` reads back: ValueError if it holds a text
    no UTF-8 reader can (a lone surrogate, as Python makes of bytes it could not decode)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("holds a text that is not valid Unicode") from None
    return text


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name, value in pairs:
        if name in found:
            raise ValueError(f"member {name[:64]!r} given twice (a repeated name)")
        found[name] = value
    return found


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("a number is out of range")
    return value


def _refuse_lone_surrogates(value: Any) -> None:
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("a string holds a lone surrogate") from None
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)


_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_unique, parse_constant=_no_constant, parse_float=_finite
)
