"""The log scrubber: known secret values and JWT-shaped text, redacted wherever they hide.

`scrub_secrets` is the structlog processor every log event passes through, the last line of
defence: any registered key form (see keyproxy.secret) and anything shaped like a JWT is
replaced before rendering. Code never puts secrets into events on purpose; this processor is
for the mistake nobody saw. `current()` is the index it searches, for callers that scrub text
themselves. Pure: no I/O.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from structlog.typing import EventDict, WrappedLogger

from keyproxy.fragments import FRAGMENT, Span, merged, redacted
from keyproxy.secret import REDACTED, known_values

# Three base64url parts, the first an encoded JSON object ('{"' is 'eyJ').
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_JWT_REDACTED = "[REDACTED-JWT]"


# Window length of the secret index. Any string of at least 2 * _GRAM - 1 characters contains
# a whole window at an offset that is a multiple of _GRAM, wherever it starts: so a text is
# searched by looking up one window in every _GRAM characters. The registry holds no value
# shorter than 8 characters; shorter ones would be compared one by one.
_GRAM = 4
CLEAN_MAX = 8192  # request records remembered as clean, per set of secrets


def holds_jwt(value: str) -> bool:
    """Whether `value` holds what the scrubber would redact as a JWT."""
    return "eyJ" in value and _JWT.search(value) is not None


class Clean:
    """What was found clean under one set of secrets: the text fields of whole request
    records (keyproxy.audit). Replaced whole when a secret is added, so a scan that began
    before cannot write into the new one."""

    __slots__ = ("records",)

    def __init__(self) -> None:
        self.records: set[tuple[Any, ...]] = set()


class _Redactor:
    """The known secret values, indexed so that a search costs the same for ten values or ten
    thousand: one dict look-up per `_GRAM` characters of text. `clean` holds the request
    records found clean, forgotten when a secret is added.
    """

    def __init__(self) -> None:
        self.secrets: frozenset[str] = frozenset()
        self._windows: dict[str, frozenset[str]] = {}
        self._short: tuple[str, ...] = ()
        self.clean = Clean()
        self._lock = threading.Lock()

    def update(self, secrets: frozenset[str]) -> None:
        """Index the values of `secrets` not indexed yet (the registry only grows), rather
        than rebuilding the index for every new key (1,000 routes started in 21 s of CPU).
        Readers take no lock: each window's set is replaced whole, never changed in place."""
        with self._lock:
            if secrets <= self.secrets:
                return  # nothing new (another thread may have indexed a later set already)
            short = list(self._short)
            for value in secrets - self.secrets:
                if len(value) < 2 * _GRAM - 1:
                    short.append(value)
                    continue
                for i in range(len(value) - _GRAM + 1):
                    window = value[i : i + _GRAM]
                    self._windows[window] = self._windows.get(window, frozenset()) | {value}
            self._short = tuple(short)
            self.clean = Clean()  # a record found clean before may hold a new value
            self.secrets = secrets

    def text(self, value: str) -> str:
        """`value` with every secret redacted (`value` itself when there was none)."""
        # Scanned every time: a memory of texts found clean measured no gain on the request
        # path (807,500 against 806,800 instructions per request without it), where whole
        # records are remembered instead (keyproxy.audit).
        out = value
        spans = self._stretches(value)
        if spans:
            out = redacted(value, spans, REDACTED)
        if "eyJ" in out:
            out = _JWT.sub(_JWT_REDACTED, out)
        return out

    def _stretches(self, value: str) -> list[Span]:
        """Where `value` holds a run of FRAGMENT or more characters of a secret (a whole one
        among them), merged as the response scrubber merges them.

        Such a run holds a whole window of `value` at an offset that is a multiple of _GRAM,
        and that window is one of the secret's: each window found is a seed, extended to the
        longest run it shares with the secret at that alignment (once per alignment)."""
        windows = self._windows
        spans: list[Span] = []
        runs: dict[tuple[str, int], int] = {}  # (secret, offset of it in value): run's end
        for i in range(0, len(value) - _GRAM + 1, _GRAM):
            hit = windows.get(value[i : i + _GRAM])
            if hit is None:
                continue
            gram = value[i : i + _GRAM]
            for found in hit:
                at = found.find(gram)
                while at != -1:
                    if runs.get((found, i - at), -1) < i + _GRAM:  # else inside a run seen
                        start = i - _common(value, i, found, at, -1)
                        end = i + _common(value, i, found, at, 1)
                        runs[found, i - at] = end
                        if end - start >= FRAGMENT:
                            spans.append((start, end))
                    at = found.find(gram, at + 1)
        for short in self._short:
            at = value.find(short)
            while at != -1:
                spans.append((at, at + len(short)))
                at = value.find(short, at + 1)
        return merged(spans) if spans else spans


def _common(text: str, i: int, other: str, j: int, direction: int) -> int:
    """How far `text` from `i` and `other` from `j` agree: forwards (1), the length of their
    common prefix; backwards (-1), of the common suffix of `text[:i]` and `other[:j]`. By
    halving, so a secret quoted whole costs a few comparisons, not one per character."""
    if direction > 0:
        low, high = 0, min(len(text) - i, len(other) - j)
        while low < high:
            mid = (low + high + 1) // 2
            if text[i : i + mid] == other[j : j + mid]:
                low = mid
            else:
                high = mid - 1
        return low
    low, high = 0, min(i, j)
    while low < high:
        mid = (low + high + 1) // 2
        if text[i - mid : i] == other[j - mid : j]:
            low = mid
        else:
            high = mid - 1
    return low


_current = _Redactor()


def current() -> _Redactor:
    """The redactor, brought up to date with the registry when it has grown."""
    secrets = known_values()
    if _current.secrets is not secrets:
        _current.update(secrets)
    return _current


def _scrub(value: Any, redactor: _Redactor) -> Any:
    if isinstance(value, str):
        return redactor.text(value)
    if isinstance(value, int | float | bool) or value is None:
        return value
    if isinstance(value, dict):
        return {k: _scrub(v, redactor) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v, redactor) for v in value]
    # Anything else is rendered as text by the JSON renderer; scrub that text instead.
    return redactor.text(repr(value))


def scrub_secrets(_: WrappedLogger, __: str, event: EventDict) -> dict[str, Any]:
    """structlog processor: redact known secret values and JWT-shaped strings."""
    redactor = current()
    out: dict[str, Any] = {}
    for name, value in event.items():
        kind = type(value)
        if kind is str:
            out[name] = redactor.text(value)
        elif kind is int or kind is float or value is None:
            out[name] = value
        else:
            out[name] = _scrub(value, redactor)
    return out
