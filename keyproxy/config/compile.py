"""Compile YAML text into the typed configuration of keyproxy.config.model.

Every mistake raises `ConfigError` whose `path` is the YAML path of the mistake
(`routes.openai.inject[0].header`; a policy is shown with its name, `policies[0] (summarizer)`).
keyproxy.config.loader reads the text (duplicate keys, syntax errors); raw dicts never leave
keyproxy.config. Each part of the file is compiled by its own module: `sections` (vault,
identity, server, tokens), `routes` (and `rotation`, a route's rotation), `policies`,
`limits` (the state store and the limits of routes and policies); `node` is the YAML value
with its path that they all read.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from keyproxy.config.limits import state_config
from keyproxy.config.loader import item_path, read, read_file
from keyproxy.config.model import (
    Config,
    ServerConfig,
    TokensConfig,
)
from keyproxy.config.node import Node, opt, required
from keyproxy.config.policies import policies_config
from keyproxy.config.routes import routes_config
from keyproxy.config.sections import (
    identity_config,
    issuer_names,
    server_config,
    tokens_config,
    vault_config,
)
from keyproxy.config.store import ConcurrencyLimit, RateLimit
from keyproxy.errors import ConfigError


def load(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and compile the YAML file at `path` (`loader.read_file`: at most 4 MiB), which a
    command reads once: a pipe too (`keyproxy check -c <(...)`). A reload reads a regular
    file only (keyproxy.server.reload), never waiting on a FIFO left at its path."""
    return parse_bytes(read_file(path, regular=False), env)


def parse_bytes(data: bytes, env: Mapping[str, str] | None = None) -> Config:
    """Compile a configuration file's bytes, which must be UTF-8."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = len(data[data.rfind(b"\n", 0, exc.start) + 1 : exc.start].decode()) + 1
        raise ConfigError("", f"the file is not UTF-8 text: line {line}, column {column}") from None
    return parse(text, env)


def parse(text: str, env: Mapping[str, str] | None = None) -> Config:
    """Compile YAML text. `env` (default: os.environ) supplies VAULT_ADDR / BAO_ADDR."""
    return _config(Node(read(text), ""), os.environ if env is None else env)


def parse_duration(value: Any, path: str) -> float:
    """A duration in the configuration's syntax (a positive number of seconds, or 500ms, 30s,
    15m, 24h, 2d), for settings read outside the file, where a number comes as text (a
    command-line option, a form field): "300" is 300 seconds. ConfigError naming `path` if
    not one."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)  # ASCII only: str.isdigit also takes "²", which int() refuses
    return Node(value, path).duration()


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


def _config(node: Node, env: Mapping[str, str]) -> Config:
    top = node.mapping({"vault", "identity", "server", "tokens", "routes", "policies", "state"})
    vault = vault_config(top.get("vault", Node({}, "vault")), env)
    issuers = identity_config(required(node, top, "identity"))
    routes = routes_config(required(node, top, "routes"), vault.kv_mount)
    server = opt(top, "server", server_config, ServerConfig())
    names = issuer_names(issuers, server)
    policies = policies_config(top.get("policies", Node([], "policies")), routes, names)
    tokens = opt(top, "tokens", tokens_config, TokensConfig())
    state = opt(top, "state", state_config, None)
    config = Config(vault, issuers, routes, policies, server, tokens, state)
    _unique_limit_names(config)
    return config


def _unique_limit_names(config: Config) -> None:
    """Two limits of one name would share their counters in the store."""
    seen: dict[str, str] = {}
    owners = [(f"routes.{name}", route.limits) for name, route in config.routes.items()]
    owners += [(item_path("policies", i, p.name), p.limits) for i, p in enumerate(config.policies)]
    for owner, limits in owners:
        groups: list[tuple[str, tuple[RateLimit | ConcurrencyLimit, ...]]] = [
            ("rate", limits.rate),
            ("concurrency", limits.concurrency),
        ]
        for kind, group in groups:
            for i, limit in enumerate(group):
                where = f"{owner}.limits.{kind}[{i}]"
                if limit.name in seen:
                    raise ConfigError(
                        where,
                        f"the limit name {limit.name!r} is also used by {seen[limit.name]}; "
                        "give one of them its own name",
                    )
                seen[limit.name] = where
