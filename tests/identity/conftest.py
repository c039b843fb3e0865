"""Fixtures shared by the tests of keyproxy.identity."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from keyproxy.identity import IdentityVerifier
from tests.helpers.identity import ISSUER_KEYS, TASK_TYP, Clock, IssuerServer, make_issuer


@pytest.fixture
async def server() -> AsyncIterator[IssuerServer]:
    srv = IssuerServer(list(ISSUER_KEYS))
    await srv.start()
    yield srv
    await srv.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def new_verifier(
    server: IssuerServer, session: aiohttp.ClientSession, clock: Clock
) -> AsyncIterator[Callable[..., IdentityVerifier]]:
    """Build a verifier for one issuer (by default the JWKS URL of `server`); each one is
    closed (its background fetches cancelled) after the test."""
    built: list[IdentityVerifier] = []

    def build(**changes: Any) -> IdentityVerifier:
        if not {"discovery_url", "jwks_file", "jwks_uri"} & changes.keys():
            changes["jwks_uri"] = f"{server.url}/jwks"
        built.append(
            IdentityVerifier(
                [make_issuer(**changes)], session, clock=clock, rejected_types=(TASK_TYP,)
            )
        )
        return built[-1]

    yield build
    for verifier in built:
        await verifier.aclose()


@pytest.fixture
async def verifier(new_verifier: Callable[..., IdentityVerifier]) -> IdentityVerifier:
    v = new_verifier()
    await v.prefetch()
    return v
