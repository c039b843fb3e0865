"""Policy decisions: deny by default, first allowing policy wins, most specific reason reported."""

from __future__ import annotations

import ipaddress
import random
from typing import Any

import pytest

from keyproxy import policy as policy_module
from keyproxy.config import METHODS, Grant, Network, Policy
from keyproxy.errors import BadRequest
from keyproxy.identity import Identity
from keyproxy.policy import Decision, client_address, explain, match_path
from keyproxy.policy import compile as compile_policies

SA = "system:serviceaccount:agents:summarizer"
HERE = ipaddress.ip_address("10.1.2.3")


def net(*cidrs: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def pattern(text: str) -> tuple[str, ...]:
    """The segments config.py compiles a path pattern into."""
    return () if text == "/" else tuple(text[1:].split("/"))


def grant(methods: str, *paths: str) -> Grant:
    names = methods.split()
    return Grant(METHODS if "*" in names else frozenset(names), tuple(map(pattern, paths)))


def policy(name: str = "p", subjects: tuple[str, ...] = (SA,), **kw: Any) -> Policy:
    kw.setdefault("allow", {"openai": grant("POST", "/v1/chat/completions")})
    return Policy(name=name, subjects=subjects, **kw)


def ident(subject: str = SA, issuer: str = "k8s", **claims: Any) -> Identity:
    return Identity(issuer=issuer, subject=subject, claims=claims)


def ask(
    policies: list[Policy],
    identity: Identity | None = None,
    *,
    route: str = "openai",
    method: str = "POST",
    path: str = "/v1/chat/completions",
    source: str = "10.1.2.3",
) -> Decision:
    facts = (identity or ident(), route, method, pattern(path), ipaddress.ip_address(source))
    decision = compile_policies(policies).decide(*facts)
    assert decision == scanned(policies, *facts)
    return decision


STAGES = [
    "no_policy_for_identity",
    "source_not_allowed",
    "route_not_granted",
    "method_not_allowed",
    "path_not_allowed",
]


def scanned(policies: list[Policy], *facts: Any) -> Decision:
    """The decision read off explain's per-policy table: the first policy that allows, else a
    denial with the furthest reason any policy reached."""
    outcomes = explain(policies, *facts)
    allowing = [name for name, outcome in outcomes if outcome == "allowed"]
    if allowing:
        return Decision(True, "allowed", allowing[0])
    furthest = max((outcome for _, outcome in outcomes), key=STAGES.index, default=STAGES[0])
    return Decision(False, furthest, None)


@pytest.mark.parametrize(
    ("pat", "path", "matches"),
    [
        ("/", "/", True),
        ("/", "/v1", False),
        ("/", "/v1/", False),
        ("/v1/chat/completions", "/v1/chat/completions", True),
        ("/v1/chat/completions", "/v1/chat", False),
        ("/v1/chat/completions", "/v1/chat/completions/", False),
        ("/v1/chat/completions", "/V1/chat/completions", False),
        ("/v1/", "/v1/", True),
        ("/v1/", "/v1", False),
        ("/v1/*", "/v1/models", True),
        ("/v1/*", "/v1/", False),
        ("/v1/*", "/v1", False),
        ("/v1/*", "/v1/models/gpt-4", False),
        ("/v1/*/files", "/v1/abc/files", True),
        ("/v1/*/files", "/v1/files", False),
        ("/*", "/", False),
        ("/*", "/x", True),
        ("/**", "/", True),
        ("/**", "/a/b/c/", True),
        ("/v1/**", "/v1", True),
        ("/v1/**", "/v1/", True),
        ("/v1/**", "/v1/a/b", True),
        ("/v1/**", "/v2/a", False),
        ("/v1/**", "/", False),
        ("/**/completions", "/completions", True),
        ("/**/completions", "/v1/chat/completions", True),
        ("/**/completions", "/v1/chat/completions/", False),
        ("/v1/**/files/*", "/v1/files/x", True),
        ("/v1/**/files/*", "/v1/a/b/files/x", True),
        ("/v1/**/files/*", "/v1/a/b/files/", False),
        ("/**/a/**/b", "/x/a/y/a/z/b", True),
        ("/**/a/**/b", "/x/a/y/a/z/c", False),
        ("/**/**", "/", True),
        ("/a/**/**/b", "/a/b", True),
    ],
)
def test_match_path(pat: str, path: str, matches: bool) -> None:
    """'*' is one non-empty segment, '**' any number of segments, anything else exact."""
    assert match_path(pattern(pat), pattern(path)) is matches


def test_match_path_many_double_stars_is_fast() -> None:
    """A pattern full of '**' against a long path is decided without exponential backtracking."""
    pat = ("**", "a") * 30 + ("b",)
    assert match_path(pat, ("a",) * 200 + ("c",)) is False


@pytest.mark.parametrize(
    ("subjects", "subject", "allowed"),
    [
        ((SA,), SA, True),
        ((SA,), SA + "x", False),
        ((SA,), SA.upper(), False),
        (("system:serviceaccount:agents:*",), SA, True),
        (("system:serviceaccount:agents:*",), "system:serviceaccount:other:summarizer", False),
        (("system:serviceaccount:agents:summ?rizer",), SA, True),
        (("system:serviceaccount:agents:[st]ummarizer",), SA, True),
        (("repo:octo-org/*:ref:refs/heads/main",), "repo:octo-org/app:ref:refs/heads/main", True),
        (("repo:octo-org/*:ref:refs/heads/main",), "repo:octo-org/app:ref:refs/heads/dev", False),
        (("nope", SA), SA, True),
        (("*",), "anyone-at-all", True),
        (("*",), "", False),
    ],
)
def test_subjects(subjects: tuple[str, ...], subject: str, allowed: bool) -> None:
    """Subjects match exactly or as case-sensitive fnmatch globs; '*' is any non-empty subject."""
    decision = ask([policy(subjects=subjects)], ident(subject))
    assert decision.allowed is allowed
    assert decision.reason == ("allowed" if allowed else "no_policy_for_identity")


@pytest.mark.parametrize(
    ("required", "claims", "allowed"),
    [
        ((("repository", "octo-org/app"),), {"repository": "octo-org/app"}, True),
        ((("repository", "octo-org/app"),), {"repository": "octo-org/app2"}, False),
        ((("repository", "octo-org/app"),), {"repository": "Octo-Org/App"}, False),
        ((("repository", "octo-org/app"),), {}, False),
        ((("repository", "octo-org/app"),), {"repository": ["octo-org/app"]}, False),
        ((("repository", "octo-org/app"),), {"repository": None}, False),
        (
            (("repository", "octo-org/app"), ("ref", "refs/heads/main")),
            {"repository": "octo-org/app", "ref": "refs/heads/dev"},
            False,
        ),
        (
            (("repository", "octo-org/app"), ("ref", "refs/heads/main")),
            {"repository": "octo-org/app", "ref": "refs/heads/main", "actor": "x"},
            True,
        ),
        ((("ci", "true"),), {"ci": True}, True),
        ((("ci", "true"),), {"ci": False}, False),
        ((("ci", "false"),), {"ci": False}, True),
        ((("ci", "true"),), {"ci": "true"}, True),
        ((("ci", "true"),), {"ci": 1}, False),
        ((("run", "42"),), {"run": 42}, True),
        ((("run", "42"),), {"run": 42.0}, False),
        ((("groups", "admins"),), {"groups": ["admins"]}, False),
        ((("groups", "admins"),), {"groups": {"admins": True}}, False),
    ],
)
def test_claims(
    required: tuple[tuple[str, str], ...], claims: dict[str, Any], allowed: bool
) -> None:
    """Every required claim must be present and equal as text; lists and objects never match."""
    decision = ask([policy(claims=required)], ident(**claims))
    assert decision.allowed is allowed


@pytest.mark.parametrize(
    ("issuers", "issuer", "allowed"),
    [
        ((), "k8s", True),
        ((), "github", True),
        (("k8s",), "k8s", True),
        (("k8s",), "github", False),
        (("github", "k8s"), "k8s", True),
    ],
)
def test_issuers(issuers: tuple[str, ...], issuer: str, allowed: bool) -> None:
    """A policy with issuers applies only to identities from one of them; none means any."""
    decision = ask([policy(issuers=issuers)], ident(issuer=issuer))
    assert decision.allowed is allowed


@pytest.mark.parametrize(
    ("cidrs", "source", "allowed"),
    [
        ((), "203.0.113.9", True),
        (("10.0.0.0/8",), "10.1.2.3", True),
        (("10.0.0.0/8",), "11.1.2.3", False),
        (("10.0.0.0/8",), "::ffff:10.1.2.3", True),
        (("10.0.0.0/8",), "::ffff:11.1.2.3", False),
        (("10.0.0.0/8",), "fd00::1", False),
        (("fd00::/8",), "fd00::1", True),
        (("fd00::/8",), "fe80::1", False),
        (("fd00::/8",), "10.1.2.3", False),
        (("192.168.0.0/16", "fd00::/8"), "fd12::5", True),
        (("::ffff:0:0/96",), "10.1.2.3", False),
    ],
)
def test_source_cidrs(cidrs: tuple[str, ...], source: str, allowed: bool) -> None:
    """source_cidrs restricts the caller's address; IPv4-mapped IPv6 counts as its IPv4."""
    decision = ask([policy(source_cidrs=net(*cidrs))], source=source)
    assert decision.allowed is allowed
    assert decision.reason == ("allowed" if allowed else "source_not_allowed")


@pytest.mark.parametrize(
    ("methods", "method", "allowed"),
    [
        ("POST", "POST", True),
        ("POST", "GET", False),
        ("POST", "post", False),
        ("GET", "HEAD", False),
        ("GET HEAD", "HEAD", True),
        ("*", "HEAD", True),
        ("*", "DELETE", True),
        ("*", "PROPFIND", False),
        ("GET POST", "POST", True),
    ],
)
def test_methods(methods: str, method: str, allowed: bool) -> None:
    """Only listed methods are allowed, compared case-sensitively; HEAD needs listing or '*'."""
    pol = policy(allow={"openai": grant(methods, "/**")})
    decision = ask([pol], method=method)
    assert decision.allowed is allowed
    assert decision.reason == ("allowed" if allowed else "method_not_allowed")


def test_grant_with_literal_star_method() -> None:
    """A Grant built with a literal '*' (not via config) still means any known method."""
    pol = policy(allow={"openai": Grant(frozenset({"*"}), (("**",),))})
    assert ask([pol], method="HEAD").allowed
    assert not ask([pol], method="BREW").allowed


@pytest.mark.parametrize(
    ("paths", "path", "allowed"),
    [
        (("/v1/chat/completions",), "/v1/chat/completions", True),
        (("/v1/chat/completions",), "/v1/chat/completions/", False),
        (("/v1/chat/completions",), "/v1/embeddings", False),
        (("/v1/chat/completions", "/v1/embeddings"), "/v1/embeddings", True),
        (("/v1/files/*",), "/v1/files/file-abc", True),
        (("/v1/files/*",), "/v1/files/", False),
        (("/v1/**",), "/v1/anything/at/all", True),
        (("/v1/**",), "/v2/x", False),
        (("/",), "/", True),
        (("/",), "/v1", False),
        (("/**",), "/", True),
    ],
)
def test_paths(paths: tuple[str, ...], path: str, allowed: bool) -> None:
    """Some path pattern of the grant must match the normalised segments."""
    pol = policy(allow={"openai": grant("POST", *paths)})
    decision = ask([pol], path=path)
    assert decision.allowed is allowed
    assert decision.reason == ("allowed" if allowed else "path_not_allowed")


def test_no_policies_denies() -> None:
    """With no policies at all, everything is denied (deny by default)."""
    assert ask([]) == Decision(False, "no_policy_for_identity", None)


def test_route_not_granted() -> None:
    """A matching identity on a route its policy does not name is route_not_granted."""
    assert ask([policy()], route="anthropic") == Decision(False, "route_not_granted", None)


def test_allowed_names_the_policy() -> None:
    """An allowed decision names the policy that allowed it."""
    assert ask([policy("summarizer")]) == Decision(True, "allowed", "summarizer")


OTHER = "system:serviceaccount:agents:other"
POLICIES = [
    policy("wrong-subject", subjects=(OTHER,)),
    policy("wrong-source", source_cidrs=net("192.168.0.0/16")),
    policy("other-route", allow={"anthropic": grant("*", "/**")}),
    policy("get-only", allow={"openai": grant("GET", "/**")}),
    policy("embeddings", allow={"openai": grant("POST", "/v1/embeddings")}),
    policy("chat", allow={"openai": grant("POST", "/v1/chat/**")}),
    policy("chat-again", allow={"openai": grant("POST", "/v1/chat/**")}),
]


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        (1, Decision(False, "no_policy_for_identity", None)),
        (2, Decision(False, "source_not_allowed", None)),
        (3, Decision(False, "route_not_granted", None)),
        (4, Decision(False, "method_not_allowed", None)),
        (5, Decision(False, "path_not_allowed", None)),
        (6, Decision(True, "allowed", "chat")),
        (7, Decision(True, "allowed", "chat")),
    ],
)
def test_multiple_policies_report_furthest_reason(count: int, expected: Decision) -> None:
    """Across policies the most specific denial wins, and the first allowing policy is named."""
    assert ask(POLICIES[:count]) == expected


