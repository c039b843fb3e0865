"""The Valkey/Redis store over TLS, through a Sentinel, and on a Cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from keyproxy.state.redis import RedisSettings, RedisStore
from keyproxy.state.store import Concurrency, Counter, Limit, Rate
from tests.helpers.certs import pem_files
from tests.state.servers import RedisServer


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[RedisServer]]:
    """Servers a test starts; each is stopped by PID at the end."""
    started: list[RedisServer] = []
    try:
        yield started
    finally:
        for server in reversed(started):
            server.stop()


def _start(servers: list[RedisServer], server: RedisServer) -> RedisServer:
    servers.append(server)
    server.start()
    return server


async def _decides(settings: RedisSettings) -> None:
    store = RedisStore(settings)
    try:
        uses = Counter("token", cap=2, ttl=60)
        limits: list[Limit] = [
            uses,
            Rate("identity", limit=10, window=1, burst=5),
            Concurrency("route", limit=3),
        ]
        first = await store.take(limits)
        assert first.allowed, first.outcomes
        await store.release(first.slots)
        assert (await store.take(limits)).allowed
        assert not (await store.take(limits)).allowed
        assert await store.read(uses) == 2
        assert (await store.check()).ok
    finally:
        await store.close()


async def test_tls(servers: list[RedisServer], tmp_path: Path) -> None:
    """A rediss:// URL with the server's CA decides over TLS."""
    pem = pem_files(tmp_path)
    tls = (pem["server"], pem["server-key"], pem["ca"])
    server = _start(servers, RedisServer(tmp_path / "tls", tls=tls))
    await _decides(RedisSettings(url=server.url, ca_file=pem["ca"], timeout=2.0))


async def test_tls_refuses_an_unknown_ca(servers: list[RedisServer], tmp_path: Path) -> None:
    """A server whose certificate the configured CA did not sign is a store error."""
    pem = pem_files(tmp_path)
    tls = (pem["server"], pem["server-key"], pem["ca"])
    server = _start(servers, RedisServer(tmp_path / "tls", tls=tls))
    store = RedisStore(RedisSettings(url=server.url, ca_file=pem["other-ca"], timeout=2.0))
    decision = await store.take([Counter("token", cap=2, ttl=60)])
    assert not decision.allowed
    assert decision.outcomes[0].store_error
    await store.close()


async def test_sentinel(servers: list[RedisServer], tmp_path: Path) -> None:
    """With Sentinel addresses the store finds the primary of its service and decides there."""
    primary = _start(servers, RedisServer(tmp_path / "primary"))
    sentinel = _start(servers, RedisServer(tmp_path / "sentinel", sentinel_of=primary))
    await _decides(
        RedisSettings(
            url="redis://", sentinels=(("127.0.0.1", sentinel.port),), service_name="keyproxy"
        )
    )


async def test_cluster(servers: list[RedisServer], tmp_path: Path) -> None:
    """On a Cluster every key of a decision is in one hash slot, so the script runs."""
    node = _start(servers, RedisServer(tmp_path / "cluster", cluster=True))
    await _decides(RedisSettings(url=node.url, cluster=True, timeout=2.0))


def test_a_ca_file_needs_tls() -> None:
    """A CA file with a plain redis:// URL is refused when the store is made."""
    with pytest.raises(ValueError, match="rediss://"):
        RedisStore(RedisSettings(url="redis://127.0.0.1:1/0", ca_file=Path("/ca.pem")))
