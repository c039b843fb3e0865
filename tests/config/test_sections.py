"""keyproxy.config.sections: the vault, identity, server and tokens sections."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from keyproxy import config
from keyproxy import config as config_module
from keyproxy.devserver import Agent, OpenBaoDevServer
from keyproxy.errors import ConfigError
from tests.helpers.configs import CONFIG_SECTIONS, DELETE, parse_doc, with_setting
from tests.helpers.servers import (
    token_config,
)


def _config_with_issuer(**settings: Any) -> dict[str, Any]:
    doc = copy.deepcopy(CONFIG_SECTIONS)
    doc["identity"]["issuers"][0].update(settings)
    doc["routes"] = {
        "r": {
            "upstream": "https://api.example.com",
            "secret": {"path": "keyproxy/keys/r"},
            "inject": [{"header": "Authorization", "format": "Bearer {key}"}],
        }
    }
    return doc


def test_issuer_staleness_and_lifetime_settings() -> None:
    """jwks_max_staleness defaults to a day and max_token_lifetime to no limit; both read
    durations."""
    default = config.parse(json.dumps(_config_with_issuer()), {}).identity[0]
    assert (default.jwks_max_staleness, default.max_token_lifetime) == (86400.0, None)
    issuer = config.parse(
        json.dumps(_config_with_issuer(jwks_max_staleness="6h", max_token_lifetime="2h")), {}
    ).identity[0]
    assert (issuer.jwks_max_staleness, issuer.max_token_lifetime) == (21600.0, 7200.0)


@pytest.mark.parametrize(
    ("settings", "where"),
    [
        ({"jwks_max_staleness": "10m"}, "identity.issuers[0].jwks_max_staleness"),
        ({"jwks_cache_ttl": "48h"}, "identity.issuers[0].jwks_cache_ttl"),
        ({"max_token_lifetime": "0s"}, "identity.issuers[0].max_token_lifetime"),
        ({"max_token_lifetime": "forever"}, "identity.issuers[0].max_token_lifetime"),
        ({"name": "k8s|prod"}, "identity.issuers[0].name"),
        ({"name": "k8s,prod"}, "identity.issuers[0].name"),
        ({"name": "exception"}, "identity.issuers[0].name"),
    ],
)
def test_bad_issuer_settings_are_refused(settings: dict[str, Any], where: str) -> None:
    """A max staleness below the cache TTL, a lifetime that is no duration, or a name that
    holds the separator of the revocation list's "issuer|subject" keys (or of the audit's
    list of actors) or is the exception tokens' issuer is refused with its YAML path."""
    with pytest.raises(ConfigError) as caught:
        config.parse(json.dumps(_config_with_issuer(**settings)), {})
    assert caught.value.path == where


def test_key_refresh_settings(openbao: OpenBaoDevServer, agent: Agent) -> None:
    """The Transit keys are re-read every minute and trusted for an hour by default; a max
    staleness below the refresh interval is refused with its YAML path."""
    doc = token_config(openbao, agent, "http://127.0.0.1:1")
    tokens = config_module.parse(json.dumps(doc), {}).tokens
    assert (tokens.key_refresh_interval, tokens.key_max_staleness) == (60.0, 3600.0)
    doc["tokens"] |= {"key_refresh_interval": "5m", "key_max_staleness": "1m"}
    with pytest.raises(ConfigError) as caught:
        config_module.parse(json.dumps(doc), {})
    assert caught.value.path == "tokens.key_max_staleness"


def test_revocation_staleness_settings(openbao: OpenBaoDevServer, agent: Agent) -> None:
    """A task token is judged by a revocation list read within 2 s by default; a bound not
    longer than the poll interval is refused with the YAML path of what was set."""
    doc = token_config(openbao, agent, "http://127.0.0.1:1")
    del doc["tokens"]["revocation_poll_interval"]
    tokens = config_module.parse(json.dumps(doc), {}).tokens
    assert (tokens.revocation_poll_interval, tokens.revocation_max_staleness) == (1.0, 2.0)
    for settings, where in (
        ({"revocation_max_staleness": "1s"}, "tokens.revocation_max_staleness"),
        ({"revocation_max_staleness": "500ms"}, "tokens.revocation_max_staleness"),
        ({"revocation_poll_interval": "2s"}, "tokens.revocation_poll_interval"),
    ):
        with pytest.raises(ConfigError) as caught:
            config_module.parse(json.dumps(doc | {"tokens": doc["tokens"] | settings}), {})
        assert caught.value.path == where, settings


