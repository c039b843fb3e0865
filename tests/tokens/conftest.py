"""Fixtures shared by the tests of keyproxy.tokens."""

from __future__ import annotations

import pytest

from keyproxy.devserver import Agent, OpenBaoDevServer
from tests.helpers.servers import new_key


@pytest.fixture(scope="module")
def agent(openbao: OpenBaoDevServer, agent: Agent) -> Agent:
    """conftest's agent, with the key of token_config's routes stored."""
    openbao.put_key("keyproxy/keys/tokens-test", new_key())
    return agent
