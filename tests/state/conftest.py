"""A real Valkey/Redis server for the state store's tests, and both stores over it.

- `redis_server`: one `valkey-server` or `redis-server` on 127.0.0.1 for the session, no
  persistence, stopped by PID. Tests keep to their own keys (`unique`).
- `own_redis`: a server of its own for a test that stops and restarts it.
- `store`: each test runs once with the `MemoryStore` and once with a `RedisStore`.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from keyproxy.state.memory import MemoryStore
from keyproxy.state.redis import RedisSettings, RedisStore
from keyproxy.state.store import StateStore
from tests.support import free_port


def _binary() -> str:
    found = shutil.which("valkey-server") or shutil.which("redis-server")
    assert found, "neither valkey-server nor redis-server is on PATH (`make test` installs one)"
    return found


class RedisServer:
    """A `valkey-server`/`redis-server` process on 127.0.0.1:`port`, stopped by PID."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "server.log").open("ab")
        self.process = subprocess.Popen(
            [
                _binary(),
                *("--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.workdir)),
                *("--save", "", "--appendonly", "no"),  # nothing to keep: limits are transient
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server exited; see {self.workdir}/server.log"
            try:
                with redis.Redis(port=self.port, socket_timeout=0.5) as client:
                    client.ping()
            except redis.exceptions.ConnectionError:
                time.sleep(0.02)
            else:
                return
        self.stop()
        raise AssertionError(f"the server did not answer within {timeout} s")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One Valkey/Redis server shared by the whole session."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


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
