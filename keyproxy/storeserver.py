"""A local Valkey/Redis server for `keyproxy dev --redis` and the benchmark.

`LocalStoreServer` runs `valkey-server` (or `redis-server`) on 127.0.0.1 without persistence
(limits are transient: docs/operations.md), in a work directory of its own, and stops it by
PID. `server_binary()` finds the binary; the project's set-up installs one (`make test`).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


class StoreServerError(RuntimeError):
    """The server could not be started."""


def server_binary() -> str | None:
    """`valkey-server`, else `redis-server`, on PATH; None when neither is."""
    return shutil.which("valkey-server") or shutil.which("redis-server")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _PortTaken(StoreServerError):
    """Another process listens on the port."""


class LocalStoreServer:
    """A `valkey-server`/`redis-server` on 127.0.0.1:`port` (0: a free one), no persistence."""

    def __init__(self, workdir: Path, port: int = 0) -> None:
        self.workdir = workdir
        self._chosen = not port  # a port of our choosing may be taken before we bind it
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        binary = server_binary()
        if binary is None:
            raise StoreServerError(
                "neither valkey-server nor redis-server is on PATH "
                "(Debian: apt-get install valkey-server or redis-server)"
            )
        # Nothing to keep: every counter is short-lived.
        return [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "no",
        ]

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING (at most `timeout` seconds). A
        port this object chose is chosen again if another process took it meanwhile."""
        for _ in range(3 if self._chosen else 1):
            try:
                self._start(timeout)
            except _PortTaken:
                self.port = free_port()
                continue
            return
        raise StoreServerError(f"no free port found; see {self.workdir}/server.log")

    def _start(self, timeout: float) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with (self.workdir / "server.log").open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603  # our own arguments
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.process.poll() is not None:
                self.process = None
                text = (self.workdir / "server.log").read_text(encoding="utf-8", errors="replace")
                if "Address already in use" in text[-2000:]:
                    raise _PortTaken
                raise StoreServerError(f"the server exited; see {self.workdir}/server.log")
            if time.monotonic() > deadline:
                self.stop()
                raise StoreServerError(f"the server was not ready within {timeout} s")
            time.sleep(0.02)  # polling interval of a bounded wait

    def answers(self) -> bool:
        """Whether our server answers PING (a process that is not ours does not)."""
        if self.process is None:
            return False
        try:
            with redis.Redis(port=self.port, socket_timeout=2) as client:
                return bool(client.ping())
        except redis.exceptions.RedisError:
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
