"""Helpers shared by the tests of keyproxy.vault."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

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
