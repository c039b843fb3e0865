"""Configuration compiles into typed objects; every mistake names its YAML path."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from keyproxy import config
from keyproxy.errors import ConfigError
from tests.helpers.configs import BASE, DELETE, POLICY, TEXT, edited, parse_doc, with_setting


def test_full_config_compiles_to_typed_objects() -> None:
    """A valid file becomes frozen objects with defaults filled in."""
    cfg = parse_doc(BASE)
    route = cfg.routes["openai"]
    assert route.upstream.origin == "https://api.openai.com:443"
    assert route.upstream.base_path == "/v1"
    assert route.secret == config.SecretRef("secret", "keyproxy/keys/openai", "api_key")
    assert route.caller_credential == config.CallerCredential("Authorization", "Bearer")
    policy = cfg.policies[0]
    assert dict(policy.claims) == {"repository": "acme/app", "ref_protected": "true"}
    assert policy.source_cidrs == (ipaddress.ip_network("10.0.0.0/8"),)
    assert policy.allow["openai"].paths == (("chat", "completions"), ("x", "**"))
    with pytest.raises(AttributeError):
        route.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("path", "value", "where"),
    [
        ("routes.openai.inject.0.header", "Bad Header", "routes.openai.inject[0].header"),
        ("routes.openai.inject.0.header", "X-Key\n", "routes.openai.inject[0].header"),
        ("routes.openai.inject.0", {"query": "api%25key"}, "routes.openai.inject[0].query"),
        ("routes.openai.inject.0.format", "Bearer", "routes.openai.inject[0].format"),
        ("routes.openai.inject.0.format", "{key}{key}", "routes.openai.inject[0].format"),
        ("routes.openai.inject.0", {"header": "X", "query": "k"}, "routes.openai.inject[0]"),
        ("routes.openai.inject.0", {"header": "Connection"}, "routes.openai.inject[0].header"),
        ("routes.openai.upstream", "ftp://example.com", "routes.openai.upstream"),
        ("routes.openai.upstream", "https://u:p@example.com", "routes.openai.upstream"),
        ("routes.openai.upstream", "http://api.example.com", "routes.openai.upstream"),
        ("routes.openai.secret", DELETE, "routes.openai.secret"),
        ("routes.openai.max_body", "lots", "routes.openai.max_body"),
        ("routes.openai.timeouts", {"connect": "-1s"}, "routes.openai.timeouts.connect"),
        (
            "routes.openai.egress",
            {"allow_cidrs": ["10.0.0.1/8"]},
            "routes.openai.egress.allow_cidrs[0]",
        ),
        ("routes.openai.colour", "blue", "routes.openai.colour"),
        (
            "routes.openai.caller_credential",
            {"header": "X-Agent", "scheme": "B\u00e9arer"},
            "routes.openai.caller_credential.scheme",
        ),
        (  # from a YAML block: every request would be 401
            "routes.openai.caller_credential",
            {"header": "X-Agent", "scheme": "Bearer\n"},
            "routes.openai.caller_credential.scheme",
        ),
        (  # a token as long as any issued must fit its header line
            "routes.openai.caller_credential",
            {"header": "X-" + "a" * 190, "scheme": "Token-Scheme"},
            "routes.openai.caller_credential",
        ),
        ("identity.issuers.0.algorithms", ["HS256"], "identity.issuers[0].algorithms[0]"),
        ("identity.issuers.0.algorithms", ["none"], "identity.issuers[0].algorithms[0]"),
        ("identity.issuers.0.audiences", [], "identity.issuers[0].audiences"),
        ("identity.issuers.0.leeway", "10m", "identity.issuers[0].leeway"),
        ("identity.issuers.0.jwks_file", "/x.json", "identity.issuers[0]"),
        (
            "policies.0.allow",
            {"nope": {"methods": ["GET"], "paths": ["/"]}},
            f"{POLICY}.allow.nope",
        ),
        ("policies.0.allow.openai.methods", ["FETCH"], f"{POLICY}.allow.openai.methods[0]"),
        ("policies.0.allow.openai.paths", ["/a/../b"], f"{POLICY}.allow.openai.paths[0]"),
        ("policies.0.allow.openai.paths", ["/a*"], f"{POLICY}.allow.openai.paths[0]"),
        ("policies.0.allow.openai.paths", ["no-slash"], f"{POLICY}.allow.openai.paths[0]"),
        ("policies.0.claims", {"groups": ["a"]}, f"{POLICY}.claims.groups"),
        ("policies.0.subjects", [], f"{POLICY}.subjects"),
        ("policies.0.source_cidrs", ["not-a-cidr"], f"{POLICY}.source_cidrs[0]"),
        ("vault.auth", {"method": "approle", "secret_id_file": "/s"}, "vault.auth.role_id"),
        ("vault.auth", {"method": "ldap"}, "vault.auth.method"),
        ("vault.auth", {"method": "token", "token": "s.abc"}, "vault.auth.token"),
        ("vault.max_staleness", "1s", "vault.max_staleness"),
        ("vault.refresh_interval", "10m", "vault.refresh_interval"),
        ("vault.full_refresh_interval", "1s", "vault.full_refresh_interval"),  # < refresh
        ("vault.full_refresh_interval", "151s", "vault.full_refresh_interval"),  # > staleness/2
        ("vault.max_staleness", "3s", "vault.max_staleness"),  # < 2 x refresh_interval
        ("server", {"port": 70000}, "server.port"),
        ("server", {"port": -1}, "server.port"),
        ("server", {"port": True}, "server.port"),
        ("tokens", {"max_delegation_depth": -1}, "tokens.max_delegation_depth"),
        ("tokens", {"max_delegation_depth": 99}, "tokens.max_delegation_depth"),
        ("tokens", {"max_delegation_depth": True}, "tokens.max_delegation_depth"),
    ],
)
def test_mistakes_name_their_yaml_path(path: str, value: Any, where: str) -> None:
    """Each invalid value is reported with the YAML path of the mistake."""
    with pytest.raises(ConfigError) as info:
        parse_doc(with_setting(path, value))
    assert info.value.path == where
    assert str(info.value).startswith(where + ": ")


EVIL_ROUTE = """\
  openai:
    upstream: https://evil.example
    secret: {path: keyproxy/keys/openai}
    inject: [{header: Authorization, format: "Bearer {key}"}]"""


ROUTE_KEYS = (
    "allow_http, bodies_on, caller_credential, egress, forward_underscore_headers, inject, kind, "
    "limits, max_age, max_body, mcp, owner, rotation, secret, strip_headers, timeouts, tls, "
    "upstream"
)


def _edit(line: int, new: str, *, replace: bool = False) -> str:
    """TEXT with `new` put after line `line` (1-based), or in place of it."""
    return edited(TEXT, line, new, replace=replace)


def test_the_teaching_text_compiles() -> None:
    """The text the mistakes below are made in is itself valid, so each error is the edit's."""
    assert list(config.parse(TEXT, {}).routes) == ["openai"]


