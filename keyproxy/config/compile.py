"""Compile YAML text into the typed configuration of keyproxy.config.model.

Every mistake raises `ConfigError` whose `path` is the YAML path of the mistake
(`routes.openai.inject[0].header`; a policy is shown with its name, `policies[0] (summarizer)`).
keyproxy.config.loader reads the text (duplicate keys, syntax errors); raw dicts never leave
this module.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from yarl import URL

from keyproxy import patterns
from keyproxy.config.loader import close_match, item_path, key_path, read
from keyproxy.config.model import (
    ALGORITHMS,
    HEADER_NAME,
    HOP_BY_HOP,
    MAX_LEEWAY,
    METHODS,
    ROUTE_NAME,
    AdminConfig,
    CallerCredential,
    CommandRotator,
    Config,
    Grant,
    HttpCall,
    HttpRotator,
    Injection,
    Issuer,
    ManualRotator,
    Network,
    Policy,
    Rotation,
    Rotator,
    Route,
    SecretRef,
    ServerConfig,
    TokensConfig,
    Upstream,
    VaultAuth,
    VaultConfig,
    claim_text,
)
from keyproxy.errors import ConfigError

T = TypeVar("T")

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^(\d+)\s*(B|KiB|MiB|GiB)?$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def load(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and compile the YAML file at `path`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror}") from None
    return parse(text, env)


def parse(text: str, env: Mapping[str, str] | None = None) -> Config:
    """Compile YAML text. `env` (default: os.environ) supplies VAULT_ADDR / BAO_ADDR."""
    return _config(_Node(read(text), ""), os.environ if env is None else env)


def parse_duration(value: Any, path: str) -> float:
    """A duration in the configuration's syntax (a positive number of seconds, or 500ms, 30s,
    15m, 24h, 2d), for settings read outside the file; ConfigError naming `path` if not."""
    return _Node(value, path).duration()


def credential_problems(cfg: Config) -> list[ConfigError]:
    """The Vault credential files (vault.auth.*_file) that logging in could not read here.

    Host state, not configuration, so `keyproxy check` reports these as warnings: the same
    file is often checked where the credentials are not (CI, before a rollout), and `serve`
    keeps retrying its login, as a sidecar may write a file after start. Without the warning
    a missing file passes `check` and `serve` never turns ready. The files are looked at,
    never read: they hold credentials.
    """
    auth = cfg.vault.auth
    files = [("role_id_file", auth.role_id_file), ("secret_id_file", auth.secret_id_file)]
    files += [("token_file", auth.token_file), ("jwt_file", auth.jwt_file)]
    return [
        ConfigError(f"vault.auth.{key}", f"{file}: {problem}")
        for key, file in files
        if file is not None and (problem := _unreadable(file)) is not None
    ]


def _unreadable(file: Path) -> str | None:
    try:
        info = file.stat()
    except OSError as exc:
        return str(exc.strerror)
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if not os.access(file, os.R_OK):
        return "not readable by this user"
    return "is empty" if info.st_size == 0 else None


class _Node:
    """A YAML value with its path, so every error can say where it is."""

    def __init__(self, value: Any, path: str) -> None:
        self.value = value
        self.path = path

    def error(self, message: str) -> ConfigError:
        return ConfigError(self.path or "(top level)", message)

    def mapping(self, allowed: set[str]) -> dict[str, _Node]:
        if not isinstance(self.value, dict):
            raise self.error("must be a mapping")
        out: dict[str, _Node] = {}
        for key, value in self.value.items():
            child = self._child(str(key))
            if not isinstance(key, str):
                raise child.error("keys must be strings")
            if key not in allowed:
                raise child.error(
                    f"unknown key{_did_you_mean(key, allowed)} "
                    f"(expected one of: {', '.join(sorted(allowed))})"
                )
            out[key] = _Node(value, child.path)
        return out

    def items(self) -> list[tuple[str, _Node]]:
        if not isinstance(self.value, dict):
            raise self.error("must be a mapping")
        return [(str(k), _Node(v, self._child(str(k)).path)) for k, v in self.value.items()]

    def sequence(self) -> list[_Node]:
        if not isinstance(self.value, list):
            raise self.error("must be a list")
        return [
            _Node(v, item_path(self.path, i, v.get("name") if isinstance(v, dict) else None))
            for i, v in enumerate(self.value)
        ]

    def string(self) -> str:
        if not isinstance(self.value, str) or not self.value:
            raise self.error("must be a non-empty string")
        return self.value

    def boolean(self) -> bool:
        if not isinstance(self.value, bool):
            raise self.error("must be true or false")
        return self.value

    def duration(self) -> float:
        value = self.value
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return float(value)
        match = _DURATION.match(value) if isinstance(value, str) else None
        if not match or float(match[1]) <= 0:
            raise self.error("must be a positive duration such as 500ms, 30s, 15m, 24h")
        return float(match[1]) * _DURATION_UNITS[match[2]]

    def size(self) -> int:
        value = self.value
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        match = _SIZE.match(value) if isinstance(value, str) else None
        if not match or int(match[1]) <= 0:
            raise self.error("must be a positive size such as 65536, 64KiB or 10MiB")
        return int(match[1]) * _SIZE_UNITS[match[2]]

    def count(self) -> int:
        value = self.value
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise self.error("must be a positive whole number")
        return value

    def strings(self) -> tuple[str, ...]:
        return tuple(item.string() for item in self.sequence())

    def networks(self) -> tuple[Network, ...]:
        nets = []
        for item in self.sequence():
            try:
                nets.append(ipaddress.ip_network(item.string(), strict=True))
            except ValueError:
                raise item.error("must be a CIDR such as 10.0.0.0/8 (host bits unset)") from None
        return tuple(nets)

    def path_value(self) -> Path:
        value = self.string()
        if value != value.strip():
            raise self.error("must not start or end with whitespace")
        return Path(value)

    def _child(self, key: str) -> _Node:
        return _Node(None, key_path(self.path, key))


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    match = close_match(word, choices)
    return f", did you mean {match}?" if match else ""


def _opt(fields: dict[str, _Node], key: str, read: Callable[[_Node], T], default: T) -> T:
    node = fields.get(key)
    return default if node is None else read(node)


def _required(node: _Node, fields: dict[str, _Node], key: str) -> _Node:
    if key not in fields:
        raise node._child(key).error("is required")
    return fields[key]


def _config(node: _Node, env: Mapping[str, str]) -> Config:
    top = node.mapping({"vault", "identity", "server", "tokens", "routes", "policies"})
    vault = _vault(top.get("vault", _Node({}, "vault")), env)
    issuers = _identity(_required(node, top, "identity"))
    routes = _routes(_required(node, top, "routes"), vault.kv_mount)
    policies = _policies(top.get("policies", _Node([], "policies")), routes, issuers)
    server = _opt(top, "server", _server, ServerConfig())
    tokens = _opt(top, "tokens", _tokens, TokensConfig())
    return Config(vault, issuers, routes, policies, server, tokens)


def _vault(node: _Node, env: Mapping[str, str]) -> VaultConfig:
    f = node.mapping(
        {
            "addr",
            "auth",
            "kv_mount",
            "ca_cert",
            "tls_verify",
            "timeout",
            "refresh_interval",
            "full_refresh_interval",
            "max_staleness",
            "namespace",
        }
    )
    addr = _opt(f, "addr", _Node.string, "") or env.get("BAO_ADDR") or env.get("VAULT_ADDR")
    if not addr:
        raise node._child("addr").error("is required (or set VAULT_ADDR / BAO_ADDR)")
    url = URL(addr)
    if url.scheme not in ("http", "https") or not url.host:
        raise (f.get("addr") or node).error("must be an http(s) URL")
    refresh = _opt(f, "refresh_interval", _Node.duration, 2.0)
    staleness = _opt(f, "max_staleness", _Node.duration, 300.0)
    if staleness < 2 * refresh:
        where = f.get("max_staleness") or f["refresh_interval"]
        raise where.error("max_staleness must be at least twice refresh_interval")
    full = _opt(f, "full_refresh_interval", _Node.duration, 0.0)  # 0: VaultConfig's default
    if full and not refresh <= full <= staleness / 2:
        # Read twice within max_staleness: a key the index cannot confirm (a proxy policy
        # without it) never goes stale between two reads of the sweep.
        raise f["full_refresh_interval"].error(
            "must be at least refresh_interval and at most half of max_staleness"
        )
    return VaultConfig(
        addr=addr.rstrip("/"),
        auth=_vault_auth(f.get("auth", _Node({"method": "token"}, node._child("auth").path))),
        kv_mount=_opt(f, "kv_mount", _Node.string, "secret").strip("/"),
        ca_cert=_opt(f, "ca_cert", _Node.path_value, None),
        tls_verify=_opt(f, "tls_verify", _Node.boolean, True),
        timeout=_opt(f, "timeout", _Node.duration, 5.0),
        refresh_interval=refresh,
        full_refresh_interval=full,
        max_staleness=staleness,
        namespace=_opt(f, "namespace", _Node.string, None),
    )


_AUTH_KEYS: dict[str, set[str]] = {
    "token": {"token_file"},
    "approle": {"role_id", "role_id_file", "secret_id_file"},
    "kubernetes": {"role", "jwt_file"},
    "jwt": {"role", "jwt_file"},
}
_AUTH_MOUNTS = {"token": "token", "approle": "approle", "kubernetes": "kubernetes", "jwt": "jwt"}


def _vault_auth(node: _Node) -> VaultAuth:
    method_node = node.mapping({"method", "mount", *set().union(*_AUTH_KEYS.values())}).get(
        "method"
    )
    if method_node is None:
        raise node._child("method").error("is required (token, approle, kubernetes or jwt)")
    method = method_node.string()
    if method not in _AUTH_KEYS:
        raise method_node.error("must be one of token, approle, kubernetes, jwt")
    f = node.mapping({"method", "mount", *_AUTH_KEYS[method]})
    auth = VaultAuth(
        method=method,  # type: ignore[arg-type]  # checked against _AUTH_KEYS above
        mount=_opt(f, "mount", _Node.string, _AUTH_MOUNTS[method]).strip("/"),
        role=_opt(f, "role", _Node.string, None),
        role_id=_opt(f, "role_id", _Node.string, None),
        role_id_file=_opt(f, "role_id_file", _Node.path_value, None),
        secret_id_file=_opt(f, "secret_id_file", _Node.path_value, None),
        token_file=_opt(f, "token_file", _Node.path_value, None),
        jwt_file=_opt(f, "jwt_file", _Node.path_value, None),
    )
    if method == "approle":
        if (auth.role_id is None) == (auth.role_id_file is None):
            raise node._child("role_id").error("set exactly one of role_id, role_id_file")
        _required(node, f, "secret_id_file")
    if method in ("kubernetes", "jwt"):
        _required(node, f, "role")
        if method == "jwt":
            _required(node, f, "jwt_file")
    return auth


def _identity(node: _Node) -> tuple[Issuer, ...]:
    f = node.mapping({"issuers"})
    issuers = tuple(_issuer(item) for item in _required(node, f, "issuers").sequence())
    if not issuers:
        raise f["issuers"].error("must list at least one issuer")
    seen: dict[str, str] = {}
    for item, issuer in zip(f["issuers"].sequence(), issuers, strict=True):
        for key in (issuer.name, "iss:" + issuer.issuer):
            if key in seen:
                raise item.error(f"duplicates {seen[key]} ({key.removeprefix('iss:')})")
            seen[key] = item.path
    return issuers


def _issuer(node: _Node) -> Issuer:
    f = node.mapping(
        {
            "name",
            "issuer",
            "discovery_url",
            "jwks_uri",
            "jwks_file",
            "audiences",
            "algorithms",
            "leeway",
            "jwks_cache_ttl",
            "jwks_refetch_cooldown",
            "jwks_max_staleness",
            "max_token_lifetime",
        }
    )
    sources = [k for k in ("discovery_url", "jwks_uri", "jwks_file") if k in f]
    if len(sources) != 1:
        raise node.error("set exactly one of discovery_url, jwks_uri, jwks_file")
    for key in ("discovery_url", "jwks_uri"):
        if key in f and URL(f[key].string()).scheme not in ("http", "https"):
            raise f[key].error("must be an http(s) URL")
    audiences = _required(node, f, "audiences").strings()
    if not audiences:
        raise f["audiences"].error("must list at least one audience")
    algorithms = _required(node, f, "algorithms").strings()
    for i, alg in enumerate(algorithms):
        if alg not in ALGORITHMS:
            raise _Node(alg, f"{f['algorithms'].path}[{i}]").error(
                f"unsupported (asymmetric only: {', '.join(sorted(ALGORITHMS))})"
            )
    if not algorithms:
        raise f["algorithms"].error("must list at least one algorithm")
    leeway = _opt(f, "leeway", _Node.duration, 30.0)
    if leeway > MAX_LEEWAY:
        raise f["leeway"].error(f"must be at most {MAX_LEEWAY:.0f}s")
    issuer = Issuer(
        name=_required(node, f, "name").string(),
        issuer=_required(node, f, "issuer").string(),
        audiences=audiences,
        algorithms=algorithms,
        discovery_url=_opt(f, "discovery_url", _Node.string, None),
        jwks_uri=_opt(f, "jwks_uri", _Node.string, None),
        jwks_file=_opt(f, "jwks_file", _Node.path_value, None),
        leeway=leeway,
        jwks_cache_ttl=_opt(f, "jwks_cache_ttl", _Node.duration, 3600.0),
        jwks_refetch_cooldown=_opt(f, "jwks_refetch_cooldown", _Node.duration, 30.0),
        jwks_max_staleness=_opt(f, "jwks_max_staleness", _Node.duration, 86400.0),
        max_token_lifetime=_opt(f, "max_token_lifetime", _Node.duration, None),
    )
    if issuer.jwks_max_staleness < issuer.jwks_cache_ttl:
        where = f["jwks_max_staleness"] if "jwks_max_staleness" in f else f["jwks_cache_ttl"]
        raise where.error("jwks_max_staleness must be at least jwks_cache_ttl")
    return issuer


def _server(node: _Node) -> ServerConfig:
    f = node.mapping(
        {
            "host",
            "port",
            "trusted_proxies",
            "admin",
            "header_timeout",
            "keepalive_timeout",
            "max_connections",
            "max_connections_per_source",
        }
    )
    d = ServerConfig()
    server = ServerConfig(
        host=_opt(f, "host", _Node.string, d.host),
        port=_opt(f, "port", _port, d.port),
        trusted_proxies=_opt(f, "trusted_proxies", _Node.networks, ()),
        admin=_opt(f, "admin", _admin, d.admin),
        header_timeout=_opt(f, "header_timeout", _Node.duration, d.header_timeout),
        keepalive_timeout=_opt(f, "keepalive_timeout", _Node.duration, d.keepalive_timeout),
        max_connections=_opt(f, "max_connections", _Node.count, d.max_connections),
        max_connections_per_source=_opt(
            f, "max_connections_per_source", _Node.count, d.max_connections_per_source
        ),
    )
    admin = server.admin
    if admin.port and (admin.host, admin.port) == (server.host, server.port):
        raise f["admin"].error("must listen on another port than the proxy")
    return server


def _admin(node: _Node) -> AdminConfig:
    f = node.mapping({"host", "port"})
    d = AdminConfig()
    return AdminConfig(
        host=_opt(f, "host", _Node.string, d.host), port=_opt(f, "port", _port, d.port)
    )


def _port(node: _Node) -> int:
    port = node.value
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise node.error("must be a port number (0-65535)")
    return port


def _tokens(node: _Node) -> TokensConfig:
    f = node.mapping(
        {
            "max_ttl",
            "default_ttl",
            "exception_max_ttl",
            "issuer",
            "transit",
            "state_path",
            "revocation_poll_interval",
            "key_refetch_cooldown",
            "key_refresh_interval",
            "key_max_staleness",
        }
    )
    transit = f["transit"].mapping({"mount", "key"}) if "transit" in f else {}
    d = TokensConfig()
    tokens = TokensConfig(
        max_ttl=_opt(f, "max_ttl", _Node.duration, d.max_ttl),
        default_ttl=_opt(f, "default_ttl", _Node.duration, d.default_ttl),
        exception_max_ttl=_opt(f, "exception_max_ttl", _Node.duration, d.exception_max_ttl),
        issuer=_opt(f, "issuer", _Node.string, d.issuer),
        transit_mount=_opt(transit, "mount", _Node.string, d.transit_mount).strip("/"),
        transit_key=_opt(transit, "key", _Node.string, d.transit_key),
        state_path=_opt(f, "state_path", _Node.string, d.state_path).strip("/"),
        revocation_poll_interval=_opt(
            f, "revocation_poll_interval", _Node.duration, d.revocation_poll_interval
        ),
        key_refetch_cooldown=_opt(
            f, "key_refetch_cooldown", _Node.duration, d.key_refetch_cooldown
        ),
        key_refresh_interval=_opt(
            f, "key_refresh_interval", _Node.duration, d.key_refresh_interval
        ),
        key_max_staleness=_opt(f, "key_max_staleness", _Node.duration, d.key_max_staleness),
    )
    if tokens.default_ttl > tokens.max_ttl:
        raise node._child("default_ttl").error("must not exceed max_ttl")
    if tokens.revocation_poll_interval > 2.0:
        # Revocations must reach every replica within 2 s (docs/tokens.md).
        raise f["revocation_poll_interval"].error("must be at most 2s")
    if tokens.key_max_staleness < tokens.key_refresh_interval:
        where = f["key_max_staleness"] if "key_max_staleness" in f else f["key_refresh_interval"]
        raise where.error("key_max_staleness must be at least key_refresh_interval")
    return tokens


def _routes(node: _Node, kv_mount: str) -> dict[str, Route]:
    routes = {}
    for name, item in node.items():
        if not ROUTE_NAME.match(name):
            raise item.error("route names are letters, digits, '_', '.', '-' (max 63)")
        routes[name] = _route(name, item, kv_mount)
    if not routes:
        raise node.error("must define at least one route")
    return routes


def _route(name: str, node: _Node, kv_mount: str) -> Route:
    f = node.mapping(
        {
            "upstream",
            "secret",
            "inject",
            "caller_credential",
            "egress",
            "tls",
            "allow_http",
            "timeouts",
            "max_body",
            "strip_headers",
            "forward_underscore_headers",
            "owner",
            "rotation",
            "max_age",
        }
    )
    inject = tuple(_injection(item) for item in _required(node, f, "inject").sequence())
    if not inject:
        raise f["inject"].error("must list at least one injection")
    caller = _opt(f, "caller_credential", _caller_credential, CallerCredential())
    tls = f["tls"].mapping({"verify", "ca_file"}) if "tls" in f else {}
    timeouts = f["timeouts"].mapping({"connect", "read"}) if "timeouts" in f else {}
    egress = f["egress"].mapping({"allow_cidrs"}) if "egress" in f else {}
    upstream = _upstream(_required(node, f, "upstream"))
    if upstream.scheme == "http" and not _opt(f, "allow_http", _Node.boolean, False):
        raise f["upstream"].error(
            "http:// would send the key unencrypted; use https, or set allow_http: true"
        )
    tls_verify = _opt(tls, "verify", _Node.boolean, True)
    if not tls_verify and upstream.scheme != "https":
        raise tls["verify"].error("only applies to https upstreams")
    rotation = _opt(f, "rotation", lambda n: _rotation(n, kv_mount), None)
    max_age = _opt(f, "max_age", _Node.duration, None)
    if max_age is not None and rotation and rotation.every and max_age <= rotation.every:
        raise f["max_age"].error("must be longer than rotation.every")
    strip: tuple[str, ...] = _opt(f, "strip_headers", _Node.strings, ())
    for i, header in enumerate(strip):
        if not HEADER_NAME.match(header):
            raise _Node(header, f"{f['strip_headers'].path}[{i}]").error("not a header name")
    return Route(
        name=name,
        upstream=upstream,
        secret=_secret_ref(_required(node, f, "secret"), kv_mount),
        inject=inject,
        caller_credential=caller,
        egress_allow=_opt(egress, "allow_cidrs", _Node.networks, ()),
        tls_verify=tls_verify,
        ca_file=_opt(tls, "ca_file", _Node.path_value, None),
        connect_timeout=_opt(timeouts, "connect", _Node.duration, 10.0),
        read_timeout=_opt(timeouts, "read", _Node.duration, 300.0),
        max_body=_opt(f, "max_body", _Node.size, 10 * 1024**2),
        strip_headers=tuple(h.lower() for h in strip),
        forward_underscore_headers=_opt(f, "forward_underscore_headers", _Node.boolean, False),
        owner=_opt(f, "owner", _Node.string, None),
        rotation=rotation,
        max_age=max_age,
    )


def _upstream(node: _Node) -> Upstream:
    try:
        url = URL(node.string())
    except ValueError:
        raise node.error("must be an absolute http(s) URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise node.error("must be an absolute http(s) URL such as https://api.example.com")
    if url.user or url.password or url.query_string or url.fragment:
        raise node.error("must not contain credentials, a query or a fragment")
    assert url.port is not None  # yarl fills in the default port
    return Upstream(
        scheme=url.scheme,  # type: ignore[arg-type]  # checked above
        host=url.host,
        port=url.port,
        base_path=url.path.rstrip("/"),
    )


def _secret_ref(node: _Node, kv_mount: str, default_field: str = "api_key") -> SecretRef:
    f = node.mapping({"mount", "path", "field"})
    return SecretRef(
        mount=_opt(f, "mount", _Node.string, kv_mount).strip("/"),
        path=_required(node, f, "path").string().strip("/"),
        field=_opt(f, "field", _Node.string, default_field),
    )


# ---------------------------------------------------------------------------- rotation

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_CREATE_FIELDS = frozenset({"admin", "route", "attempt"})
# {attempt} exists only while creating: verify and revoke happen for a key, not an attempt.
_KEY_FIELDS = frozenset({"admin", "route", "key", "key_id"})
_POINTER = re.compile(r"^(/([^~/]|~[01])*)+$")


def _rotation(node: _Node, kv_mount: str) -> Rotation:
    f = node.mapping({"every", "grace", "lock_timeout", "rotator"})
    rotator = _rotator(_required(node, f, "rotator"), kv_mount)
    every = _opt(f, "every", _Node.duration, None)
    if every is None and not isinstance(rotator, ManualRotator):
        raise node._child("every").error("is required for an automated rotator")
    grace = _opt(f, "grace", _Node.duration, 600.0)
    if every is not None and grace >= every:
        where = f.get("grace") or f["every"]
        raise where.error("grace (default 10m) must be shorter than every")
    return Rotation(
        rotator=rotator,
        every=every,
        grace=grace,
        lock_timeout=_opt(f, "lock_timeout", _Node.duration, 300.0),
    )


def _rotator(node: _Node, kv_mount: str) -> Rotator:
    kind_node = node.mapping({"type", *_HTTP_KEYS, *_COMMAND_KEYS}).get("type")
    if kind_node is None:
        raise node._child("type").error("is required (http, command or manual)")
    kind = kind_node.string()
    if kind == "manual":
        node.mapping({"type"})
        return ManualRotator()
    if kind == "command":
        f = node.mapping({"type", *_COMMAND_KEYS})
        argv = _required(node, f, "command").strings()
        if not argv:
            raise f["command"].error("must list the executable and its arguments")
        return CommandRotator(
            argv=argv,
            admin_secret=_opt(f, "admin_secret", lambda n: _secret_ref(n, kv_mount, "token"), None),
            verify=_opt(f, "verify", _Node.boolean, False),
            timeout=_opt(f, "timeout", _Node.duration, 60.0),
        )
    if kind != "http":
        raise kind_node.error("must be one of http, command, manual")
    f = node.mapping({"type", *_HTTP_KEYS})
    allow_http = _opt(f, "allow_http", _Node.boolean, False)
    tls = f["tls"].mapping({"verify", "ca_file"}) if "tls" in f else {}
    return HttpRotator(
        create=_http_call(_required(node, f, "create"), _CREATE_FIELDS, allow_http),
        revoke=_http_call(_required(node, f, "revoke"), _KEY_FIELDS, allow_http),
        verify=_opt(f, "verify", lambda n: _http_call(n, _KEY_FIELDS, allow_http), None),
        admin_secret=_opt(f, "admin_secret", lambda n: _secret_ref(n, kv_mount, "token"), None),
        key_pointer=_opt(f, "key_pointer", _pointer, "/key"),
        id_pointer=_opt(f, "id_pointer", _pointer, "/id"),
        timeout=_opt(f, "timeout", _Node.duration, 30.0),
        tls_verify=_opt(tls, "verify", _Node.boolean, True),
        ca_file=_opt(tls, "ca_file", _Node.path_value, None),
    )


_HTTP_KEYS = {
    "create",
    "verify",
    "revoke",
    "admin_secret",
    "key_pointer",
    "id_pointer",
    "timeout",
    "allow_http",
    "tls",
}
_COMMAND_KEYS = {"command", "admin_secret", "verify", "timeout"}


def _pointer(node: _Node) -> str:
    value = node.string()
    if not _POINTER.match(value):
        raise node.error("must be a JSON pointer such as /key or /data/0/secret")
    return value


def _http_call(node: _Node, fields: frozenset[str], allow_http: bool) -> HttpCall:
    f = node.mapping({"method", "url", "headers", "body"})
    method = _opt(f, "method", _Node.string, "POST").upper()
    if method not in METHODS:
        raise f["method"].error(f"unknown method (one of {', '.join(sorted(METHODS))})")
    url_node = _required(node, f, "url")
    url = _call_template(url_node, fields)
    scheme = url.partition("://")[0].lower()
    if scheme not in ("http", "https") or "://" not in url:
        raise url_node.error("must be an absolute http(s) URL")
    if scheme == "http" and not allow_http:
        raise url_node.error("http:// would send credentials unencrypted; set allow_http: true")
    headers = []
    header_nodes: list[tuple[str, _Node]] = _opt(f, "headers", _Node.items, [])
    for name, value in header_nodes:
        if not HEADER_NAME.match(name):
            raise value.error("not a valid header name")
        headers.append((name, _call_template(value, fields)))
    body = None
    if "body" in f:
        _check_body(f["body"], fields)
        body = json.dumps(f["body"].value)
    return HttpCall(method=method, url=url, headers=tuple(headers), body=body)


def _check_body(node: _Node, fields: frozenset[str]) -> None:
    """A JSON body: every string in it is a template; other scalars pass through."""
    if isinstance(node.value, dict):
        for _, child in node.items():
            _check_body(child, fields)
    elif isinstance(node.value, list):
        for child in node.sequence():
            _check_body(child, fields)
    elif isinstance(node.value, str):
        _call_template(node, fields)
    elif not isinstance(node.value, int | float | bool) and node.value is not None:
        raise node.error("must be JSON: mappings, lists, strings, numbers, booleans, null")


def _call_template(node: _Node, fields: frozenset[str]) -> str:
    template = node.string()
    for name in _PLACEHOLDER.findall(template):
        if name not in fields:
            raise node.error(f"unknown placeholder {{{name}}} (here: {', '.join(sorted(fields))})")
    if "{" in _PLACEHOLDER.sub("", template) or "}" in _PLACEHOLDER.sub("", template):
        raise node.error("unbalanced brace")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in template):
        raise node.error("must not contain control characters")
    return template


def _template(node: _Node) -> str:
    template = node.string()
    rest = template.replace("{key}", "", 1)
    if "{key}" not in template or "{" in rest or "}" in rest:
        raise node.error("must contain {key} exactly once and no other braces")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in template):
        raise node.error("must not contain control characters")
    return template


def _injection(node: _Node) -> Injection:
    if not isinstance(node.value, dict):
        raise node.error("must be a mapping with one of header, query, basic")
    kinds = [k for k in ("header", "query", "basic") if k in node.value]
    if not kinds:
        node.mapping({"header", "query", "basic", "format"})  # a typo: say which key it was
    if len(kinds) != 1:
        raise node.error("set exactly one of header, query, basic")
    kind = kinds[0]
    if kind == "basic":
        f = node.mapping({"basic"})
        b = f["basic"].mapping({"username", "password"})
        username = _opt(b, "username", _Node.string, "")
        password = _opt(b, "password", _Node.string, "{key}")
        if "{key}" in username:
            raise b["username"].error("put {key} in password, not username")
        if ":" in username:
            raise b["username"].error("must not contain ':'")
        return Injection(
            "basic", "Authorization", _template(b.get("password", _Node(password, ""))), username
        )
    f = node.mapping({kind, "format"})
    name = f[kind].string()
    if kind == "header" and not HEADER_NAME.match(name):
        raise f[kind].error("not a valid header name")
    if kind == "header" and name.lower() in HOP_BY_HOP | {"host", "content-length"}:
        raise f[kind].error("cannot inject a hop-by-hop, Host or Content-Length header")
    return Injection(kind, name, _opt(f, "format", _template, "{key}"))  # type: ignore[arg-type]  # kind is "header" or "query"


def _caller_credential(node: _Node) -> CallerCredential:
    f = node.mapping({"header", "scheme"})
    header = _opt(f, "header", _Node.string, "Authorization")
    if not HEADER_NAME.match(header):
        raise f["header"].error("not a valid header name")
    scheme_node = f.get("scheme")
    if scheme_node is None:
        scheme = "Bearer" if header.lower() == "authorization" else None
    else:
        scheme = None if scheme_node.value in (None, "") else scheme_node.string()
    return CallerCredential(header, scheme)


def _policies(
    node: _Node, routes: Mapping[str, Route], issuers: tuple[Issuer, ...]
) -> tuple[Policy, ...]:
    names: set[str] = set()
    policies = []
    for item in node.sequence():
        policy = _policy(item, routes, {i.name for i in issuers})
        if policy.name in names:
            raise item._child("name").error(f"duplicate policy name {policy.name!r}")
        names.add(policy.name)
        policies.append(policy)
    return tuple(policies)


def _policy(node: _Node, routes: Mapping[str, Route], issuer_names: set[str]) -> Policy:
    f = node.mapping({"name", "subjects", "issuers", "claims", "source_cidrs", "allow", "max_ttl"})
    subjects = _required(node, f, "subjects").strings()
    if not subjects:
        raise f["subjects"].error("must list at least one subject (use '*' for any)")
    issuers: tuple[str, ...] = _opt(f, "issuers", _Node.strings, ())
    for i, name in enumerate(issuers):
        if name not in issuer_names:
            hint = _did_you_mean(name, issuer_names)
            raise _Node(name, f"{f['issuers'].path}[{i}]").error(f"unknown issuer {name!r}{hint}")
    claims = []
    claim_nodes: list[tuple[str, _Node]] = _opt(f, "claims", _Node.items, [])
    for key, value in claim_nodes:
        text = claim_text(value.value)
        if not text:
            raise value.error("must be a string, number or boolean (exact match)")
        claims.append((key, text))
    allow = {}
    for route, grant in _required(node, f, "allow").items():
        if route not in routes:
            raise grant.error(f"unknown route {route!r}{_did_you_mean(route, routes)}")
        allow[route] = _grant(grant)
    return Policy(
        name=_required(node, f, "name").string(),
        subjects=subjects,
        issuers=issuers,
        claims=tuple(claims),
        source_cidrs=_opt(f, "source_cidrs", _Node.networks, ()),
        allow=allow,
        max_ttl=_opt(f, "max_ttl", _Node.duration, None),
    )


def _grant(node: _Node) -> Grant:
    f = node.mapping({"methods", "paths"})
    methods = _required(node, f, "methods").strings()
    for i, method in enumerate(methods):
        if method.upper() not in METHODS and method != "*":
            raise _Node(method, f"{f['methods'].path}[{i}]").error(
                f"unknown method (one of {', '.join(sorted(METHODS))} or '*')"
            )
    allowed = METHODS if "*" in methods else frozenset(m.upper() for m in methods)
    paths = []
    for item in _required(node, f, "paths").sequence():
        paths.append(_path_pattern(item))
    if not paths:
        raise f["paths"].error("must list at least one path pattern (use '/**' for any)")
    return Grant(allowed, tuple(paths))


def _path_pattern(node: _Node) -> tuple[str, ...]:
    return patterns.parse(node.string(), error=node.error)
