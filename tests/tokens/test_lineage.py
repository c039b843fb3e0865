"""keyproxy.tokens.lineage: a token's lifecycle claims, written and read back strictly."""

from __future__ import annotations

from typing import Any

import pytest

from keyproxy.caller import Identity
from keyproxy.tokens import Link, Revocations, TaskToken
from keyproxy.tokens.lineage import child_claims, read

ROOT = TaskToken("root", Identity("k8s", "agent"), {}, 900.0, 1100.0, max_uses=5, idle_ttl=30.0)


def _child(actor: Identity | None) -> TaskToken:
    claims = child_claims(ROOT, actor) | {"exp": 1050}
    lineage = read(claims, "child", None)
    return TaskToken(
        "child",
        ROOT.identity,
        {},
        950.0,
        1050.0,
        ancestors=lineage.ancestors,
        actors=lineage.actors,
        lifecycle=lineage.lifecycle,
    )


def test_a_chain_round_trips_through_its_claims() -> None:
    """A grandchild's claims nest both actors (RFC 8693 act) and name both ancestors with
    what it must honour; read back, they give the chain, the actors in order and the links
    that bound it."""
    child = _child(Identity("k8s", "helper"))
    claims = child_claims(child, None) | {"exp": 1000, "idle": 10}
    assert claims["act"] == {"sub": "agent", "idp": "k8s", "act": {"sub": "helper", "idp": "k8s"}}
    assert claims["anc"][0] == {"jti": "root", "exp": 1100, "max_uses": 5, "idle": 30}
    lineage = read(claims, "grandchild", 2)
    assert [a.token_id for a in lineage.ancestors] == ["root", "child"]
    assert lineage.actors == ("k8s|helper", "k8s|agent")
    assert lineage.lifecycle == (
        Link("root", 1100.0, 5, 30.0),
        Link("grandchild", 1000.0, 2, 10.0),
    )
    assert read({"exp": 1000}, "plain", None).lifecycle == ()


@pytest.mark.parametrize(
    "claims",
    [
        {"anc": "root", "act": {"sub": "a"}},
        {"anc": [], "act": {"sub": "a"}},
        {"anc": [{"jti": "r", "exp": 1}], "act": {"sub": "a", "act": {"sub": "b"}}},
        {"anc": [{"jti": "r", "exp": 1}]},
        {"anc": [{"exp": 1}], "act": {"sub": "a"}},
        {"anc": [{"jti": "r", "exp": 1, "max_uses": 0}], "act": {"sub": "a"}},
        {"anc": [{"jti": "r", "exp": 1, "idle": "30"}], "act": {"sub": "a"}},
        {"idle": True},
        {"idle": 0},
    ],
)
def test_unreadable_lifecycle_claims_refuse_the_token(claims: dict[str, Any]) -> None:
    """A lifecycle claim that is there but unreadable is an error, never ignored: ignoring
    it would free a child from its parent, or a leased token from its heartbeat."""
    with pytest.raises((ValueError, TypeError, KeyError)):
        read({"exp": 1000, **claims}, "t", None)


def test_a_delegated_token_dies_with_its_ancestors_and_its_actors() -> None:
    """Revoking an ancestor's id names the child through its chain; revoking a sub-agent's
    identity as a subject names the tokens it acts with, issued before the revocation."""
    child = _child(Identity("k8s", "helper"))
    revocations = Revocations()
    assert not revocations.any_id(child.ancestors)
    assert not revocations.any_actor(child)
    revocations.ids["root"] = 1100.0
    assert revocations.any_id(child.ancestors)
    revocations = Revocations(subjects={"k8s|helper": 960.0})
    assert revocations.any_actor(child)  # issued at 950
    assert not Revocations(subjects={"k8s|helper": 940.0}).any_actor(child)
