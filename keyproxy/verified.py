"""Tokens that verified, remembered by digest: the one cache of workload-identity JWTs
(keyproxy.identity) and task tokens (keyproxy.tokens).

It keeps signature checks off the request path: a caller reusing its token costs one hash
and a dict look-up. It holds no token (a SHA-256 digest cannot be turned back into one),
never changes a result (each user checks on a hit that the key which verified the token is
still current, and checks the time again), and is bounded: when full, expired entries go
first, then the oldest, until a sixteenth of it is free. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


def digest(token: str) -> bytes:
    """The cache key of a token: its SHA-256 (lone surrogates kept, so no text is refused)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class VerifiedCache(Generic[T]):
    """Verified tokens by digest, at most `size`; `expires(entry)` is when the token is
    refused anyway (its exp plus leeway), after which its entry is the first to go."""

    def __init__(
        self, size: int, expires: Callable[[T], float], clock: Callable[[], float] = time.time
    ) -> None:
        self.size = size
        self._expires = expires
        self._clock = clock
        self._entries: dict[bytes, T] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def get(self, key: bytes) -> T | None:
        return self._entries.get(key)

    def put(self, key: bytes, entry: T) -> None:
        if self.size <= 0:
            return
        if key not in self._entries and len(self._entries) >= self.size:
            self._evict()
        self._entries[key] = entry

    def discard(self, key: bytes) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        """Forget every entry (what verified them has changed)."""
        self._entries.clear()

    def _evict(self) -> None:
        now = self._clock()
        expired = [key for key, entry in self._entries.items() if self._expires(entry) <= now]
        for key in expired:
            del self._entries[key]
        # Room for a batch of puts before the next scan: a full cache of live entries would
        # otherwise be scanned whole on every put (half a millisecond at 10,000 entries,
        # ten times the signature check the cache saves). Insertion order: oldest first.
        excess = len(self._entries) - (self.size - max(1, self.size // 16))
        for key in list(itertools.islice(self._entries, max(0, excess))):
            del self._entries[key]
