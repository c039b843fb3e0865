"""Real Valkey/Redis processes for the state store's tests, and a bounded poll.

`RedisServer` runs `valkey-server` or `redis-server` on 127.0.0.1 without persistence, as a
plain server, a TLS-only server, a one-node Cluster, or a Sentinel watching another server;
it is stopped by PID and can be started again on the same port. `Relay` is one address in
front of such servers, which a test can move from one to another (a failover behind it).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType

import redis

from keyproxy.storeserver import server_binary
from tests.helpers.servers import free_port


def _binary() -> str:
    found = server_binary()
    assert found, "neither valkey-server nor redis-server is on PATH (`make test` installs one)"
    return found


async def until(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> float:
    """Poll `check` until it is true; the seconds it took. Fails after `within` seconds."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(0.01)  # polling interval of a bounded wait
    raise AssertionError(f"not true within {within} s")


class RedisServer:
    """A `valkey-server`/`redis-server` on 127.0.0.1:`port`, stopped by PID.

    `tls` is (certificate, key, CA) for a TLS-only server; `cluster` makes a one-node Cluster
    holding every slot; `sentinel_of` makes this a Sentinel watching that server as the
    primary of the service `keyproxy`.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        tls: tuple[Path, Path, Path] | None = None,
        cluster: bool = False,
        sentinel_of: RedisServer | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.tls = tls
        self.cluster = cluster
        self.sentinel_of = sentinel_of
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def _command(self) -> list[str]:
        common = ["--bind", "127.0.0.1", "--dir", str(self.workdir)]
        if self.sentinel_of is not None:
            conf = self.workdir / "sentinel.conf"  # Sentinel rewrites its file: one of its own
            conf.write_text(
                f"port {self.port}\n"
                f"sentinel monitor keyproxy 127.0.0.1 {self.sentinel_of.port} 1\n",
                encoding="utf-8",
            )
            return [_binary(), str(conf), "--sentinel", *common]
        # Nothing to keep: limits are transient.
        command = [_binary(), *common, "--save", "", "--appendonly", "no"]
        if self.tls:
            cert, key, ca = self.tls
            command += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            command += ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
            command += ["--tls-ca-cert-file", str(ca)]
        else:
            command += ["--port", str(self.port)]
        if self.cluster:
            nodes = str(self.workdir / "nodes.conf")
            command += ["--cluster-enabled", "yes", "--cluster-config-file", nodes]
            # The default bus port, port + 10000, may be taken or above 65535.
            command += ["--cluster-port", str(free_port())]
        return command

    def client(self) -> redis.Redis:
        if self.tls:
            return redis.Redis.from_url(self.url, socket_timeout=2, ssl_ca_certs=str(self.tls[2]))
        return redis.Redis(port=self.port, socket_timeout=2)

    def start(self, timeout: float = 10.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with (self.workdir / "server.log").open("ab") as log:
            self.process = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self._ready():
            assert self.process.poll() is None, f"the server exited; see {self.workdir}/server.log"
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the server was not ready within {timeout} s")
            time.sleep(0.02)  # polling interval of a bounded wait

    def _ready(self) -> bool:
        try:
            with self.client() as client:
                if self.sentinel_of is not None:
                    return client.sentinel_get_master_addr_by_name("keyproxy") is not None
                client.ping()
                if not self.cluster:
                    return True
                # redis-py answers CLUSTER INFO as a dict, CLUSTER SLOTS as a list.
                if client.execute_command("CLUSTER INFO").get("cluster_state") == "ok":
                    return True
                if not client.execute_command("CLUSTER SLOTS"):
                    client.execute_command("CLUSTER ADDSLOTSRANGE", 0, 16383)
                return False
        except redis.exceptions.ConnectionError:
            return False

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


class Relay:
    """A fixed address in front of a server on 127.0.0.1 (a Kubernetes Service, a virtual IP,
    a DNS name): each new connection goes to the server at `port` now, and connections open
    stay with the server they reached, as across a failover behind such an address."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._server: asyncio.Server | None = None
        self._relaying: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> str:
        """Start listening; the `redis://` URL of the relay."""
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        if self._relaying:
            await asyncio.wait(self._relaying)
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._relaying.add(task)
        self._writers.append(writer)
        try:
            to_reader, to_writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            writer.close()
            return
        finally:
            self._relaying.discard(task)
        self._writers.append(to_writer)
        pipes = [_pipe(reader, to_writer), _pipe(to_reader, writer)]
        self._relaying.update(asyncio.ensure_future(pipe) for pipe in pipes)


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except OSError:
        pass  # the other side went away: this side goes too
    finally:
        sink.close()
