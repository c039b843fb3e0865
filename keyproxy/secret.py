"""Secret values that redact themselves, and the registry the log scrubber reads.

A `Secret` never shows its value through `repr`, `str` or formatting; code that needs the
value calls `reveal()`, which makes every use easy to find. Each revealed form that can reach
the wire (the raw key, and what injection derives from it, such as basic-auth base64) is
registered with `register()` so the audit log's last-line-of-defence processor and the response
scrubber can recognise it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from pathlib import Path
from typing import BinaryIO, Final

from keyproxy import text

REDACTED: Final = "[REDACTED]"


class Secret:
    """A secret string. Only `reveal()` returns the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not value:
            # SECURITY: an empty key must never be injected; refuse to even hold one.
            raise ValueError("a secret value must not be empty")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def fingerprint(self) -> str:
        """A short, non-reversible identifier, safe to log and to compare."""
        return fingerprint(self._value)

    def __repr__(self) -> str:
        return f"Secret({REDACTED})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("Secret values cannot be pickled")


# Far above any API key (a few hundred characters at most): a longer value is a mistake, and
# indexing it for the log scrubber and the answer scrubber would hold the process for seconds
# per megabyte.
MAX_KEY_LENGTH: Final = 16 * 1024


def problem(value: str) -> str | None:
    """What keeps a key or credential's text from going on the wire as stored, or None: it
    is empty, has whitespace at either end or a control character (keyproxy.text.hidden: C0,
    DEL, C1 or a bidirectional control; a stray newline from `kv put api_key=@file` would
    break the header it is injected into), or is longer than MAX_KEY_LENGTH. Such a value is
    refused where it is read, never injected."""
    if not value:
        return "is empty"
    if len(value) > MAX_KEY_LENGTH:
        return f"is longer than {MAX_KEY_LENGTH // 1024} KiB"
    if value != value.strip() or text.hidden(value):
        return "has whitespace or control characters"
    return None


def fingerprint(value: str) -> str:
    """First 12 hex digits of SHA-256: enough to tell keys apart, useless to an attacker."""
    return hashlib.sha256(value.encode()).hexdigest()[:12]


class _Registry:
    """Every secret form this process has handled, for scrubbing logs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: frozenset[str] = frozenset()

    def register(self, *values: str) -> None:
        # Very short values would redact ordinary words; keys are never that short.
        new = {v for v in values if len(v) >= 8}
        if new - self._values:
            with self._lock:
                self._values = self._values | new

    def values(self) -> frozenset[str]:
        return self._values


_registry = _Registry()
register = _registry.register
known_values = _registry.values


def open_private(path: Path) -> BinaryIO:
    """`path` opened to write, created or truncated with mode 0600 from the start: a key,
    token or configuration holding one (or a log that may quote one) is never readable by
    others, not even for a moment. A link at `path` is refused (OSError), never followed to
    write over (and later remove) what it names: a symbolic one (ELOOP), or a hard one or a
    file of another user (EPERM); a file of this user's already there is made 0600 first."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    found = os.fstat(fd)
    if found.st_nlink != 1 or found.st_uid != os.geteuid():
        os.close(fd)
        raise OSError(errno.EPERM, "a link, or another user's file", str(path))
    os.fchmod(fd, 0o600)
    os.ftruncate(fd, 0)
    return os.fdopen(fd, "wb")


def write_private(path: Path, data: bytes | str) -> Path:
    """Write `data` (text as UTF-8) to `path` as `open_private` opens it."""
    with open_private(path) as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
    return path
