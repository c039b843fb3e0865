"""keyproxy's configuration: one YAML file compiled into frozen, typed objects.

`load(path)`, `parse(text)` and `parse_bytes(data)` (a file's bytes, as `read_file(path)`
reads them: at most 4 MiB) return a `Config` or raise `ConfigError` naming the YAML path of
the mistake. `credential_problems(cfg)` lists the Vault credential files this host cannot
read (`keyproxy check` warns about them). `parse_duration(value, path)` reads a duration in
the file's syntax for a setting given elsewhere (a token request, a command-line option).
`model` holds the objects; `loader` reads YAML strictly (duplicate keys, syntax errors);
`compile` turns it into the objects. `diff(old, new)` lists what a reload changes
(`Changes`), `keep_running(running, new)` keeps the settings that need a restart. The
reference for every key is docs/configuration.md.
"""

from keyproxy.config.changes import Changes, Delta, diff, keep_running
from keyproxy.config.compile import credential_problems, load, parse, parse_bytes, parse_duration
from keyproxy.config.limits import MAX_USES
from keyproxy.config.loader import MAX_CONFIG_BYTES, read_file
from keyproxy.config.model import (
    ALGORITHMS,
    EXCEPTION_ISSUER,
    HEADER_NAME,
    HOP_BY_HOP,
    MAX_DELEGATION_DEPTH,
    MAX_LEEWAY,
    MCP_METHODS,
    METHODS,
    ROUTE_NAME,
    AdminConfig,
    CallerCredential,
    CommandRotator,
    Config,
    ForwardedCertFormat,
    ForwardedClientCert,
    Grant,
    HttpCall,
    HttpRotator,
    Injection,
    Issuer,
    ListenerTLS,
    ManualRotator,
    McpGrant,
    Network,
    Policy,
    Route,
    SecretRef,
    ServerConfig,
    TokensConfig,
    Upstream,
    VaultAuth,
    VaultConfig,
    claim_text,
    default_full_refresh,
)
from keyproxy.config.sections import issuer_names
from keyproxy.config.store import ConcurrencyLimit, Limits, RateLimit, RedisSettings

__all__ = [
    "ALGORITHMS",
    "EXCEPTION_ISSUER",
    "HEADER_NAME",
    "HOP_BY_HOP",
    "MAX_CONFIG_BYTES",
    "MAX_DELEGATION_DEPTH",
    "MAX_LEEWAY",
    "MAX_USES",
    "MCP_METHODS",
    "METHODS",
    "ROUTE_NAME",
    "AdminConfig",
    "CallerCredential",
    "Changes",
    "CommandRotator",
    "ConcurrencyLimit",
    "Config",
    "Delta",
    "ForwardedCertFormat",
    "ForwardedClientCert",
    "Grant",
    "HttpCall",
    "HttpRotator",
    "Injection",
    "Issuer",
    "Limits",
    "ListenerTLS",
    "ManualRotator",
    "McpGrant",
    "Network",
    "Policy",
    "RateLimit",
    "RedisSettings",
    "Route",
    "SecretRef",
    "ServerConfig",
    "TokensConfig",
    "Upstream",
    "VaultAuth",
    "VaultConfig",
    "claim_text",
    "credential_problems",
    "default_full_refresh",
    "diff",
    "issuer_names",
    "keep_running",
    "load",
    "parse",
    "parse_bytes",
    "parse_duration",
    "read_file",
]
