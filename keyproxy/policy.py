"""Who may do what: deny by default, first allowing policy wins (invariant 1).

    compile(policies) -> PolicySet
    PolicySet.decide(identity, route, method, segments, source) -> Decision   the decision
    explain(policies, identity, route, method, segments, source)
                                  -> [(policy name, "allowed" or the reason it stopped)]
    reaches_route(policy, identity, route, source) -> bool   all but method and path allow
    match_path(pattern, segments) -> bool
    client_address(peer, forwarded_for, trusted) -> the caller's address
    peer_address(peer) -> (address, text)   the TCP peer's, when no proxy is trusted

A policy is checked in five steps, and the denial reason names the furthest step any policy
reached, so an operator learns the most useful thing:

    no_policy_for_identity   no policy names this issuer, subject and claims
    source_not_allowed       ... but the request came from outside its source_cidrs
    route_not_granted        ... but it does not grant this route
    method_not_allowed       ... but not this method (HEAD only if listed, or "*")
    path_not_allowed         ... but no path pattern matches

Subjects are fnmatch-style globs matched case-sensitively (`*`, `?`, `[...]`): a subject
pattern of "*" means *any* subject, so such a policy is gated only by its issuers, claims and
source networks. Claims compare exactly as text against top-level claims of the token (JSON
true/false as "true"/"false"); a missing, list or object claim never matches. Pure: no I/O.

There is one decision path, `PolicySet.decide`, for the proxy and `keyproxy explain` alike:
it gives the answer a scan of every policy in order would give (`explain` is that scan, with
each policy's reason, for explain's output) but reads only the policies that could reach a
stage beyond "no policy for this identity": those naming the caller's subject exactly, or by
a glob. An allow needs the policy to grant the route too, so that path reads only the
policies indexed under (route, subject) and the route's glob-subject policies.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from fnmatch import fnmatchcase
from typing import Any

from keyproxy.addresses import IPAddress, unmap
from keyproxy.caller import Identity
from keyproxy.config import METHODS, Network, Policy, claim_text
from keyproxy.errors import BadRequest


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # "allowed", or the denial reason code
    policy: str | None  # the policy that allowed it


class _Stage(IntEnum):
    """How far a request got through one policy; higher is more specific."""

    NO_POLICY_FOR_IDENTITY = 0
    SOURCE_NOT_ALLOWED = 1
    ROUTE_NOT_GRANTED = 2
    METHOD_NOT_ALLOWED = 3
    PATH_NOT_ALLOWED = 4
    ALLOWED = 5

    @property
    def reason(self) -> str:
        return self.name.lower()


def _first_allowing(  # noqa: PLR0917  # the request's facts, in the order they are learnt
    policies: Sequence[Policy],
    identity: Identity,
    route: str,
    method: str,
    segments: tuple[str, ...],
    source: IPAddress,
) -> tuple[Decision | None, _Stage]:
    """The decision of the first policy that allows, else None and the furthest stage."""
    furthest = _Stage.NO_POLICY_FOR_IDENTITY
    for policy in policies:
        stage = _evaluate(policy, identity, route, method, segments, source)
        if stage is _Stage.ALLOWED:
            return Decision(True, stage.reason, policy.name), stage
        furthest = max(furthest, stage)
    return None, furthest


def explain(  # noqa: PLR0917  # the request's facts, in the order they are learnt
    policies: Sequence[Policy],
    identity: Identity,
    route: str,
    method: str,
    segments: tuple[str, ...],
    source: IPAddress,
) -> list[tuple[str, str]]:
    """Every policy with "allowed" or the reason it did not allow (the first "allowed" wins)."""
    return [
        (policy.name, _evaluate(policy, identity, route, method, segments, source).reason)
        for policy in policies
    ]


# Distinct (caller, route, method, path, source) decisions a PolicySet remembers.
DECISIONS_REMEMBERED = 2048


class PolicySet:
    """Policies indexed by route and subject; `decide` is what scanning them in order gives."""

    def __init__(self, policies: Sequence[Policy]) -> None:
        self.policies = tuple(policies)
        by_subject: dict[str, set[int]] = defaultdict(set)
        globbed: list[int] = []  # policies with a subject glob: any subject may match them
        for i, policy in enumerate(self.policies):
            for subject in policy.subjects:
                if _is_glob(subject):
                    globbed.append(i)
                    break
                by_subject[subject].add(i)
        glob_set = set(globbed)
        # Every index list is in configuration order: the first allowing policy wins.
        self._by_subject: Mapping[str, tuple[Policy, ...]] = {
            subject: self._ordered(found | glob_set) for subject, found in by_subject.items()
        }
        self._globbed = self._ordered(glob_set)
        granting: dict[tuple[str, str], set[int]] = defaultdict(set)
        glob_granting: dict[str, set[int]] = defaultdict(set)
        for i, policy in enumerate(self.policies):
            for route in policy.allow:
                if i in glob_set:
                    glob_granting[route].add(i)
                for subject in policy.subjects:
                    if not _is_glob(subject):
                        granting[route, subject].add(i)
        self._granting: Mapping[tuple[str, str], tuple[Policy, ...]] = {
            (route, subject): self._ordered(found | glob_granting.get(route, set()))
            for (route, subject), found in granting.items()
        }
        self._glob_granting: Mapping[str, tuple[Policy, ...]] = {
            route: self._ordered(found) for route, found in glob_granting.items()
        }

        # A decision depends on nothing but these facts, so it is remembered: a caller
        # repeating a request is answered with one dict look-up. Buys 42,900 instructions
        # per request (5.2%, bench/instructions.py --compare).
        self._claim_names = tuple(sorted({name for p in self.policies for name, _ in p.claims}))
        # Without source_cidrs in any policy the source decides nothing (and an address
        # object hashes in Python, not C).
        self._by_source = any(p.source_cidrs for p in self.policies)
        self._decided: dict[tuple[Any, ...], Decision] = {}

    def _ordered(self, indexes: set[int]) -> tuple[Policy, ...]:
        return tuple(self.policies[i] for i in sorted(indexes))

    def decide(
        self,
        identity: Identity,
        route: str,
        method: str,
        segments: tuple[str, ...],
        source: IPAddress,
    ) -> Decision:
        """Allow if some policy allows; otherwise deny with the most specific reason reached."""
        claims = self._claim_names
        facts = (
            identity.issuer,
            identity.subject,
            tuple(claim_text(identity.claims.get(name)) for name in claims) if claims else (),
            route,
            method,
            segments,
            source if self._by_source else None,
        )
        decision = self._decided.get(facts)
        if decision is None:
            decision = self._decide(identity, route, method, segments, source)
            if len(self._decided) >= DECISIONS_REMEMBERED:
                del self._decided[next(iter(self._decided))]  # the oldest
            self._decided[facts] = decision
        return decision

    def _decide(
        self,
        identity: Identity,
        route: str,
        method: str,
        segments: tuple[str, ...],
        source: IPAddress,
    ) -> Decision:
        subject = identity.subject
        # A policy can allow only if it grants the route and names the subject (exactly, or
        # by a glob): those few are read first, in configuration order.
        granting = self._granting.get((route, subject))
        if granting is None:
            granting = self._glob_granting.get(route, ())
        allowed, furthest = _first_allowing(granting, identity, route, method, segments, source)
        if allowed is not None:
            return allowed
        if furthest < _Stage.METHOD_NOT_ALLOWED:
            # Denied: a policy naming the subject without granting the route may still have
            # got further (to source_not_allowed or route_not_granted). Any other policy
            # stops at no_policy_for_identity.
            for policy in self._by_subject.get(subject, self._globbed):
                stage = _evaluate(policy, identity, route, method, segments, source)
                furthest = max(furthest, stage)
        return Decision(False, furthest.reason, None)


def compile(policies: Sequence[Policy]) -> PolicySet:
    """Index `policies` once, at configuration load, for the request path."""
    return PolicySet(policies)


def match_path(pattern: tuple[str, ...], segments: tuple[str, ...]) -> bool:
    """Match decoded segments: "*" is one non-empty segment, "**" any number (0 or more).

    Other pattern segments match exactly, so "/v1/" (a trailing "") matches only "/v1/",
    "/v1/**" matches "/v1", "/v1/" and everything below, and "/" matches only the root.
    """
    # Wildcard matching with backtracking to the last "**" only: linear for one "**",
    # O(len(pattern) * len(segments)) at worst, never exponential.
    p = s = 0
    star_p, star_s = -1, 0
    while s < len(segments):
        if p < len(pattern) and pattern[p] == "**":
            star_p, star_s = p, s
            p += 1
        elif p < len(pattern) and _segment_matches(pattern[p], segments[s]):
            p += 1
            s += 1
        elif star_p >= 0:
            star_s += 1
            p, s = star_p + 1, star_s
        else:
            return False
    return all(part == "**" for part in pattern[p:])


def client_address(
    peer: str, forwarded_for: Sequence[str], trusted: Sequence[Network]
) -> IPAddress:
    """The caller's address: the TCP peer, or X-Forwarded-For as told by trusted proxies.

    The header is read only when the peer is inside `trusted`, right to left, skipping
    trusted hops; the first untrusted address is the caller (the leftmost if all are
    trusted). Entries left of that one were written by the caller and are never read, so only
    a malformed entry a trusted hop vouched for is a BadRequest("bad_forwarded_for"). Empty
    list elements are ignored, as HTTP list syntax requires. Raises ValueError if `peer` is
    not an IP address (the proxy listens on TCP only).
    """
    address = peer_address(peer)[0]
    if not trusted or not _inside(address, trusted):
        return address
    entries = [e.strip() for value in forwarded_for for e in value.split(",") if e.strip()]
    for entry in reversed(entries):
        try:
            address = unmap(ipaddress.ip_address(entry))
        except ValueError:
            raise BadRequest(
                "bad_forwarded_for", "X-Forwarded-For holds an entry that is not an IP address"
            ) from None
        if not _inside(address, trusted):
            return address
    return address


# Buys 26,800 instructions per request (3.2%, bench/instructions.py --compare): ipaddress
# parses in Python.
@functools.lru_cache(maxsize=4096)
def is_trusted_proxy(peer: str, trusted: Sequence[Network]) -> bool:
    """Whether the TCP peer is one of `trusted` (`server.trusted_proxies`); a peer without an
    IP address (a Unix socket) never is."""
    try:
        return _inside(peer_address(peer)[0], trusted)
    except ValueError:
        return False


# The name under which a server connection (aiohttp's request.protocol) keeps its peer's
# `peer_address`, parsed when it connected: every request on it has the same peer, and parsing
# an address costs 2.7-3.6% of a request's instructions (bench/instructions.py --compare).
PEER = "peer"


def peer_address(peer: str) -> tuple[IPAddress, str]:
    """A TCP peer's address and its text. Raises ValueError if `peer` is not an IP address."""
    address = unmap(ipaddress.ip_address(peer))
    return address, str(address)


