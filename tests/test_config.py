"""Configuration compiles into typed objects; every mistake names its YAML path."""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml

from keyproxy import config
from keyproxy.cli import main
from keyproxy.errors import ConfigError
from tests.support import CONFIG_SECTIONS

BASE: dict[str, Any] = {
    **CONFIG_SECTIONS,
    "routes": {
        "openai": {
            "upstream": "https://api.openai.com/v1",
            "secret": {"path": "keyproxy/keys/openai"},
            "inject": [{"header": "Authorization", "format": "Bearer {key}"}],
        }
    },
    "policies": [
        {
            "name": "summarizer",
            "subjects": ["system:serviceaccount:agents:summarizer"],
            "claims": {"repository": "acme/app", "ref_protected": True},
            "source_cidrs": ["10.0.0.0/8"],
            "allow": {"openai": {"methods": ["POST"], "paths": ["/chat/completions", "/x/**"]}},
        }
    ],
}


def _with(path: str, value: Any) -> dict[str, Any]:
    """BASE with the value at a dotted path (list indexes as numbers) replaced or deleted."""
    doc = copy.deepcopy(BASE)
    parts = path.split(".")
    node: Any = doc
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last: Any = int(parts[-1]) if isinstance(node, list) else parts[-1]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


_DELETE = object()


def _parse(doc: dict[str, Any], env: dict[str, str] | None = None) -> config.Config:
    return config.parse(yaml.safe_dump(doc), env or {})


def test_full_config_compiles_to_typed_objects() -> None:
    """A valid file becomes frozen objects with defaults filled in."""
    cfg = _parse(BASE)
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
        ("routes.openai.inject.0.format", "Bearer", "routes.openai.inject[0].format"),
        ("routes.openai.inject.0.format", "{key}{key}", "routes.openai.inject[0].format"),
        ("routes.openai.inject.0", {"header": "X", "query": "k"}, "routes.openai.inject[0]"),
        ("routes.openai.inject.0", {"header": "Connection"}, "routes.openai.inject[0].header"),
        ("routes.openai.upstream", "ftp://example.com", "routes.openai.upstream"),
        ("routes.openai.upstream", "https://u:p@example.com", "routes.openai.upstream"),
        ("routes.openai.upstream", "http://api.example.com", "routes.openai.upstream"),
        ("routes.openai.secret", _DELETE, "routes.openai.secret"),
        ("routes.openai.max_body", "lots", "routes.openai.max_body"),
        ("routes.openai.timeouts", {"connect": "-1s"}, "routes.openai.timeouts.connect"),
        (
            "routes.openai.egress",
            {"allow_cidrs": ["10.0.0.1/8"]},
            "routes.openai.egress.allow_cidrs[0]",
        ),
        ("routes.openai.colour", "blue", "routes.openai.colour"),
        ("identity.issuers.0.algorithms", ["HS256"], "identity.issuers[0].algorithms[0]"),
        ("identity.issuers.0.algorithms", ["none"], "identity.issuers[0].algorithms[0]"),
        ("identity.issuers.0.audiences", [], "identity.issuers[0].audiences"),
        ("identity.issuers.0.leeway", "10m", "identity.issuers[0].leeway"),
        ("identity.issuers.0.jwks_file", "/x.json", "identity.issuers[0]"),
        (
            "policies.0.allow",
            {"nope": {"methods": ["GET"], "paths": ["/"]}},
            "policies[0].allow.nope",
        ),
        ("policies.0.allow.openai.methods", ["FETCH"], "policies[0].allow.openai.methods[0]"),
        ("policies.0.allow.openai.paths", ["/a/../b"], "policies[0].allow.openai.paths[0]"),
        ("policies.0.allow.openai.paths", ["/a*"], "policies[0].allow.openai.paths[0]"),
        ("policies.0.allow.openai.paths", ["no-slash"], "policies[0].allow.openai.paths[0]"),
        ("policies.0.claims", {"groups": ["a"]}, "policies[0].claims.groups"),
        ("policies.0.subjects", [], "policies[0].subjects"),
        ("policies.0.source_cidrs", ["not-a-cidr"], "policies[0].source_cidrs[0]"),
        ("vault.auth", {"method": "approle", "secret_id_file": "/s"}, "vault.auth.role_id"),
        ("vault.auth", {"method": "ldap"}, "vault.auth.method"),
        ("vault.auth", {"method": "token", "token": "s.abc"}, "vault.auth.token"),
        ("vault.max_staleness", "1s", "vault.max_staleness"),
        ("vault.refresh_interval", "10m", "vault.refresh_interval"),
        ("vault.full_refresh_interval", "1s", "vault.full_refresh_interval"),  # < refresh
        ("vault.full_refresh_interval", "151s", "vault.full_refresh_interval"),  # > staleness/2
        ("vault.max_staleness", "3s", "vault.max_staleness"),  # < 2 x refresh_interval
        ("server", {"port": 70000}, "server.port"),
    ],
)
def test_mistakes_name_their_yaml_path(path: str, value: Any, where: str) -> None:
    """Each invalid value is reported with the YAML path of the mistake."""
    with pytest.raises(ConfigError) as info:
        _parse(_with(path, value))
    assert info.value.path == where
    assert str(info.value).startswith(where + ": ")