TEACHING = [
    # 13.11: a key given twice, at any depth, however it is spelt, is refused with both lines.
    (
        "route",
        _edit(15, EVIL_ROUTE),
        "routes.openai: duplicate key (first at line 12, again at line 16)",
    ),
    (
        "route-quoted",
        _edit(15, EVIL_ROUTE.replace("  openai:", '  "openai":')),
        "routes.openai: duplicate key (first at line 12, again at line 16)",
    ),
    (
        "section",
        TEXT + "routes: {}\n",
        "routes: duplicate key (first at line 11, again at line 21)",
    ),
    (
        "in-a-list-item",
        _edit(7, "      issuer: https://other.example"),
        "identity.issuers[0].issuer: duplicate key (first at line 7, again at line 8)",
    ),
    (
        "in-a-policy",
        _edit(18, "    subjects: [other]"),
        f"{POLICY}.subjects: duplicate key (first at line 18, again at line 19)",
    ),
    (
        "flow-mapping",
        _edit(20, "      openai: {methods: [POST], paths: [/a], methods: [GET]}", replace=True),
        f"{POLICY}.allow.openai.methods: duplicate key "
        "(line 20: first at column 16, again at column 46)",
    ),
    (
        "int-spellings",
        _edit(18, "    claims: {1: a, 0x1: b}"),
        f"{POLICY}.claims.1: duplicate key "
        "(line 19: first at column 14, again at column 20; '0x1' is the same key as '1')",
    ),
    (
        "bool-spellings",
        _edit(18, "    claims: {on: a, true: b}"),
        f"{POLICY}.claims.True: duplicate key "
        "(line 19: first at column 14, again at column 21; 'true' is the same key as 'on')",
    ),
    (
        "same-text",
        _edit(18, "    claims: {1: a, '1': b}"),
        f"{POLICY}.claims.1: duplicate key (line 19: first at column 14, again at column 20)",
    ),
    (
        "auth-replaced",
        _edit(3, "  auth: {method: approle, role_id_file: /r, secret_id_file: /s}"),
        "vault.auth: duplicate key (first at line 3, again at line 4)",
    ),
    (
        "merge-key",
        _edit(12, "    <<: {owner: ml@example.com}"),
        "routes.openai.<<: merge keys are not supported (line 13): write the keys out; "
        "an alias such as *name can still repeat a whole value",
    ),
    (
        "merge-alias",
        "defaults: &d {owner: ml@example.com}\n" + _edit(12, "    <<: *d"),
        "routes.openai.<<: merge keys are not supported (line 14): write the keys out; "
        "an alias such as *name can still repeat a whole value",
    ),
    (
        "alias-loop",
        _edit(15, "    strip_headers: &h [X-A, *h]"),
        "not valid YAML at line 16, column 29: alias *h is inside the value it names (a loop)",
    ),
    (
        "python-tag",
        _edit(14, "    secret: !!python/object/apply:os.system [true]", replace=True),
        "not valid YAML at line 14, column 13: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.system'",
    ),
    # 14.5: YAML errors keep the parser's reason, line and column.
    (
        "tab",
        _edit(13, "\tupstream: https://api.openai.com", replace=True),
        "not valid YAML at line 13, column 1: while scanning for the next token, found "
        "character '\\t' that cannot start any token; indent with spaces, YAML does not allow "
        "tabs there",
    ),
    (
        "unclosed-list",
        _edit(9, "      audiences: [keyproxy", replace=True),
        "not valid YAML at line 10, column 17: while parsing a flow sequence (line 9, column 18), "
        "expected ',' or ']', but got ':'",
    ),
    (
        "indent",
        _edit(14, "   secret: {path: keyproxy/keys/openai}", replace=True),
        "not valid YAML at line 14, column 4: while parsing a block mapping (line 12, column 3), "
        "expected <block end>, but found '<block mapping start>'",
    ),
    (
        "colon-in-value",
        _edit(13, "    upstream: https: //api.openai.com", replace=True),
        "not valid YAML at line 13, column 20: mapping values are not allowed here",
    ),
    (
        "unknown-tag",
        _edit(14, "    secret: !vault keyproxy/keys/openai", replace=True),
        "not valid YAML at line 14, column 13: could not determine a constructor for the tag "
        "'!vault'",
    ),
    (
        "two-documents",
        TEXT + "---\nroutes: {}\n",
        "not valid YAML at line 21, column 1: expected a single document in the stream "
        "(line 1, column 1), but found another document",
    ),
    (
        "control-character",
        _edit(15, "    owner: ml\x07@example.com"),
        "not valid YAML at line 16, column 14: character U+0007: special characters are not "
        "allowed",
    ),
    # 14.5: an empty file says so.
    (
        "empty",
        "",
        "the configuration is empty: it needs at least identity and routes (docs/configuration.md)",
    ),
    (
        "only-comments",
        "# keyproxy\n\n   # to do\n",
        "the configuration is empty: it needs at least identity and routes (docs/configuration.md)",
    ),
    # 14.5: an unknown key suggests the closest valid one, wherever keys are checked.
    (
        "route-key",
        _edit(15, "    ownr: ml@example.com"),
        f"routes.openai.ownr: unknown key, did you mean owner? (expected one of: {ROUTE_KEYS})",
    ),
    (
        "route-key-case",
        _edit(15, "    Owner: ml@example.com"),
        f"routes.openai.Owner: unknown key, did you mean owner? (expected one of: {ROUTE_KEYS})",
    ),
    (
        "route-key-far",
        _edit(15, "    colour: blue"),
        f"routes.openai.colour: unknown key (expected one of: {ROUTE_KEYS})",
    ),
    (
        "section-key",
        TEXT.replace("routes:", "route:"),
        "route: unknown key, did you mean routes? "
        "(expected one of: identity, policies, routes, server, state, tokens, vault)",
    ),
    (
        "vault-key",
        _edit(2, "  adress: http://127.0.0.1:8200", replace=True),
        "vault.adress: unknown key, did you mean addr? (expected one of: addr, auth, ca_cert, "
        "full_refresh_interval, kv_mount, max_staleness, namespace, refresh_interval, timeout, "
        "tls_verify)",
    ),
    (
        "issuer-key",
        TEXT.replace("audiences:", "audience:"),
        "identity.issuers[0].audience: unknown key, did you mean audiences? (expected one of: "
        "algorithms, audiences, discovery_url, issuer, jwks_cache_ttl, jwks_file, "
        "jwks_max_staleness, jwks_refetch_cooldown, jwks_uri, leeway, max_token_lifetime, name)",
    ),
    (
        "injection-key",
        TEXT.replace("[{header: Authorization,", "[{hedaer: Authorization,"),
        "routes.openai.inject[0].hedaer: unknown key, did you mean header? "
        "(expected one of: basic, format, header, query)",
    ),
    (
        "grant-key",
        TEXT.replace("{methods: [POST]", "{method: [POST]"),
        f"{POLICY}.allow.openai.method: unknown key, did you mean methods? "
        "(expected one of: methods, paths)",
    ),
    # 14.5: a policy is named by its name.
    (
        "policy-key",
        TEXT.replace("    subjects:", "    subject:"),
        f"{POLICY}.subject: unknown key, did you mean subjects? (expected one of: allow, "
        "claims, issuers, limits, max_ttl, name, source_cidrs, subjects)",
    ),
    (
        "policy-route",
        TEXT.replace("      openai: {", "      opnai: {"),
        f"{POLICY}.allow.opnai: unknown route 'opnai', did you mean openai?",
    ),
    (
        "policy-issuer",
        _edit(17, "    issuers: [k9s]"),
        f"{POLICY}.issuers[0]: unknown issuer 'k9s', did you mean k8s?",
    ),
    (
        "policy-path",
        TEXT.replace("/v1/chat/completions", "v1/chat"),
        f"{POLICY}.allow.openai.paths[0]: must start with '/'",
    ),
    (
        "second-policy",
        TEXT + "  - name: summarizer\n    subjects: [x]\n    allow: {}\n",
        "policies[1] (summarizer).name: duplicate policy name 'summarizer'",
    ),
    (
        "unnamed-policy",
        TEXT.replace("  - name: summarizer\n    subjects:", "  - subjects:"),
        "policies[0].name: is required",
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [pytest.param(text, msg, id=name) for name, text, msg in TEACHING]
)
def test_each_mistake_gets_a_message_that_teaches(text: str, expected: str) -> None:
    """Each mistake is refused with a message naming where (path, line, column) and what."""
    with pytest.raises(ConfigError) as info:
        config.parse(text, {})
    assert str(info.value) == expected


def _approle(role_id: Path, secret_id: Path) -> config.Config:
    auth = {"method": "approle", "role_id_file": str(role_id), "secret_id_file": str(secret_id)}
    return parse_doc(with_setting("vault.auth", auth))


def _problems(cfg: config.Config) -> list[tuple[str, str]]:
    return [(p.path, p.message) for p in config.credential_problems(cfg)]


def test_credential_files_that_exist_are_no_problem(tmp_path: Path) -> None:
    """Readable, non-empty credential files give no problem (their contents are not read)."""
    role_id, secret_id, token = tmp_path / "role-id", tmp_path / "secret-id", tmp_path / "token"
    for file in (role_id, secret_id, token):
        file.write_text("x")
    assert _problems(_approle(role_id, secret_id)) == []
    token_auth = {"method": "token", "token_file": str(token)}
    assert _problems(parse_doc(with_setting("vault.auth", token_auth))) == []
    assert _problems(parse_doc(BASE)) == []  # the token from the environment: no file


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (
            lambda d: (d / "missing", d / "secret-id"),
            [("vault.auth.role_id_file", "{d}/missing: No such file or directory")],
        ),
        (
            lambda d: (d / "role-id", d / "no" / "dir"),
            [("vault.auth.secret_id_file", "{d}/no/dir: No such file or directory")],
        ),
        (lambda d: (d, d / "secret-id"), [("vault.auth.role_id_file", "{d}: not a regular file")]),
        (
            lambda d: (d / "empty", d / "empty"),
            [
                ("vault.auth.role_id_file", "{d}/empty: is empty"),
                ("vault.auth.secret_id_file", "{d}/empty: is empty"),
            ],
        ),
    ],
)
def test_credential_files_missing_empty_or_not_files_are_problems(
    tmp_path: Path,
    make: Callable[[Path], tuple[Path, Path]],
    expected: list[tuple[str, str]],
) -> None:
    """Each credential file the Vault login could not read is a problem naming its setting."""
    (tmp_path / "role-id").write_text("r")
    (tmp_path / "secret-id").write_text("s")
    (tmp_path / "empty").write_text("")
    problems = _problems(_approle(*make(tmp_path)))
    assert problems == [(path, text.format(d=tmp_path)) for path, text in expected]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_credential_files_are_problems(tmp_path: Path) -> None:
    """A credential file this user may not read is a problem before any login is tried."""
    role_id, secret_id = tmp_path / "role-id", tmp_path / "secret-id"
    role_id.write_text("r")
    secret_id.write_text("s")
    secret_id.chmod(0)
    expected = [("vault.auth.secret_id_file", f"{secret_id}: not readable by this user")]
    assert _problems(_approle(role_id, secret_id)) == expected


