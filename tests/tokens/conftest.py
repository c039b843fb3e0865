"""Fixtures shared by the tests of keyproxy.tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from keyproxy.devserver import Agent, OpenBaoDevServer
from tests.helpers.servers import new_key
from tests.helpers.vault import VaultRelay


@pytest.fixture(scope="module")
def agent(openbao: OpenBaoDevServer, agent: Agent) -> Agent:
    """conftest's agent, with the key of token_config's routes stored."""
    openbao.put_key("keyproxy/keys/tokens-test", new_key())
    return agent


@pytest.fixture
async def relay(openbao: OpenBaoDevServer) -> AsyncIterator[VaultRelay]:
    value = VaultRelay(openbao.addr)
    await value.start()
    yield value
    await value.close()
