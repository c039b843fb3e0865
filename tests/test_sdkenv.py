"""keyproxy.sdkenv: the scope `keyproxy run` asks for and the environment it hands the
command, as tables (pure, no I/O)."""

from __future__ import annotations

import urllib.parse
import urllib.request
from typing import Any

import httpx
import pytest

from keyproxy.errors import RunError
from keyproxy.sdkenv import RouteEnv, child_env, parse_env, parse_scope, route_env
from keyproxy.secret import Secret

PROXY = "https://keyproxy.internal"


@pytest.mark.parametrize(
    ("items", "extra", "scope"),
    [
        (["openai:POST:/v1/chat/completions"], None,
         {"openai": [{"methods": ["POST"], "paths": ["/v1/chat/completions"]}]}),
        (["openai:post:/v1/a", "openai:POST:/v1/b", "openai:GET:/v1/models"], None,
         {"openai": [{"methods": ["POST"], "paths": ["/v1/a", "/v1/b"]},
                     {"methods": ["GET"], "paths": ["/v1/models"]}]}),
        (["reports"], None, {"reports": [{"methods": ["*"], "paths": ["/**"]}]}),
        (["api:GET,HEAD"], None, {"api": [{"methods": ["GET", "HEAD"], "paths": ["/**"]}]}),
        ([], {"gh": {"tools": ["search_issues"]}}, {"gh": [{"tools": ["search_issues"]}]}),
    ],
)  # fmt: skip
def test_scope_items_become_the_json_scope(
    items: list[str], extra: dict[str, Any] | None, scope: dict[str, Any]
) -> None:
    """route[:METHODS[:/path]] items (as in the RFC 8693 form) become {route: [grants]},
    paths of the same methods sharing one grant; --scope-json adds its grants."""
    assert parse_scope(items, extra) == scope


@pytest.mark.parametrize("items", [[], [":GET:/x"]])
def test_an_empty_or_nameless_scope_is_refused(items: list[str]) -> None:
    """No scope at all, or an item without a route, is a RunError."""
    with pytest.raises(RunError):
        parse_scope(items)


@pytest.mark.parametrize(
    ("route", "overrides", "names"),
    [
        ("openai", [], RouteEnv("OPENAI_BASE_URL", "OPENAI_API_KEY", "/v1")),
        ("anthropic", [], RouteEnv("ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY")),
        ("legacy-crm", [], RouteEnv("KEYPROXY_LEGACY_CRM_BASE_URL", "KEYPROXY_LEGACY_CRM_TOKEN")),
        ("demo", ["demo=OPENAI_BASE_URL,OPENAI_API_KEY"],
         RouteEnv("OPENAI_BASE_URL", "OPENAI_API_KEY", "/v1")),
        ("crm", ["crm=CRM_URL,CRM_KEY,/api/v2/"], RouteEnv("CRM_URL", "CRM_KEY", "/api/v2")),
        ("crm", ["crm=,CRM_KEY"], RouteEnv("", "CRM_KEY")),
    ],
)  # fmt: skip
def test_each_route_gets_the_variables_its_sdk_reads(
    route: str, overrides: list[str], names: RouteEnv
) -> None:
    """openai and anthropic get their SDKs' variables (the openai base URL ends in /v1), other
    routes KEYPROXY_<ROUTE>_*; --env names others, and OPENAI_BASE_URL brings its /v1."""
    assert route_env(route, parse_env(overrides)) == names


@pytest.mark.parametrize("item", ["openai", "openai=A", "openai=A,B,C,D", "=A,B", "x=1A,B"])
def test_a_malformed_env_item_is_refused(item: str) -> None:
    """--env needs ROUTE=BASE_VAR,KEY_VAR[,/suffix] with variable names."""
    with pytest.raises(RunError):
        parse_env([item])