@pytest.mark.parametrize("order", [1, -1])
def test_reason_does_not_depend_on_policy_order(order: int) -> None:
    """The denial reason is the furthest stage reached, whatever order the policies are in."""
    assert ask(POLICIES[:5][::order]).reason == "path_not_allowed"


def test_explain_lists_every_policy() -> None:
    """explain gives each policy's own outcome, in order, including every allowing one."""
    assert explain(POLICIES, ident(), "openai", "POST", ("v1", "chat", "completions"), HERE) == [
        ("wrong-subject", "no_policy_for_identity"),
        ("wrong-source", "source_not_allowed"),
        ("other-route", "route_not_granted"),
        ("get-only", "method_not_allowed"),
        ("embeddings", "path_not_allowed"),
        ("chat", "allowed"),
        ("chat-again", "allowed"),
    ]


TRUSTED = net("10.0.0.0/8", "fd00::/8")


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        # untrusted peer: the header is ignored entirely, even when malformed
        ("203.0.113.7", [], "203.0.113.7"),
        ("203.0.113.7", ["198.51.100.1"], "203.0.113.7"),
        ("203.0.113.7", ["not-an-ip, 10.0.0.1"], "203.0.113.7"),
        ("::ffff:203.0.113.7", ["198.51.100.1"], "203.0.113.7"),
        # trusted peer: right to left, skipping trusted hops
        ("10.0.0.1", [], "10.0.0.1"),
        ("10.0.0.1", ["198.51.100.1"], "198.51.100.1"),
        ("10.0.0.1", ["1.1.1.1, 198.51.100.1"], "198.51.100.1"),
        ("10.0.0.1", ["1.1.1.1, 198.51.100.1, 10.9.9.9"], "198.51.100.1"),
        ("10.0.0.1", ["1.1.1.1", "198.51.100.1", "10.9.9.9"], "198.51.100.1"),
        ("10.0.0.1", ["1.1.1.1, 198.51.100.1", "10.9.9.9, 10.8.8.8"], "198.51.100.1"),
        ("10.0.0.1", ["10.5.5.5, 10.9.9.9"], "10.5.5.5"),
        ("::ffff:10.0.0.1", ["198.51.100.1"], "198.51.100.1"),
        ("fd00::1", ["2001:db8::5, fd00::9"], "2001:db8::5"),
        ("10.0.0.1", ["::ffff:198.51.100.1"], "198.51.100.1"),
        ("10.0.0.1", ["::ffff:10.3.3.3, 198.51.100.1"], "198.51.100.1"),
        ("10.0.0.1", ["  198.51.100.1  ,10.2.2.2 "], "198.51.100.1"),
        ("10.0.0.1", ["198.51.100.1,,10.2.2.2,"], "198.51.100.1"),
        ("10.0.0.1", [""], "10.0.0.1"),
        # entries left of the caller were written by the caller and are never read
        ("10.0.0.1", ["garbage, 198.51.100.1"], "198.51.100.1"),
    ],
)
def test_client_address(peer: str, forwarded: list[str], expected: str) -> None:
    """X-Forwarded-For is believed only from trusted peers, read right to left past them."""
    assert client_address(peer, forwarded, TRUSTED) == ipaddress.ip_address(expected)


