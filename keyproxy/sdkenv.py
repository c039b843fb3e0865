"""What `keyproxy run` asks for and what it hands the wrapped command (pure, no I/O).

    parse_scope(["openai:POST:/v1/chat/completions"], extra)  -> the exchange's JSON scope
    parse_env(["demo=OPENAI_BASE_URL,OPENAI_API_KEY"])         -> {route: RouteEnv}
    route_env(route, overrides)                                -> the variables of one route
    child_env(environ, proxy, token, token_id=, routes=, overrides=, hidden=, identity=,
              refused=)                                        -> the environment

By default a route named `openai` gets OPENAI_BASE_URL (`{proxy}/r/openai/v1`: the openai
SDK's base URL includes the API version) and OPENAI_API_KEY; `anthropic` gets
ANTHROPIC_BASE_URL (`{proxy}/r/anthropic`: that SDK adds /v1 itself) and ANTHROPIC_API_KEY;
any other route KEYPROXY_<ROUTE>_BASE_URL (`{proxy}/r/<route>`) and KEYPROXY_<ROUTE>_TOKEN.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from keyproxy.errors import RunError
from keyproxy.paths import ROUTE_PREFIX
from keyproxy.scope import scope_item
from keyproxy.secret import Secret

SDK_VARS: Final = {
    "openai": ("OPENAI_BASE_URL", "OPENAI_API_KEY"),
    "anthropic": ("ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY"),
}
# What a base URL variable's SDK expects after the route: the openai SDK's includes /v1.
BASE_SUFFIX: Final = {"OPENAI_BASE_URL": "/v1"}
_VAR: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_scope(items: Sequence[str], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON scope of `route[:METHODS[:/path]]` items (the RFC 8693 form's), items of one
    route with the same methods sharing one grant; `extra` (JSON: an MCP route's tools, or
    anything the items cannot say) adds its grants."""
    grants: dict[str, dict[tuple[str, ...], list[str]]] = {}
    for item in items:
        try:
            route, methods, path = scope_item(item)
        except ValueError:
            raise RunError(f"--scope {item!r}: expected route[:METHODS[:/path]]") from None
        paths = grants.setdefault(route, {}).setdefault(tuple(m.upper() for m in methods), [])
        if path not in paths:
            paths.append(path)
    scope: dict[str, Any] = {
        route: [{"methods": list(m), "paths": p} for m, p in by_methods.items()]
        for route, by_methods in grants.items()
    }
    for route, value in (extra or {}).items():
        scope.setdefault(route, []).extend(value if isinstance(value, list) else [value])
    if not scope:
        raise RunError("give at least one --scope route:METHODS:/path (or --scope-json)")
    return scope


@dataclass(frozen=True)
class RouteEnv:
    """The variables that point an SDK at one route ("" leaves one unset), and what follows
    the route in the base URL."""

    base_var: str
    key_var: str
    suffix: str = ""


def parse_env(items: Sequence[str]) -> dict[str, RouteEnv]:
    """`ROUTE=BASE_VAR,KEY_VAR[,/suffix]` items (--env)."""
    found = {}
    for item in items:
        route, _, names = item.partition("=")
        parts = names.split(",")
        names_ok = all(_VAR.fullmatch(p) or not p for p in parts[:2])
        if not route or len(parts) not in (2, 3) or not names_ok:
            raise RunError(f"--env {item!r}: expected ROUTE=BASE_VAR,KEY_VAR[,/suffix]")
        suffix = parts[2] if len(parts) == 3 else BASE_SUFFIX.get(parts[0], "")
        found[route] = RouteEnv(parts[0], parts[1], suffix.rstrip("/"))
    return found


def route_env(route: str, overrides: Mapping[str, RouteEnv]) -> RouteEnv:
    if route in overrides:
        return overrides[route]
    if route in SDK_VARS:
        base, key = SDK_VARS[route]
        return RouteEnv(base, key, BASE_SUFFIX.get(base, ""))
    name = re.sub(r"[^A-Z0-9]", "_", route.upper())
    return RouteEnv(f"KEYPROXY_{name}_BASE_URL", f"KEYPROXY_{name}_TOKEN")