def test_full_refresh_interval_defaults_to_a_minute_within_max_staleness() -> None:
    """Every key is re-read once a minute by default, and at least twice within
    max_staleness when that is short; never more often than refresh_interval."""
    assert _parse(_with("vault.refresh_interval", "2s")).vault.full_refresh_interval == 60
    short = _with("vault.max_staleness", "30s")
    assert _parse(short).vault.full_refresh_interval == 15
    slow = _with("vault.refresh_interval", "2m")
    assert _parse(slow).vault.full_refresh_interval == 120


def test_vault_addr_comes_from_the_environment() -> None:
    """VAULT_ADDR and BAO_ADDR fill in a missing vault.addr; BAO_ADDR wins."""
    doc = _with("vault.addr", _DELETE)
    assert _parse(doc, {"VAULT_ADDR": "http://v:8200"}).vault.addr == "http://v:8200"
    both = {"VAULT_ADDR": "http://v:8200", "BAO_ADDR": "http://b:8200"}
    assert _parse(doc, both).vault.addr == "http://b:8200"
    with pytest.raises(ConfigError, match=r"^vault\.addr: "):
        _parse(doc, {})


def test_invalid_yaml_is_a_config_error() -> None:
    """Broken YAML is reported with its line, not a traceback."""
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d"):
        config.parse("routes:\n  - [unclosed\n", {})


def test_injection_kinds_compile() -> None:
    """Header, query and basic injections, and another caller credential header."""
    doc = _with(
        "routes.openai.inject",
        [
            {"header": "x-api-key"},
            {"query": "key", "format": "k-{key}"},
            {"basic": {"username": "api"}},
        ],
    )
    doc["routes"]["openai"]["caller_credential"] = {"header": "x-api-key"}
    route = _parse(doc).routes["openai"]
    assert [i.kind for i in route.inject] == ["header", "query", "basic"]
    assert route.inject[2] == config.Injection("basic", "Authorization", "{key}", "api")
    assert route.caller_credential == config.CallerCredential("x-api-key", None)


def test_check_command_exits_2_with_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`keyproxy check` prints the YAML path of the mistake and exits 2; a good file exits 0."""
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE))
    assert main(["check", "-c", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_with("routes.openai.inject.0.header", "Bad Header")))
    assert main(["check", "-c", str(bad)]) == 2
    assert "routes.openai.inject[0].header: " in capsys.readouterr().err
    assert main(["check", "-c", str(tmp_path / "missing.yaml")]) == 2