@pytest.mark.parametrize(
    "forwarded",
    [
        ["not-an-ip"],
        ["198.51.100.1:443"],
        ["[2001:db8::1]"],
        ["unknown, 10.2.2.2"],
        ["198.51.100.1, 10.2.2.2", "bogus"],
        ["10.0.0.256"],
    ],
)
def test_client_address_refuses_malformed_trusted_entries(forwarded: list[str]) -> None:
    """A malformed entry reached behind a trusted peer is a BadRequest("bad_forwarded_for")."""
    with pytest.raises(BadRequest) as caught:
        client_address("10.0.0.1", forwarded, TRUSTED)
    assert caught.value.reason == "bad_forwarded_for"


def test_client_address_without_trusted_proxies() -> None:
    """With no trusted proxies configured, the peer is always the caller."""
    assert client_address("10.0.0.1", ["198.51.100.1"], ()) == ipaddress.ip_address("10.0.0.1")


# ---------------------------------------------------------------------------- the index


def _random_policies(rng: random.Random, count: int) -> list[Policy]:
    subjects = ["alice", "bob", "carol", "svc-*", "b?b", "[ab]*", "*"]
    routes = ["openai", "github", "slack"]
    result = []
    for i in range(count):
        allow = {
            route: grant(rng.choice(["GET", "POST", "GET POST", "*"]), *rng.sample(PATHS, 2))
            for route in rng.sample(routes, rng.randint(0, 2))
        }
        result.append(
            Policy(
                name=f"p{i}",
                subjects=tuple(rng.sample(subjects, rng.randint(1, 2))),
                issuers=tuple(rng.sample(["k8s", "gha"], rng.randint(0, 1))),
                claims=(("team", "ml"),) if rng.random() < 0.2 else (),
                source_cidrs=net("10.0.0.0/8") if rng.random() < 0.3 else (),
                allow=allow,
            )
        )
    return result