# Vault's and OpenBao's own tokens, which `keyproxy dev`'s environment file exports: the
# command never gets them (with one it could read the keys from Vault itself).
VAULT_CREDENTIALS: Final = ("VAULT_TOKEN", "BAO_TOKEN")
NO_PROXY_VARS: Final = ("no_proxy", "NO_PROXY")


def child_env(
    environ: Mapping[str, str],
    proxy: str,
    token: Secret,
    *,
    token_id: str,
    routes: Sequence[str],
    overrides: Mapping[str, RouteEnv],
    hidden: Sequence[str],
    identity: Secret,
    refused: Sequence[str] = (),
) -> dict[str, str]:
    """The wrapped command's environment: `environ` without the `hidden` variables, without
    any variable holding the `identity` exchanged and without the variables of the routes
    asked for but `refused`; plus each granted route's base URL and token, KEYPROXY_URL,
    KEYPROXY_TASK_TOKEN (for a sub-agent's delegated token), KEYPROXY_TOKEN_ID, and the
    proxy's host among those reached without an HTTP proxy."""
    # SECURITY: the identity goes by its value, not only by the name it was read from. A
    # sub-agent started with `keyproxy run --identity-env KEYPROXY_TASK_TOKEN` inherits its
    # parent's token under every name the parent's run gave it (OPENAI_API_KEY,
    # KEYPROXY_<ROUTE>_TOKEN): kept, it would hold the broader token the delegation narrows.
    held = identity.reveal()
    env = {k: v for k, v in environ.items() if k not in hidden and held not in v}
    # SECURITY: a route asked for but `refused` (policy granted nothing on it) gets no
    # variables, and none inherited either: a real key or a base URL elsewhere left in them
    # (OPENAI_API_KEY in a developer's shell) would send its requests around keyproxy.
    for route in refused:
        names = route_env(route, overrides)
        for name in (names.base_var, names.key_var):
            env.pop(name, None)
    for route in routes:
        names = route_env(route, overrides)
        if names.base_var:
            env[names.base_var] = f"{proxy}{ROUTE_PREFIX}{route}{names.suffix}"
        if names.key_var:
            env[names.key_var] = token.reveal()
    env["KEYPROXY_URL"] = proxy
    env["KEYPROXY_TASK_TOKEN"] = token.reveal()
    env["KEYPROXY_TOKEN_ID"] = token_id
    _reach_directly(env, proxy)
    return env


def _reach_directly(env: dict[str, str], proxy: str) -> None:
    """Add the proxy's host to the command's no-proxy list, so that its HTTP client connects
    to keyproxy as the wrapper did: directly.

    SECURITY: SDKs honour HTTP_PROXY, HTTPS_PROXY and ALL_PROXY (httpx, requests, urllib),
    which the wrapper ignores. Inherited, one would send every request, its task token in the
    Authorization header, to that other host: in clear text for an http:// proxy URL, which
    the wrapper trusts on loopback or behind a mesh. Both names are set (curl, urllib and
    httpx read the lower-case one first, Go the upper-case one), each to its own list, or
    else the other's, plus the host (an IPv6 address bare: httpx refuses a client whose
    list holds one in brackets; curl and Go match it bare, urllib does not). A list that is
    `*` (no proxy for anything) is left as it is: urllib and curl honour `*` only as the
    whole value."""
    host = urllib.parse.urlsplit(proxy).hostname
    if not host:
        return
    either = next((env[name] for name in NO_PROXY_VARS if env.get(name)), "")
    for name in NO_PROXY_VARS:
        listed = env.get(name) or either
        if listed.strip() == "*":
            env[name] = listed
            continue
        env[name] = f"{listed},{host}" if listed else host
