"""A real Valkey/Redis server for the state store's tests, and both stores over it.

- `redis_server` (tests/conftest.py): one `valkey-server` or `redis-server` on 127.0.0.1 for
  the session, no persistence, stopped by PID. Tests keep to their own keys (`unique`).
- `own_redis`: a server of its own for a test that stops and restarts it.
- `store`: each test runs once with the `MemoryStore` and once with a `RedisStore`.
- `gated`: an upstream whose SSE stream stays open until the test lets it end.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from keyproxy.state.memory import MemoryStore
from keyproxy.state.redis import RedisSettings, RedisStore
from keyproxy.state.store import StateStore
from tests.state.servers import RedisServer


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Valkey/Redis server for one test, which may stop and restart it."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["memory", "redis"])
async def store(
    request: pytest.FixtureRequest, redis_server: RedisServer
) -> AsyncIterator[StateStore]:
    """The in-process store, then the Valkey/Redis one (generous timeout: a shared machine)."""
    made: StateStore
    if request.param == "memory":
        made = MemoryStore()
    else:
        made = RedisStore(RedisSettings(url=redis_server.url, timeout=2.0))
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
def unique() -> str:
    """A key prefix no other test uses."""
    return uuid.uuid4().hex
