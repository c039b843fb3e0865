"""The verified-token cache: bounded, expired entries first, then the oldest."""

from __future__ import annotations

import hashlib

from keyproxy.verified import VerifiedCache, digest


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_key_is_the_tokens_sha256() -> None:
    """A token is remembered by its SHA-256 digest, never by its text."""
    assert digest("a.b.c") == hashlib.sha256(b"a.b.c").digest()
    assert len(digest("x\udcff")) == 32  # a lone surrogate is hashed, not refused


def test_a_full_cache_drops_expired_entries_first() -> None:
    """When full, every expired entry goes before any live one, however old."""
    clock = Clock()
    cache: VerifiedCache[float] = VerifiedCache(3, lambda expires: expires, clock)
    cache.put(b"old-live", 2000.0)
    cache.put(b"expired-1", 1001.0)
    cache.put(b"expired-2", 1002.0)
    clock.now = 1500.0
    cache.put(b"new", 2000.0)
    assert len(cache) == 2
    assert b"old-live" in cache
    assert b"new" in cache


def test_a_full_cache_of_live_entries_drops_the_oldest() -> None:
    """With nothing expired, the entry put first goes; the bound always holds."""
    cache: VerifiedCache[float] = VerifiedCache(2, lambda expires: expires, Clock())
    for i in range(5):
        cache.put(bytes([i]), 5000.0)
    assert len(cache) == 2
    assert bytes([3]) in cache
    assert bytes([4]) in cache


def test_replacing_an_entry_evicts_nothing_and_size_zero_keeps_nothing() -> None:
    """Putting a known key again replaces it in place; a cache of size 0 stays empty."""
    cache: VerifiedCache[float] = VerifiedCache(2, lambda expires: expires, Clock())
    cache.put(b"a", 5000.0)
    cache.put(b"b", 5000.0)
    cache.put(b"a", 6000.0)
    assert cache.get(b"a") == 6000.0
    assert b"b" in cache
    cache.discard(b"a")
    assert cache.get(b"a") is None
    empty: VerifiedCache[float] = VerifiedCache(0, lambda expires: expires, Clock())
    empty.put(b"a", 5000.0)
    assert len(empty) == 0


def test_a_full_cache_of_live_entries_is_scanned_once_per_batch_of_puts() -> None:
    """Each scan of a full cache makes room for a sixteenth of its size, oldest first, so
    a caller minting fresh tokens costs a scan per batch of puts, not one per put."""
    calls: list[float] = []

    def expires(entry: float) -> float:
        calls.append(entry)
        return entry

    cache: VerifiedCache[float] = VerifiedCache(160, expires, Clock())
    for i in range(260):
        cache.put(i.to_bytes(2, "big"), 5000.0)
    assert len(cache) <= 160
    assert (99).to_bytes(2, "big") not in cache
    assert all(i.to_bytes(2, "big") in cache for i in range(100, 260))
    assert len(calls) <= 11 * 160  # 100 puts into a full cache: a scan per 10
