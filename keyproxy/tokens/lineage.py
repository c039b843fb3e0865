"""A task token's lifecycle claims: its heartbeat lease (`idle`) and its delegation chain
(`act`, `anc`), written when it is issued and read back when it is verified.

A delegated token names its actor chain in `act` (RFC 8693 section 4.1: the current actor,
nesting the prior ones) and its ancestors in `anc`, root first, each with what the tokens
below it must honour: its expiry, its `max_uses` (the child's uses count against it too) and
whether it holds a heartbeat lease (the child dies when that lease lapses).

SECURITY: a claim that is there but unreadable refuses the token (ValueError): ignoring it
would free a child from its parent, or a leased token from its heartbeat. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from keyproxy import jws
from keyproxy.caller import Identity
from keyproxy.config import MAX_DELEGATION_DEPTH
from keyproxy.tokens.format import Link, TaskToken


class Lineage(NamedTuple):
    """What a token's lifecycle claims say (see the module docstring)."""

    idle_ttl: float | None
    ancestors: tuple[Link, ...]
    actors: tuple[str, ...]
    lifecycle: tuple[Link, ...]


def actor_name(identity: Identity) -> str:
    """How an actor is named in the audit: "issuer|subject"."""
    return f"{identity.issuer}|{identity.subject}"


def child_claims(parent: TaskToken, actor: Identity | None) -> dict[str, Any]:
    """The `act` and `anc` claims of a token delegated from `parent`. Without an actor
    token, the parent's own identity acts (it handed the token on)."""
    acting = actor if actor is not None else parent.identity
    act: dict[str, Any] = {"sub": acting.subject, "idp": acting.issuer}
    previous = _act_claim(parent.actors)
    if previous is not None:
        act["act"] = previous
    link = Link(parent.token_id, parent.expires_at, parent.max_uses, parent.idle_ttl)
    return {"act": act, "anc": [_link_claim(a) for a in (*parent.ancestors, link)]}


def _act_claim(actors: tuple[str, ...]) -> dict[str, Any] | None:
    """The nested `act` for an actor chain in order (the current actor is the last)."""
    claim: dict[str, Any] | None = None
    for name in actors:
        issuer, _, subject = name.partition("|")
        claim = {"sub": subject, "idp": issuer} | ({"act": claim} if claim else {})
    return claim


def _link_claim(link: Link) -> dict[str, Any]:
    claim: dict[str, Any] = {"jti": link.token_id, "exp": int(link.expires_at)}
    if link.max_uses is not None:
        claim["max_uses"] = link.max_uses
    if link.idle_ttl is not None:
        claim["idle"] = int(link.idle_ttl)
    return claim


def read(claims: Mapping[str, Any], token_id: str, max_uses: int | None) -> Lineage:
    """The lifecycle claims of a verified token's `claims`; ValueError if unreadable."""
    idle = _seconds(claims["idle"]) if "idle" in claims else None
    if "anc" not in claims and "act" not in claims and idle is None and max_uses is None:
        return Lineage(None, (), (), ())
    own = Link(token_id, jws.numeric_date(claims["exp"]), max_uses, idle)
    if "anc" not in claims and "act" not in claims:
        return Lineage(idle, (), (), (own,))
    raw = claims["anc"]
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_DELEGATION_DEPTH:
        raise ValueError("anc: a list of ancestors")
    ancestors = tuple(_link(item) for item in raw)
    actors = _actors(claims["act"], len(ancestors))
    bounding = tuple(
        link for link in (*ancestors, own) if link.max_uses is not None or link.idle_ttl is not None
    )
    return Lineage(idle, ancestors, actors, bounding)


def _link(item: Any) -> Link:
    if not isinstance(item, dict) or not isinstance(item.get("jti"), str) or not item["jti"]:
        raise ValueError("anc: each ancestor needs its jti")
    uses = item.get("max_uses")
    if uses is not None and (not isinstance(uses, int) or isinstance(uses, bool) or uses < 1):
        raise ValueError("anc: max_uses must be a positive integer")
    idle = _seconds(item["idle"]) if "idle" in item else None
    return Link(item["jti"], jws.numeric_date(item["exp"]), uses, idle)


def _actors(act: Any, depth: int) -> tuple[str, ...]:
    """The actor chain of a nested `act`, oldest first; one actor per delegation."""
    names: list[str] = []
    while act is not None:
        if not isinstance(act, dict) or not isinstance(act.get("sub"), str):
            raise TypeError("act: each actor needs its sub")
        names.append(f"{act.get('idp', '')}|{act['sub']}")
        act = act.get("act")
        if len(names) > depth:
            raise ValueError("act: more actors than delegations")
    if len(names) != depth:
        raise ValueError("act: one actor per delegation")
    return tuple(reversed(names))


def _seconds(value: Any) -> float:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError("idle: a positive number of seconds")
    return float(value)
