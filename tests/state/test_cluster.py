"""Limits hold across processes: two `keyproxy serve --workers 2` on one port, one Valkey/Redis.

Four workers in two process trees share the port (SO_REUSEPORT) and count in one store, as
replicas would: a token's max_uses is exact, a rate limit admits what it says whichever worker
serves, and a concurrency cap holds across workers and frees the slots of a killed worker
once their lease runs out.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from keyproxy.devserver import Agent, OpenBaoDevServer
from tests.helpers.logscan import CANARIES
from tests.helpers.servers import GatedStream, Upstream, bearer, free_port, new_key
from tests.state.servers import RedisServer, until
from tests.state.test_limits import ANY

BIN = Path(sys.executable).parent
DEADLINE = 60.0


class Cluster:
    """Two `keyproxy serve --workers 2` process trees on one port."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.path = workdir / "keyproxy.yaml"
        self.path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.outs = [workdir / f"serve-{i}.out" for i in range(2)]
        self.parents: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        argv = [str(BIN / "keyproxy"), "serve", "-c", str(self.path), "--port", str(self.port)]
        for out in self.outs:
            with out.open("wb") as stdout:
                self.parents.append(
                    subprocess.Popen(
                        [*argv, "--admin-port", "0", "--workers", "2"],
                        stdout=stdout,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        env=env,
                    )
                )

    def events(self) -> list[dict[str, Any]]:
        found = []
        for out in self.outs:
            # Whole lines only: the last one may be in the middle of being written.
            lines = out.read_text(encoding="utf-8").split("\n")[:-1]
            found += [json.loads(line) for line in lines if line.startswith("{")]
        return found

    def serving(self) -> set[int]:
        """The workers that have started serving (since the cluster started)."""
        return {e["worker"] for e in self.events() if e.get("event") == "serving"}

    def workers(self) -> list[int]:
        """The workers' process ids, as their parents started them."""
        return [
            pid for e in self.events() if e.get("event") == "workers_started" for pid in e["pids"]
        ]

    def stop(self) -> None:
        for parent in self.parents:
            if parent.poll() is None:
                parent.send_signal(signal.SIGTERM)
        for parent in self.parents:
            try:
                parent.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                parent.kill()
                parent.wait(timeout=DEADLINE)


def _route(upstream: str, limits: dict[str, Any] | None = None) -> dict[str, Any]:
    route: dict[str, Any] = {
        "upstream": upstream,
        "secret": {"path": "keyproxy/keys/cluster-test"},
        "inject": [{"header": "Authorization", "format": "Bearer {key}"}],
        "egress": {"allow_cidrs": ["127.0.0.0/8"]},
        "allow_http": True,
    }
    if limits:
        route["limits"] = limits
    return route


@pytest.fixture(scope="module")
def agent(openbao: OpenBaoDevServer) -> Agent:
    openbao.put_key("keyproxy/keys/cluster-test", new_key())
    return openbao.add_agent("cluster-agent")


@pytest.fixture
def identity_token(openbao: OpenBaoDevServer, agent: Agent) -> str:
    value = openbao.agent_token(agent)
    CANARIES.add(value)
    return value


@pytest.fixture
def cluster_config(
    openbao: OpenBaoDevServer, agent: Agent, redis_server: RedisServer
) -> dict[str, Any]:
    """The configuration of the cluster but its routes (the test adds them)."""
    return {
        "vault": openbao.vault_yaml(refresh_interval="500ms", max_staleness="60s"),
        "identity": {"issuers": [openbao.issuer_yaml("openbao")]},
        "state": {"url": redis_server.url, "prefix": uuid.uuid4().hex, "timeout": "1s"},
        "policies": [
            {"name": "agent", "issuers": ["openbao"], "subjects": [agent.entity_id], "allow": {}}
        ],
    }


@pytest.fixture
async def started() -> AsyncIterator[list[Cluster]]:
    """Start a cluster with `start(config)`; stopped at the end of the test."""
    made: list[Cluster] = []
    try:
        yield made
    finally:
        for cluster in made:
            cluster.stop()


