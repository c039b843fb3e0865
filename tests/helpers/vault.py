"""Helpers shared by the tests of keyproxy.vault."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

from yarl import URL

from keyproxy.config import Injection, Route, SecretRef, Upstream, VaultConfig
from keyproxy.vault import (
    Vault,
)

POLL = 0.05


VAULT_TOKEN = re.compile(r"\b(hv)?[sbr]\.[A-Za-z0-9]{20,}")  # OpenBao/Vault token formats


def route(name: str, ref: SecretRef) -> Route:
    return Route(
        name=name,
        upstream=Upstream("https", "api.example.com", 443, ""),
        secret=ref,
        inject=(Injection("header", "Authorization", "Bearer {key}"),),
    )


@contextlib.contextmanager
def vault_of(cfg: VaultConfig) -> Iterator[Vault]:
    vault = Vault(cfg)
    try:
        yield vault
    finally:
        vault.close()


@contextlib.asynccontextmanager
async def background(coro: Awaitable[None]) -> Any:
    task = asyncio.ensure_future(coro)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def write_secret_file(path: Path, value: str) -> None:
    path.write_text(value, encoding="utf-8")
    path.chmod(0o600)


class VaultRelay:
    """A TCP relay on 127.0.0.1 in front of OpenBao that can hold requests (a stalled Vault)
    or drop connections (Vault down), and records the requests it held."""

    def __init__(self, target: str) -> None:
        url = URL(target)
        self.target = (url.host or "127.0.0.1", url.port or 8200)
        self.gate = asyncio.Event()
        self.gate.set()
        self.down = False
        self.held: list[bytes] = []
        self.url = ""
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        self.gate.set()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        for pump in (
            self._pump(reader, up_writer, requests=True),
            self._pump(up_reader, writer, requests=False),
        ):
            task = asyncio.create_task(pump)
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, requests: bool
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                if requests and self.down:
                    break
                if requests and not self.gate.is_set():
                    self.held.append(chunk)
                    await self.gate.wait()
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
