"""The compiled configuration: frozen, typed objects that the rest of keyproxy works on.

Built by `keyproxy.config.load` / `parse` (see `keyproxy.config.compile`); never constructed
from raw YAML anywhere else. The reference for every key is docs/configuration.md.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from keyproxy.config.store import Limits, RateLimit, RedisSettings

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

ROUTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# What MCP's Streamable HTTP transport uses: POST a message, GET the server's stream, DELETE
# the session. An MCP grant allows these on any path of its route.
MCP_METHODS = frozenset({"GET", "POST", "DELETE"})
# Only asymmetric algorithms: a shared-secret (HS*) issuer key would let anyone holding the
# JWKS mint tokens, and "none" is never a signature.
ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
MAX_LEEWAY = 120.0
# The issuer name of exception tokens' callers (`keyproxy token issue-exception`): no
# configured issuer may take it.
EXCEPTION_ISSUER: Final = "exception"
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)

# ---------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class VaultAuth:
    """How keyproxy logs in to Vault. Secrets come from files or the environment, never YAML."""

    method: Literal["token", "approle", "kubernetes", "jwt"]
    mount: str
    role: str | None = None
    role_id: str | None = None
    role_id_file: Path | None = None
    secret_id_file: Path | None = None
    token_file: Path | None = None
    jwt_file: Path | None = None


def default_full_refresh(refresh_interval: float, max_staleness: float) -> float:
    """Every key re-read once a minute, and at least twice within max_staleness."""
    return max(refresh_interval, min(60.0, max_staleness / 2))


@dataclass(frozen=True)
class VaultConfig:
    addr: str
    auth: VaultAuth
    kv_mount: str = "secret"
    ca_cert: Path | None = None
    tls_verify: bool = True
    timeout: float = 5.0
    refresh_interval: float = 2.0
    full_refresh_interval: float = 0.0  # 0: default_full_refresh() of the two around it
    max_staleness: float = 300.0
    namespace: str | None = None  # X-Vault-Namespace; else BAO_NAMESPACE / VAULT_NAMESPACE

    def __post_init__(self) -> None:
        if not self.full_refresh_interval:
            full = default_full_refresh(self.refresh_interval, self.max_staleness)
            object.__setattr__(self, "full_refresh_interval", full)


@dataclass(frozen=True)
class Issuer:
    """A trusted workload-identity issuer. Exactly one of the three key sources is set."""

    name: str
    issuer: str
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...]
    discovery_url: str | None = None
    jwks_uri: str | None = None
    jwks_file: Path | None = None
    leeway: float = 30.0
    jwks_cache_ttl: float = 3600.0
    jwks_refetch_cooldown: float = 30.0
    # Cached keys serve this long after the last successful fetch while the issuer is down.
    jwks_max_staleness: float = 86400.0
    # Longest exp - iat accepted (iat then required); None: no limit.
    max_token_lifetime: float | None = None


ClientAuth = Literal["none", "optional", "required"]
ForwardedCertFormat = Literal["xfcc", "escaped_pem"]
FORWARDED_CERT_HEADERS: dict[str, str] = {  # each format's usual header
    "xfcc": "x-forwarded-client-cert",
    "escaped_pem": "ssl-client-cert",
}


@dataclass(frozen=True)
class ForwardedClientCert:
    """Where a TLS-terminating front proxy listed in `server.trusted_proxies` puts the client
    certificate it verified: the header's name (always dropped before forwarding) and format
    (keyproxy.forwardedcert)."""

    header: str
    format: ForwardedCertFormat


@dataclass(frozen=True)
class ListenerTLS:
    """A listener's TLS (`server.tls`, `server.admin.tls`): its certificate chain and key,
    whether it asks callers for a client certificate (an X.509-SVID), and the trust bundle of
    each trust domain whose SVIDs it accepts. The files are re-read when they change."""

    certificate: Path
    key: Path
    client_auth: ClientAuth = "none"
    trust_bundles: tuple[tuple[str, Path], ...] = ()  # (trust domain, PEM or SPIFFE bundle file)
    forwarded_client_cert: ForwardedClientCert | None = None  # server.tls only


@dataclass(frozen=True)
class AdminConfig:
    """The admin listener: metrics and detailed readiness, never on the agents' port."""

    host: str = "127.0.0.1"
    port: int = 9090
    tls: ListenerTLS | None = None
    hosts: tuple[str, ...] = ()  # names a request's Host may give, besides addresses


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    trusted_proxies: tuple[Network, ...] = ()
    admin: AdminConfig = field(default_factory=AdminConfig)
    tls: ListenerTLS | None = None
    # Connection limits (docs/security.md): a caller gets this long to send a request's
    # headers, an idle keep-alive connection this long before it is closed, and at most so
    # many connections are open in all and from one source address (trusted proxies exempt).
    header_timeout: float = 10.0
    keepalive_timeout: float = 60.0
    max_connections: int = 10_000
    max_connections_per_source: int = 1_000


