"""keyproxy.devserver against a real OpenBao dev server: the agents it sets up."""

from __future__ import annotations

import jwt

from keyproxy.devserver import OpenBaoDevServer


def test_agent_token_has_the_claims_keyproxy_checks(openbao: OpenBaoDevServer) -> None:
    """agent-token.sh mints an RS256 JWT with iss {addr}/v1/identity/oidc, aud keyproxy,
    sub = the agent's entity id and an entity_name claim, verifiable with the issuer's JWKS."""
    setup = openbao.dev_setup
    agent = openbao.add_agent("summarizer")
    token = openbao.agent_token(agent)
    signing_key = jwt.PyJWKClient(setup.jwks_uri).get_signing_key_from_jwt(token)
    claims = jwt.decode(
        token,
        signing_key.key,
        algorithms=["RS256"],
        audience=setup.audience,
        issuer=setup.issuer,
        options={"require": ["exp", "iat", "sub"]},
    )
    assert setup.issuer == f"{openbao.addr}/v1/identity/oidc"
    assert claims["sub"] == agent.entity_id
    assert claims["aud"] == "keyproxy"
    assert claims["entity_name"] == "summarizer"
    assert 0 < claims["exp"] - claims["iat"] <= 15 * 60
    assert openbao.add_agent("summarizer") == agent  # idempotent: same entity