PATHS = ["/v1/models", "/v1/**", "/v1/*/files", "/", "/v2/chat"]


def test_policy_set_decides_as_explain_reads_every_policy() -> None:
    """compile(policies).decide gives the Decision read off explain's table over a seeded random
    table, also when asked again (from what it remembers) and for callers differing only by a
    claim."""
    rng = random.Random(5)
    for _ in range(40):
        policies = _random_policies(rng, rng.randint(0, 12))
        indexed = compile_policies(policies)
        asked = []
        for _ in range(40):
            who = ident(
                subject=rng.choice(["alice", "bob", "svc-a", "b0b", "zed", "carol"]),
                issuer=rng.choice(["k8s", "gha"]),
                **({"team": "ml"} if rng.random() < 0.5 else {}),
            )
            facts = (
                who,
                rng.choice(["openai", "github", "slack", "nope"]),
                rng.choice(["GET", "POST", "DELETE"]),
                pattern(rng.choice(["/v1/models", "/v1/x/files", "/", "/v2/chat", "/v3"])),
                ipaddress.ip_address(rng.choice(["10.1.2.3", "192.0.2.1"])),
            )
            assert indexed.decide(*facts) == scanned(policies, *facts)
            asked.append(facts)
        for facts in reversed(asked):
            assert indexed.decide(*facts) == scanned(policies, *facts)


