"""The names an MCP grant holds (tools, prompts, resource URIs, methods), checked exactly.

    name_problem(name) / uri_problem(uri) -> str | None     why it cannot be compared exactly
    names(what, values, error) / uris(values, error) / server_requests(values, error)

Foundation: the configuration checks the grants it reads with these, as the pure MCP core
does for task-token scopes. No I/O, no keyproxy import.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Iterable
from typing import Final

# Requests a server sends the client on an SSE stream; each must be granted but for ping.
# Each with the member a result answering it must hold (the SDKs' servers check it), which
# no other's result holds: a result with it can only answer that request.
SERVER_REQUEST_ANSWERS: Final = {
    "sampling/createMessage": "model",
    "elicitation/create": "action",
    "roots/list": "roots",
}
SERVER_REQUESTS: Final = frozenset(SERVER_REQUEST_ANSWERS)

# Characters that make a name ambiguous: control (Cc), format (Cf: zero-width joiners,
# bidi overrides), surrogate (Cs), private use (Co) and unassigned (Cn) code points.
_REFUSED_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})


def name_problem(name: object) -> str | None:
    """Why `name` cannot be compared exactly with a granted name, or None when it can."""
    if not isinstance(name, str) or not name:
        return "is not a non-empty string"
    if any(unicodedata.category(c) in _REFUSED_CATEGORIES for c in name):
        return "contains a control or format character"
    if not unicodedata.is_normalized("NFC", name):
        return "is not in Unicode normal form NFC"
    return None


def uri_problem(uri: object) -> str | None:
    """Why a resource URI cannot be matched exactly: `name_problem`'s rules, plus no dot
    segment (also after a `?` or `#`, or right after the scheme's `:`), encoded dot or slash,
    or backslash that a server could resolve elsewhere."""
    problem = name_problem(uri)
    if problem is not None:
        return problem
    assert isinstance(uri, str)  # name_problem checked it
    lowered = uri.lower()
    if any(part in lowered for part in ("%2e", "%2f", "%5c", "\\")):
        return "contains an encoded dot or slash, or a backslash"
    # SECURITY: the query and fragment too: a server mapping a file URI to a path without
    # reading them out of it resolves file:///docs/x?/../../etc to /etc. And the first
    # segment, after the scheme's colon: a rootless path (notes:../secret) starts there.
    if any(seg in (".", "..") for seg in re.split(r"[/?#:]", lowered)):
        return "contains a '.' or '..' segment"
    return None


def names(what: str, values: Iterable[object], error: Callable[[str], Exception]) -> frozenset[str]:
    """Each value a name `name_problem` finds none in, none twice; `error(message)` is
    raised with the first bad one."""
    if isinstance(values, str):
        raise error(f"{what} must be a list of names")
    found: set[str] = set()
    for value in values:
        problem = name_problem(value)
        if problem is not None:
            raise error(f"{what}: {value!r} {problem}")
        assert isinstance(value, str)
        if value in found:
            raise error(f"{what}: {value!r} given twice")
        found.add(value)
    return frozenset(found)


def uris(values: Iterable[object], error: Callable[[str], Exception]) -> list[str]:
    """Granted resources: exact URIs, or prefixes written with a trailing "*"."""
    texts = sorted(names("resources", values, error))
    for text in texts:
        problem = uri_problem(text)
        if problem is not None or "*" in text[:-1]:
            raise error(f"resources: {text!r} {problem or 'may have * only at its end'}")
    return texts


def server_requests(values: Iterable[object], error: Callable[[str], Exception]) -> frozenset[str]:
    """Server-to-client request methods, each one of SERVER_REQUESTS."""
    found = names("server_requests", values, error)
    unknown = sorted(found - SERVER_REQUESTS)
    if unknown:
        raise error(f"server_requests: {unknown[0]!r} is not one of {sorted(SERVER_REQUESTS)}")
    return found


def folded_twin(keys: Iterable[str], members: frozenset[str]) -> str | None:
    """The first of `keys` that is none of `members` but reads as one where member names are
    matched without case, or None. SECURITY (invariant 12): Go's encoding/json (mcp-go)
    matches them so (and folds U+017F to `s`, U+212A to `k`): beside or instead of `name` it
    reads `Name` as the name, so what keyproxy judged is not what that reader acts on."""
    folded = _folded(members)
    for key in keys:
        if key not in members and key.casefold() in folded:
            return key
    return None


@functools.cache
def _folded(members: frozenset[str]) -> frozenset[str]:
    return frozenset(member.casefold() for member in members)