def test_the_child_env_has_the_routes_and_not_the_identity() -> None:
    """The hidden variables go, each granted route's pair comes, with KEYPROXY_URL and the
    token id; the rest of the environment is kept."""
    env = child_env(
        {"PATH": "/bin", "IDENTITY": "eyJ.id.token", "OPENAI_API_KEY": "stale"},
        PROXY,
        Secret("task-token"),
        token_id="t1",
        routes=("openai", "crm"),
        overrides=parse_env(["crm=CRM_URL,CRM_KEY"]),
        hidden=("IDENTITY",),
        identity=Secret("eyJ.id.token"),
    )
    assert env == {
        "PATH": "/bin",
        "OPENAI_BASE_URL": f"{PROXY}/r/openai/v1",
        "OPENAI_API_KEY": "task-token",
        "CRM_URL": f"{PROXY}/r/crm",
        "CRM_KEY": "task-token",
        "KEYPROXY_URL": PROXY,
        "KEYPROXY_TASK_TOKEN": "task-token",
        "KEYPROXY_TOKEN_ID": "t1",
        "no_proxy": "keyproxy.internal",
        "NO_PROXY": "keyproxy.internal",
    }


def test_the_identity_goes_under_whatever_name_it_is_held() -> None:
    """A variable that holds the identity exchanged, under a name no option named (a parent
    run's token in OPENAI_API_KEY when a sub-agent exchanges it), is withheld too."""
    env = child_env(
        {"PATH": "/bin", "OPENAI_API_KEY": "eyJ.parent.token", "AUTH": "Bearer eyJ.parent.token"},
        PROXY,
        Secret("child-token"),
        token_id="t2",
        routes=("crm",),
        overrides={},
        hidden=("KEYPROXY_TASK_TOKEN",),
        identity=Secret("eyJ.parent.token"),
    )
    assert "eyJ.parent.token" not in "".join(env.values())
    assert env["PATH"] == "/bin"


@pytest.mark.parametrize(
    ("proxy", "environ", "lists"),
    [
        ("http://127.0.0.1:8080", {}, ("127.0.0.1", "127.0.0.1")),
        ("http://[::1]:8080", {}, ("::1", "::1")),
        (PROXY, {"NO_PROXY": "*"}, ("*", "*")),  # nothing through a proxy already
        (PROXY, {"NO_PROXY": "corp.example"},
         ("corp.example,keyproxy.internal", "corp.example,keyproxy.internal")),
        (PROXY, {"no_proxy": "a", "NO_PROXY": "b"}, ("a,keyproxy.internal", "b,keyproxy.internal")),
    ],
)  # fmt: skip
def test_the_command_reaches_the_proxy_without_an_http_proxy(
    proxy: str, environ: dict[str, str], lists: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proxy's host joins no_proxy and NO_PROXY (each keeping its list, or taking the
    other's), so an inherited HTTP(S)_PROXY never carries the command's requests to keyproxy,
    as urllib (and requests) read the list; a list that is `*` stays whole."""
    env = child_env(
        {"HTTP_PROXY": "http://egress.corp:3128", **environ},
        proxy,
        Secret("task-token"),
        token_id="t1",
        routes=(),
        overrides={},
        hidden=(),
        identity=Secret("eyJ.id.token"),
    )
    assert (env["no_proxy"], env["NO_PROXY"]) == lists
    hostport = urllib.parse.urlsplit(proxy).netloc  # as urllib's opener asks
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]  # untyped
    # urllib matches an IPv6 address only in brackets, which would break every httpx client.
    assert bypass(hostport, {"no": env["no_proxy"]}) or "[" in hostport
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, env[name])
    httpx.Client().close()  # the client of the SDKs (mcp) reads the lists without error


def test_a_route_refused_keeps_no_inherited_variables() -> None:
    """A route asked for but not granted gets no variables, and loses those inherited under
    its names (a real key, a base URL elsewhere), which would send its calls around keyproxy;
    a granted route using the same names still gets them."""
    inherited = {"OPENAI_API_KEY": "sk-real", "OPENAI_BASE_URL": "https://api.openai.com/v1"}
    env = child_env(
        {"PATH": "/bin", **inherited},
        PROXY,
        Secret("task-token"),
        token_id="t1",
        routes=("crm",),
        overrides={},
        hidden=(),
        identity=Secret("eyJ.id.token"),
        refused=("openai",),
    )
    assert not set(inherited) & set(env)
    env = child_env(
        inherited,
        PROXY,
        Secret("task-token"),
        token_id="t1",
        routes=("demo",),
        overrides=parse_env(["demo=OPENAI_BASE_URL,OPENAI_API_KEY"]),
        hidden=(),
        identity=Secret("eyJ.id.token"),
        refused=("openai",),
    )
    assert env["OPENAI_API_KEY"] == "task-token"