@pytest.mark.parametrize(
    ("pol", "who", "route", "source", "expected"),
    [
        (policy(), ident(), "openai", "10.1.2.3", True),
        (policy(), ident(), "github", "10.1.2.3", False),  # route not granted
        (policy(), ident("someone-else"), "openai", "10.1.2.3", False),  # not this identity
        (policy(issuers=("gha",)), ident(), "openai", "10.1.2.3", False),  # not this issuer
        (policy(claims=(("team", "ml"),)), ident(team="ml"), "openai", "10.1.2.3", True),
        (policy(claims=(("team", "ml"),)), ident(team="ops"), "openai", "10.1.2.3", False),
        (policy(source_cidrs=net("10.0.0.0/8")), ident(), "openai", "10.1.2.3", True),
        (policy(source_cidrs=net("10.0.0.0/8")), ident(), "openai", "::ffff:10.1.2.3", True),
        (policy(source_cidrs=net("10.0.0.0/8")), ident(), "openai", "192.0.2.1", False),
    ],
)
def test_reaches_route_ignores_only_method_and_path(
    pol: Policy, who: Identity, route: str, source: str, expected: bool
) -> None:
    """A policy reaches a route when identity, source and route pass, whatever the method."""
    assert policy_module.reaches_route(pol, who, route, ipaddress.ip_address(source)) is expected