MAX_DELEGATION_DEPTH = 16  # the most tokens.max_delegation_depth may be


@dataclass(frozen=True)
class TokensConfig:
    """Task-scoped tokens: keyproxy's own short-lived JWS, signed by Vault Transit."""

    max_ttl: float = 900.0
    default_ttl: float = 300.0
    exception_max_ttl: float = 86400.0
    issuer: str = "keyproxy"
    transit_mount: str = "transit"
    transit_key: str = "keyproxy-tokens"
    # KV v2 path (under vault.kv_mount) holding the revocation list and exception tokens.
    state_path: str = "keyproxy/state/tokens"
    revocation_poll_interval: float = 1.0
    # A task token is judged only against a list read (begun) at most this long ago; past it
    # the request waits for a read, and is refused (503) if Vault cannot answer.
    revocation_max_staleness: float = 2.0
    key_refetch_cooldown: float = 10.0
    # The Transit public keys are re-read this often, and serve this long while Vault is down.
    key_refresh_interval: float = 60.0
    key_max_staleness: float = 3600.0
    # How many times over a task token may be delegated (0: never), from its root token.
    max_delegation_depth: int = 3
    # Token exchanges (delegations too) per workload identity; None: not limited.
    exchange_limit: RateLimit | None = None


@dataclass(frozen=True)
class SecretRef:
    """Where a route's key lives: a field of a KV v2 secret."""

    mount: str
    path: str
    field: str

    @property
    def name(self) -> str:
        """`mount/path`, as logs, the key change index and `keys status` name the secret."""
        return f"{self.mount}/{self.path}"


@dataclass(frozen=True)
class Injection:
    """One way the key goes into the upstream request.

    kind "header": header `name` set to `format` with `{key}` replaced.
    kind "query":  query parameter `name` set to `format` with `{key}` replaced.
    kind "basic":  Authorization: Basic base64(`username`:`format`), `{key}` in either part.
    """

    kind: Literal["header", "query", "basic"]
    name: str
    format: str = "{key}"
    username: str = ""


@dataclass(frozen=True)
class CallerCredential:
    """Which request header carries the caller's token, and its scheme (None: bare token)."""

    header: str = "Authorization"
    scheme: str | None = "Bearer"


