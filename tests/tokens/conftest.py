"""Fixtures shared by the tests of keyproxy.tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from keyproxy.devserver import Agent, OpenBaoDevServer
from tests.helpers.servers import (
    Stack,
    Upstream,
    new_key,
    running_proxy,
    token_config,
)


@pytest.fixture(scope="module")
def agent(openbao: OpenBaoDevServer, agent: Agent) -> Agent:
    """conftest's agent, with the key of token_config's routes stored."""
    openbao.put_key("keyproxy/keys/tokens-test", new_key())
    return agent


@pytest.fixture
async def stack(
    openbao: OpenBaoDevServer, agent: Agent, upstream: Upstream
) -> AsyncIterator[Stack]:
    async with running_proxy(token_config(openbao, agent, upstream.url)) as value:
        yield value