def _server_config(server: dict[str, Any]) -> Any:

    route = {
        "upstream": "https://api.example.com",
        "secret": {"path": "k"},
        "inject": [{"header": "Authorization"}],
    }
    return config.parse(
        json.dumps({**CONFIG_SECTIONS, "server": server, "routes": {"r": route}}), {}
    ).server


def test_connection_limits_and_the_admin_listener_have_safe_defaults() -> None:
    """Unset, the limits are 10 s for headers, 60 s idle, 10,000 connections, 1,000 per
    source, and the admin listener is on loopback, port 9090."""
    server = _server_config({})
    assert (server.header_timeout, server.keepalive_timeout) == (10.0, 60.0)
    assert (server.max_connections, server.max_connections_per_source) == (10_000, 1_000)
    assert (server.admin.host, server.admin.port) == ("127.0.0.1", 9090)
    custom = _server_config(
        {"header_timeout": "2s", "max_connections": 5, "admin": {"host": "::1", "port": 9}}
    )
    assert (custom.header_timeout, custom.max_connections) == (2.0, 5)
    assert (custom.admin.host, custom.admin.port) == ("::1", 9)


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ({"header_timeout": "0s"}, "server.header_timeout: must be a positive duration"),
        ({"max_connections": 0}, "server.max_connections: must be a positive whole number"),
        ({"max_connections_per_source": True}, "must be a positive whole number"),
        ({"admin": {"port": 70000}}, "server.admin.port: must be a port number"),
        ({"admin": {"prot": 1}}, "server.admin.prot: unknown key"),
        ({"port": 9000, "admin": {"port": 9000}}, "server.admin: must listen on another port"),
    ],
)
def test_bad_connection_settings_are_refused(server: dict[str, Any], message: str) -> None:
    """Each bad listener setting is refused with its YAML path."""
    with pytest.raises(ConfigError) as caught:
        _server_config(server)
    assert message in str(caught.value)


def test_full_refresh_interval_defaults_to_a_minute_within_max_staleness() -> None:
    """Every key is re-read once a minute by default, and at least twice within
    max_staleness when that is short; never more often than refresh_interval."""
    assert parse_doc(with_setting("vault.refresh_interval", "2s")).vault.full_refresh_interval == 60
    short = with_setting("vault.max_staleness", "30s")
    assert parse_doc(short).vault.full_refresh_interval == 15
    slow = with_setting("vault.refresh_interval", "2m")
    assert parse_doc(slow).vault.full_refresh_interval == 120


def test_vault_addr_comes_from_the_environment() -> None:
    """VAULT_ADDR and BAO_ADDR fill in a missing vault.addr; BAO_ADDR wins."""
    doc = with_setting("vault.addr", DELETE)
    assert parse_doc(doc, {"VAULT_ADDR": "http://v:8200"}).vault.addr == "http://v:8200"
    both = {"VAULT_ADDR": "http://v:8200", "BAO_ADDR": "http://b:8200"}
    assert parse_doc(doc, both).vault.addr == "http://b:8200"
    with pytest.raises(ConfigError, match=r"^vault\.addr: "):
        parse_doc(doc, {})