def test_a_missing_token_or_jwt_file_is_a_problem(tmp_path: Path) -> None:
    """The token and jwt methods' files are looked at the same way."""
    token = parse_doc(
        with_setting("vault.auth", {"method": "token", "token_file": str(tmp_path / "t")})
    )
    assert _problems(token) == [
        ("vault.auth.token_file", f"{tmp_path}/t: No such file or directory")
    ]
    jwt = {"method": "jwt", "role": "proxy", "jwt_file": str(tmp_path / "jwt")}
    assert _problems(parse_doc(with_setting("vault.auth", jwt))) == [
        ("vault.auth.jwt_file", f"{tmp_path}/jwt: No such file or directory")
    ]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(300, 300.0), (0.5, 0.5), ("500ms", 0.5), ("5m", 300.0), ("2d", 172800.0), ("300", 300.0)],
)
def test_durations_outside_the_file_read_the_same(value: Any, seconds: float) -> None:
    """parse_duration reads a token request's or option's duration in the file's syntax,
    and a number that comes as text (an option, a form field) as seconds."""
    assert config.parse_duration(value, "ttl") == seconds


@pytest.mark.parametrize(
    "value",
    [
        *[0, -1, "0s", "5 minutes", "", True, None, "1w", "0", "\u00b2", "\u0663"],
        # Too large for a float: never an OverflowError, nor an endless duration.
        *[10**400, "1" + "0" * 400, "1" + "0" * 400 + "s", float("inf"), float("nan")],
    ],
)
def test_bad_durations_outside_the_file_name_their_setting(value: Any) -> None:
    """A bad duration is a ConfigError naming the setting it was given for (digits other
    than ASCII ones too, never a ValueError from int(), nor an OverflowError)."""
    with pytest.raises(ConfigError, match=r"^--ttl: must be a positive duration"):
        config.parse_duration(value, "--ttl")


def test_bytes_that_are_not_utf8_are_refused_with_their_position() -> None:
    """A file saved in another encoding is refused naming the line and column of the first
    byte that is not UTF-8 (not the byte: it may be part of something secret)."""
    data = "identity: {}\nroutes:\n  caf\u00e9: {}\n".encode("latin-1")
    with pytest.raises(ConfigError, match=r"^the file is not UTF-8 text: line 3, column 6$"):
        config.parse_bytes(data)