async def _start(made: list[Cluster], config: dict[str, Any], workdir: Path) -> Cluster:
    config["policies"][0]["allow"] = dict.fromkeys(config["routes"], ANY)
    cluster = Cluster(config, workdir)
    made.append(cluster)
    cluster.start()

    async def all_serving() -> bool:
        assert all(p.poll() is None for p in cluster.parents), "keyproxy serve exited"
        return len(cluster.serving()) == 4

    await until(all_serving, within=DEADLINE)
    return cluster


async def _status(http: aiohttp.ClientSession, url: str, token: str) -> int:
    async with http.get(url, headers=bearer(token)) as response:
        await response.read()
        return response.status


async def test_max_uses_and_rate_limit_hold_across_four_workers(
    cluster_config: dict[str, Any],
    started: list[Cluster],
    upstream: Upstream,
    identity_token: str,
    tmp_path: Path,
) -> None:
    """A token with max_uses 25 hit by 200 concurrent requests over four workers succeeds
    exactly 25 times; a 50-per-10-s identity limit (burst 5) admits 50 to 55 in 10 s."""
    cluster_config["routes"] = {
        "counted": _route(upstream.url),
        "rated": _route(
            upstream.url,
            {"rate": [{"per": "identity", "requests": 50, "window": "10s", "burst": 5}]},
        ),
    }
    cluster = await _start(started, cluster_config, tmp_path)
    # A new connection per request, so the kernel spreads them over all four workers.
    fresh = aiohttp.TCPConnector(force_close=True, limit=200)
    async with aiohttp.ClientSession(connector=fresh) as http:
        body = {"scope": {"counted": ANY}, "max_uses": 25, "ttl": "5m"}
        async with http.post(
            f"{cluster.base}/token", json=body, headers=bearer(identity_token)
        ) as response:
            answer = await response.json()
            assert response.status == 200, answer
        token = answer["access_token"]
        CANARIES.add(token)
        url = f"{cluster.base}/r/counted/echo"
        statuses = await asyncio.gather(*(_status(http, url, token) for _ in range(200)))
        assert collections.Counter(statuses) == {200: 25, 401: 175}

        def counted() -> set[int]:
            return {e["worker"] for e in cluster.events() if e.get("route") == "counted"}

        async def every_worker() -> bool:
            return len(counted()) == 4  # every worker answered some of them

        await until(every_worker, within=10)

        admitted = 0
        deadline = time.monotonic() + 10.0

        async def caller() -> None:
            nonlocal admitted
            while time.monotonic() < deadline:
                if await _status(http, f"{cluster.base}/r/rated/echo", identity_token) == 200:
                    admitted += 1

        await asyncio.gather(*(caller() for _ in range(8)))
        assert 50 <= admitted <= 55


async def _open(
    http: aiohttp.ClientSession, url: str, token: str
) -> tuple[int, aiohttp.ClientResponse]:
    response = await http.get(url, headers=bearer(token))
    if response.status == 200:
        assert await response.content.readuntil(b"\n\n") == b"data: first\n\n"
    else:
        await response.read()
    return response.status, response