@dataclass(frozen=True)
class Upstream:
    scheme: Literal["http", "https"]
    host: str
    port: int
    base_path: str  # "" or "/prefix" without a trailing slash, percent-encoded as sent

    @property
    def origin(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class HttpCall:
    """One templated request of the http rotator.

    `url`, header values and the string values of `body` (JSON text) are templates whose
    placeholders are {admin} and {route}; in create also {attempt}; in verify and revoke also
    {key} and {key_id}. Any 2xx answer is success; revoke also accepts 404 and 410 (already gone).
    """

    method: str
    url: str
    headers: tuple[tuple[str, str], ...] = ()
    body: str | None = None


@dataclass(frozen=True)
class HttpRotator:
    """Create, verify and revoke keys with declarative HTTP calls (docs/rotation.md)."""

    create: HttpCall
    revoke: HttpCall
    verify: HttpCall | None = None
    admin_secret: SecretRef | None = None
    key_pointer: str = "/key"  # JSON pointers into the create answer
    id_pointer: str = "/id"
    timeout: float = 30.0
    tls_verify: bool = True
    ca_file: Path | None = None


@dataclass(frozen=True)
class CommandRotator:
    """An executable that reads one JSON request on stdin and answers JSON on stdout."""

    argv: tuple[str, ...]
    admin_secret: SecretRef | None = None
    verify: bool = False
    timeout: float = 60.0


@dataclass(frozen=True)
class ManualRotator:
    """No automation: operators store new keys with `keyproxy keys put`."""


Rotator = HttpRotator | CommandRotator | ManualRotator


@dataclass(frozen=True)
class Rotation:
    """When and how a route's key is replaced. `every` is None only for manual rotators."""

    rotator: Rotator
    every: float | None = None
    grace: float = 600.0
    lock_timeout: float = 300.0


@dataclass(frozen=True)
class Route:
    name: str
    upstream: Upstream
    secret: SecretRef
    inject: tuple[Injection, ...]
    caller_credential: CallerCredential = field(default_factory=CallerCredential)
    egress_allow: tuple[Network, ...] = ()
    tls_verify: bool = True
    ca_file: Path | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 300.0
    max_body: int = 10 * 1024**2
    strip_headers: tuple[str, ...] = ()
    forward_underscore_headers: bool = False  # else caller headers with `_` are dropped
    # GET, OPTIONS or DELETE requests that may carry a body (else refused: keyproxy.outgoing).
    bodies_on: frozenset[str] = frozenset()
    owner: str | None = None
    rotation: Rotation | None = None
    max_age: float | None = None  # `keyproxy keys status` fails for an older key
    kind: Literal["http", "mcp"] = "http"  # "mcp": an MCP server over Streamable HTTP
    # MCP routes: the server-to-client requests (sampling, elicitation, roots) that reach
    # callers on the server's streams; others are withheld.
    server_requests: frozenset[str] = frozenset()
    # MCP routes: the one path (after /r/<route>) requests may go to; None: any path.
    mcp_endpoint: str | None = None
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class McpGrant:
    """What a grant allows on an MCP route: tools and prompts by exact name, resources by
    exact URI or "prefix*", and JSON-RPC `methods` (None: the negotiated revision's)."""

    tools: frozenset[str] = frozenset()
    prompts: frozenset[str] = frozenset()
    resources: tuple[str, ...] = ()
    methods: frozenset[str] | None = None


@dataclass(frozen=True)
class Grant:
    """What a policy allows on one route. Paths are patterns split into segments. On an MCP
    route `mcp` says what it allows (methods MCP_METHODS, any path)."""

    methods: frozenset[str]
    paths: tuple[tuple[str, ...], ...]
    mcp: McpGrant | None = None


@dataclass(frozen=True)
class Policy:
    name: str
    subjects: tuple[str, ...]
    issuers: tuple[str, ...] = ()
    claims: tuple[tuple[str, str], ...] = ()  # (name, claim_text of the expected value)
    source_cidrs: tuple[Network, ...] = ()
    allow: Mapping[str, Grant] = field(default_factory=dict)
    max_ttl: float | None = None  # longest task token this policy lets an identity obtain
    limits: Limits = field(default_factory=Limits)


def claim_text(value: Any) -> str | None:
    """A scalar claim as the text policy compares: JSON booleans spelt the JSON way, numbers
    and strings as written; None (never equal) for a list, object, float or null."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int):
        return str(value)
    return None


@dataclass(frozen=True)
class Config:
    vault: VaultConfig
    identity: tuple[Issuer, ...]
    routes: Mapping[str, Route]
    policies: tuple[Policy, ...]
    server: ServerConfig = field(default_factory=ServerConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    state: RedisSettings | None = None  # None: counted in this process (MemoryStore)

    @property
    def limited(self) -> bool:
        """Whether any route or policy sets a rate limit or a concurrency cap, or tokens an
        exchange limit (what `serve --workers` needs a shared store for)."""
        return (
            any(r.limits for r in self.routes.values())
            or any(p.limits for p in self.policies)
            or self.tokens.exchange_limit is not None
        )