def _evaluate(  # noqa: PLR0917  # the request's facts, in the order they are learnt
    policy: Policy,
    identity: Identity,
    route: str,
    method: str,
    segments: tuple[str, ...],
    source: IPAddress,
) -> _Stage:
    stage = _reach(policy, identity, route, source)
    if stage is not None:
        return stage
    grant = policy.allow[route]
    # Methods are case-sensitive (RFC 9110); config stores them upper-case and expands "*".
    if method not in grant.methods and not ("*" in grant.methods and method in METHODS):
        return _Stage.METHOD_NOT_ALLOWED
    if not any(match_path(pattern, segments) for pattern in grant.paths):
        return _Stage.PATH_NOT_ALLOWED
    return _Stage.ALLOWED


def reaches_route(policy: Policy, identity: Identity, route: str, source: IPAddress) -> bool:
    """Whether `policy` names this identity, admits this source and grants `route`: all it
    has left to decide is the method and the path (what a task-token scope narrows)."""
    return _reach(policy, identity, route, source) is None


def _reach(policy: Policy, identity: Identity, route: str, source: IPAddress) -> _Stage | None:
    """The stage at which `policy` stops before the method is looked at, or None if none."""
    if not _identity_matches(policy, identity):
        return _Stage.NO_POLICY_FOR_IDENTITY
    if policy.source_cidrs and not _inside(unmap(source), policy.source_cidrs):
        return _Stage.SOURCE_NOT_ALLOWED
    if route not in policy.allow:
        return _Stage.ROUTE_NOT_GRANTED
    return None


def _identity_matches(policy: Policy, identity: Identity) -> bool:
    if policy.issuers and identity.issuer not in policy.issuers:
        return False
    # An empty subject is no identity at all, whatever "*" would say.
    if not identity.subject:
        return False
    subject = identity.subject
    if not any(pattern == subject or fnmatchcase(subject, pattern) for pattern in policy.subjects):
        return False
    return all(
        claim_text(identity.claims.get(name)) == expected for name, expected in policy.claims
    )


def _is_glob(pattern: str) -> bool:
    """Whether fnmatchcase could match `pattern` against anything but the same string."""
    return any(c in pattern for c in "*?[")


def _segment_matches(pattern: str, segment: str) -> bool:
    return segment != "" if pattern == "*" else pattern == segment


def _inside(address: IPAddress, networks: Sequence[Network]) -> bool:
    # `in` is False across IP versions, so a v4 address never matches a v6 network.
    return any(address in network for network in networks)