@pytest.mark.parametrize(
    ("auth", "where", "message"),
    [
        ({"method": "approle"}, "vault.auth.role_id", "set exactly one of role_id, role_id_file"),
        ({"method": "approle", "secret_id_file": "/s"}, "vault.auth.role_id", "exactly one"),
        ({"method": "approle", "role_id_file": "/r"}, "vault.auth.secret_id_file", "is required"),
        ({"method": "approle", "role_id": "r"}, "vault.auth.secret_id_file", "is required"),
        (
            {"method": "approle", "role_id": "r", "role_id_file": "/r", "secret_id_file": "/s"},
            "vault.auth.role_id",
            "exactly one",
        ),
        (
            {"method": "approle", "role_id_file": None, "secret_id_file": "/s"},
            "vault.auth.role_id_file",
            "non-empty string",
        ),
        (
            {"method": "approle", "role_id_file": "", "secret_id_file": "/s"},
            "vault.auth.role_id_file",
            "non-empty string",
        ),
        (
            {"method": "approle", "role_id_file": "/r", "secret_id_file": " "},
            "vault.auth.secret_id_file",
            "whitespace",
        ),
        (
            {"method": "approle", "role_id_file": "/r ", "secret_id_file": "/s"},
            "vault.auth.role_id_file",
            "whitespace",
        ),
        (
            {"method": "approle", "role_id_file": ["/r"], "secret_id_file": "/s"},
            "vault.auth.role_id_file",
            "string",
        ),
    ],
)
def test_approle_needs_a_role_id_and_a_secret_id_file(
    auth: dict[str, Any], where: str, message: str
) -> None:
    """AppRole without its role_id (or role_id_file) and secret_id_file is refused."""
    with pytest.raises(ConfigError) as info:
        parse_doc(with_setting("vault.auth", auth))
    assert info.value.path == where
    assert message in info.value.message


TLS = {
    "certificate": "/etc/keyproxy/tls.crt",
    "key": "/etc/keyproxy/tls.key",
    "client_auth": "optional",
    "trust_bundles": {"example.org": "/etc/spire/bundle.json"},
}


def test_listener_tls_settings() -> None:
    """server.tls and server.admin.tls read the certificate, key, client_auth and one trust
    bundle per trust domain; client_auth defaults to none and TLS to off."""
    assert _server_config({}).tls is None
    server = _server_config(
        {"tls": TLS, "admin": {"tls": {"certificate": "/a.crt", "key": "/a.key"}}}
    )
    assert server.tls == config.ListenerTLS(
        Path("/etc/keyproxy/tls.crt"),
        Path("/etc/keyproxy/tls.key"),
        "optional",
        (("example.org", Path("/etc/spire/bundle.json")),),
    )
    assert server.admin.tls == config.ListenerTLS(Path("/a.crt"), Path("/a.key"))


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        ({**TLS, "client_auth": "sometimes"}, "server.tls.client_auth: must be one of"),
        ({**TLS, "trust_bundles": {}}, "server.tls.trust_bundles: client_auth optional needs"),
        ({**TLS, "client_auth": "none"}, "server.tls.trust_bundles: is only read with"),
        ({**TLS, "trust_bundles": {"Example.org": "/b"}}, "server.tls.trust_bundles.Example.org"),
        ({k: v for k, v in TLS.items() if k != "key"}, "server.tls.key: is required"),
        ({**TLS, "cert": "/c"}, "server.tls.cert: unknown key"),
    ],
)
def test_bad_listener_tls_settings_are_refused(tls: dict[str, Any], message: str) -> None:
    """Each bad TLS setting is refused with its YAML path."""
    with pytest.raises(ConfigError) as caught:
        _server_config({"tls": tls})
    assert message in str(caught.value)


def test_the_admin_listener_takes_client_certificates_required_or_not_at_all() -> None:
    """server.admin.tls refuses client_auth optional: the admin listener has no other
    credential, so a caller without a certificate would reach /reload and the detailed
    /readyz, and one with a certificate that is no valid SVID would too."""
    with pytest.raises(ConfigError) as caught:
        _server_config({"admin": {"tls": TLS}})
    assert caught.value.path == "server.admin.tls.client_auth"
    assert "required or none" in caught.value.message
    server = _server_config({"admin": {"tls": {**TLS, "client_auth": "required"}}})
    assert server.admin.tls is not None
    assert server.admin.tls.client_auth == "required"


def test_the_admin_listeners_names_are_host_names_as_a_host_header_gives_them() -> None:
    """server.admin.hosts are compared with a request's Host: written in any case or as an
    absolute name (a final dot) they are kept in that form; one with a port or an address's
    brackets could never match and is refused with its path."""
    server = _server_config({"admin": {"hosts": ["Keyproxy-Admin.monitoring.svc.cluster.local."]}})
    assert server.admin.hosts == ("keyproxy-admin.monitoring.svc.cluster.local",)
    for wrong in ("admin.test:9090", "[::1]", ""):
        with pytest.raises(ConfigError) as caught:
            _server_config({"admin": {"hosts": ["ok.test", wrong]}})
        assert caught.value.path == "server.admin.hosts[1]", wrong