def test_reaches_route_is_the_stage_explain_gets_past() -> None:
    """reaches_route is True exactly when explain stops at the method, the path or allows."""
    rng = random.Random(7)
    reached = {"method_not_allowed", "path_not_allowed", "allowed"}
    for _ in range(400):
        pol = _random_policies(rng, 1)[0]
        who = ident(
            subject=rng.choice(["alice", "bob", "svc-a", "b0b", "zed", "carol"]),
            issuer=rng.choice(["k8s", "gha"]),
            **({"team": "ml"} if rng.random() < 0.5 else {}),
        )
        route = rng.choice(["openai", "github", "slack", "nope"])
        source = ipaddress.ip_address(rng.choice(["10.1.2.3", "192.0.2.1"]))
        method = rng.choice(["GET", "POST", "DELETE"])
        path = pattern(rng.choice(["/v1/models", "/", "/v3"]))
        stage = explain([pol], who, route, method, path, source)[0][1]
        assert policy_module.reaches_route(pol, who, route, source) is (stage in reached)


def test_a_remembered_decision_still_depends_on_the_source() -> None:
    """The same request from inside and then from outside a policy's source_cidrs is allowed
    and then refused, in either order, although the first decision is remembered; without
    source_cidrs in any policy the source changes nothing."""
    fenced = compile_policies([policy(source_cidrs=net("10.0.0.0/8"))])
    inside, outside = ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("192.0.2.1")
    facts = (ident(), "openai", "POST", pattern("/v1/chat/completions"))
    for order in ([inside, outside, inside], [outside, inside, outside]):
        got = [fenced.decide(*facts, source).allowed for source in order]
        assert got == [source == inside for source in order]
    open_to_all = compile_policies([policy()])
    assert open_to_all.decide(*facts, inside) == open_to_all.decide(*facts, outside)
    assert open_to_all.decide(*facts, outside).allowed


def test_policy_set_reads_only_the_callers_policies(monkeypatch: pytest.MonkeyPatch) -> None:
    """With 1,000 policies for other subjects, an allow and a denial each read one policy."""
    others = [
        policy(f"other-{i}", subjects=(f"agent-{i}",), allow={f"r{i}": grant("GET", "/**")})
        for i in range(1000)
    ]
    indexed = compile_policies([*others, policy("mine")])
    read: list[str] = []
    original = policy_module._evaluate

    def counting(p: Policy, *facts: Any) -> Any:
        read.append(p.name)
        return original(p, *facts)

    monkeypatch.setattr(policy_module, "_evaluate", counting)
    facts = (ident(), "openai", "POST", pattern("/v1/chat/completions"), HERE)
    assert indexed.decide(*facts) == Decision(True, "allowed", "mine")
    assert read == ["mine"]
    read.clear()
    denied = indexed.decide(ident(), "r7", "GET", pattern("/x"), HERE)
    assert denied == Decision(False, "route_not_granted", None)
    assert read == ["mine"]


def test_remembered_decisions_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Callers sending ever new paths cannot grow the remembered decisions past the bound."""
    monkeypatch.setattr(policy_module, "DECISIONS_REMEMBERED", 3)
    indexed = compile_policies([policy("mine")])
    for i in range(10):
        facts = (ident(), "openai", "GET", pattern(f"/v1/models/m{i}"), HERE)
        assert indexed.decide(*facts) == scanned([policy("mine")], *facts)
    assert len(indexed._decided) == 3