async def test_concurrency_cap_holds_across_workers_and_outlives_killed_ones(
    cluster_config: dict[str, Any],
    started: list[Cluster],
    gated: GatedStream,
    identity_token: str,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    """A cap of 3 streams in flight holds across four workers; a caller that disconnects
    frees its slot; the slots of SIGKILLed workers are freed by their lease's expiry."""
    limits = {"concurrency": [{"per": "route", "max": 3, "lease": "2s"}]}
    cluster_config["routes"] = {"streams": _route(f"http://127.0.0.1:{gated.port}", limits)}
    cluster = await _start(started, cluster_config, tmp_path)
    url = f"{cluster.base}/r/streams/stream"
    fresh = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=fresh) as http:
        streams = [await _open(http, url, identity_token) for _ in range(3)]
        assert [status for status, _ in streams] == [200, 200, 200]
        assert (await _open(http, url, identity_token))[0] == 429
        streams.pop()[1].close()  # a caller goes away mid-stream

        async def admitted() -> bool:
            try:
                status, response = await _open(http, url, identity_token)
            except aiohttp.ClientError:
                return False  # a connection a killed worker had accepted, or its backlog's
            if status == 200:
                streams.append((status, response))
            return status == 200

        await until(admitted, within=10)
        assert (await _open(http, url, identity_token))[0] == 429

        prefix = cluster_config["state"]["prefix"]
        with redis_server.client() as client:
            (slots,) = client.keys(f"{{{prefix}}}:s:*")
            for pid in cluster.workers():
                os.kill(pid, signal.SIGKILL)
            assert client.zcard(slots) == 3  # the dead workers' slots, until their lease ends
        for _, response in streams:
            response.close()

        streams.clear()
        # The parents start new workers; the old slots expire within their 2 s lease.
        for _ in range(3):
            await until(admitted, within=DEADLINE)

        async def refused() -> bool:
            try:
                return (await _open(http, url, identity_token))[0] == 429
            except aiohttp.ClientError:
                return False  # as above; an admitted fourth would fail the count below

        await until(refused, within=DEADLINE)
        assert len(streams) == 3
        for _, response in streams:
            response.close()
    gated.gate.set()


async def test_store_outage_fails_closed_allows_and_recovers_on_every_worker(
    cluster_config: dict[str, Any],
    started: list[Cluster],
    upstream: Upstream,
    identity_token: str,
    own_redis: RedisServer,
    tmp_path: Path,
) -> None:
    """With the store stopped under four workers, every worker answers a fail-closed
    limited route 503 state_store_unavailable within a bounded time while an `allow` limit
    and an unlimited route keep serving; after a restart on the same port every worker
    counts in the store again, with no restart of keyproxy."""
    generous = {"per": "route", "requests": 10**6, "window": "1h", "burst": 10**6}
    cluster_config["state"]["url"] = own_redis.url
    cluster_config["routes"] = {
        "closed": _route(upstream.url, {"rate": [generous]}),
        "open": _route(upstream.url, {"on_store_error": "allow", "rate": [generous]}),
        "free": _route(upstream.url),
    }
    cluster = await _start(started, cluster_config, tmp_path)
    fresh = aiohttp.TCPConnector(force_close=True, limit=100)

    def answered(route: str, status: int, since: int) -> set[int]:
        """The workers that answered `route` with `status` in the events after `since`."""
        return {
            e["worker"]
            for e in cluster.events()[since:]
            if e.get("route") == route and e.get("status") == status
        }

    async def timed(http: aiohttp.ClientSession, route: str) -> tuple[str, int, bytes, float]:
        began = time.monotonic()
        async with http.get(f"{cluster.base}/r/{route}/echo", headers=bearer(identity_token)) as r:
            return route, r.status, await r.read(), time.monotonic() - began

    async with aiohttp.ClientSession(connector=fresh) as http:
        for route in cluster_config["routes"]:
            assert (await timed(http, route))[1] == 200
        own_redis.stop()
        down = len(cluster.events())

        async def every_worker_refuses() -> bool:
            results = await asyncio.gather(
                *(timed(http, route) for route in cluster_config["routes"] for _ in range(20))
            )
            for route, status, body, took in results:
                assert took < 5.0, (route, took)  # bounded: 3 x the 1 s timeout, plus slack
                if route == "closed":
                    assert status == 503, body
                    assert b"state_store_unavailable" in body
                else:
                    assert status == 200, (route, body)
            return len(answered("closed", 503, down)) == 4

        await until(every_worker_refuses, within=DEADLINE)
        assert len(answered("open", 200, down)) > 1  # served by several workers too

        own_redis.start()  # the same port, empty
        up = len(cluster.events())

        async def every_worker_counts() -> bool:
            results = await asyncio.gather(*(timed(http, "closed") for _ in range(20)))
            # During recovery a worker still backing off may refuse; never a hang.
            assert all(status in {200, 503} and took < 5.0 for _, status, _, took in results)
            return len(answered("closed", 200, up)) == 4

        await until(every_worker_counts, within=DEADLINE)
        prefix = cluster_config["state"]["prefix"]
        with own_redis.client() as client:
            assert client.keys(f"{{{prefix}}}:r:*")