def test_forwarded_client_cert_settings() -> None:
    """server.tls.forwarded_client_cert reads a format and a header defaulting by format."""
    expected = (
        config.ForwardedClientCert("x-forwarded-client-cert", "xfcc"),
        config.ForwardedClientCert("ssl-client-cert", "escaped_pem"),
    )
    for want in expected:
        tls = {**TLS, "forwarded_client_cert": {"format": want.format}}
        server = _server_config({"tls": tls, "trusted_proxies": ["10.0.0.1/32"]})
        assert server.tls is not None
        assert server.tls.forwarded_client_cert == want
    tls = {**TLS, "forwarded_client_cert": {"format": "escaped_pem", "header": "X-SSL-Client-Cert"}}
    server = _server_config({"tls": tls, "trusted_proxies": ["10.0.0.1/32"]})
    assert server.tls is not None
    forwarded = server.tls.forwarded_client_cert
    assert forwarded == config.ForwardedClientCert("x-ssl-client-cert", "escaped_pem")


@pytest.mark.parametrize(
    ("server", "message"),
    [
        (
            {"tls": {**TLS, "forwarded_client_cert": {"format": "xfcc"}}},
            "server.tls: forwarded_client_cert needs server.trusted_proxies",
        ),
        (
            {
                "tls": {**TLS, "forwarded_client_cert": {"format": "pem"}},
                "trusted_proxies": ["10.0.0.1/32"],
            },
            "server.tls.forwarded_client_cert.format: must be one of",
        ),
        (
            {
                "tls": {**TLS, "forwarded_client_cert": {"format": "xfcc", "header": "x-cert"}},
                "trusted_proxies": ["10.0.0.1/32"],
            },
            "server.tls.forwarded_client_cert.header: must hold client-cert",
        ),
        (
            {
                "tls": {
                    "certificate": "/c",
                    "key": "/k",
                    "forwarded_client_cert": {"format": "xfcc"},
                },
                "trusted_proxies": ["10.0.0.1/32"],
            },
            "server.tls.forwarded_client_cert: needs client_auth",
        ),
        (
            {"admin": {"tls": {**TLS, "forwarded_client_cert": {"format": "xfcc"}}}},
            "server.admin.tls.forwarded_client_cert: unknown key",
        ),
    ],
    ids=["no-trusted-proxies", "bad-format", "header-name", "no-client-auth", "admin"],
)
def test_bad_forwarded_client_cert_settings_are_refused(
    server: dict[str, Any], message: str
) -> None:
    """Each bad forwarded_client_cert setting is refused with its YAML path."""
    with pytest.raises(ConfigError) as caught:
        _server_config(server)
    assert message in str(caught.value)


def _svid_policy_config(issuers: list[str], issuer_name: str = "bao") -> dict[str, Any]:
    doc = _config_with_issuer(name=issuer_name)
    doc["server"] = {"tls": TLS}
    doc["policies"] = [
        {
            "name": "p",
            "issuers": issuers,
            "subjects": ["spiffe://example.org/*"],
            "allow": {"r": {"methods": ["GET"], "paths": ["/**"]}},
        }
    ]
    return doc


def test_policies_name_svid_callers_by_their_trust_domain() -> None:
    """A policy names X.509-SVID callers' issuer as spiffe://<trust domain>, for a trust
    domain the proxy listener accepts; another is an unknown issuer."""
    compiled = config.parse(json.dumps(_svid_policy_config(["spiffe://example.org"])), {})
    assert compiled.policies[0].issuers == ("spiffe://example.org",)
    with pytest.raises(ConfigError) as caught:
        config.parse(json.dumps(_svid_policy_config(["spiffe://partner.org"])), {})
    assert caught.value.path == "policies[0] (p).issuers[0]"


def test_a_jwt_issuer_may_not_pose_as_a_trust_domain() -> None:
    """An identity issuer named spiffe://... is refused: that name is an SVID caller's."""
    doc = _svid_policy_config(["spiffe://example.org"], issuer_name="spiffe://example.org")
    with pytest.raises(ConfigError) as caught:
        config.parse(json.dumps(doc), {})
    assert caught.value.path == "identity.issuers[0].name"
