"""Cluster-wide limit state: the `StateStore` interface and its two implementations.

`MemoryStore` (keyproxy.state.memory) counts in this process; `RedisStore`
(keyproxy.state.redis) counts in Valkey/Redis, shared by every worker and replica.
"""

from keyproxy.state.store import (
    Concurrency,
    Counter,
    Decision,
    Health,
    Lease,
    Limit,
    OnStoreError,
    Outcome,
    Rate,
    Slot,
    StateStore,
    StoreStats,
    StoreUnavailable,
    hold,
)

__all__ = [
    "Concurrency",
    "Counter",
    "Decision",
    "Health",
    "Lease",
    "Limit",
    "OnStoreError",
    "Outcome",
    "Rate",
    "Slot",
    "StateStore",
    "StoreStats",
    "StoreUnavailable",
    "hold",
]
