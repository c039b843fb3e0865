"""The `state` section and the `limits` of routes and policies compile, or name their mistake."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from keyproxy import config
from keyproxy.config import ConcurrencyLimit, RateLimit, RedisSettings
from keyproxy.errors import ConfigError
from tests.helpers.configs import CONFIG_SECTIONS

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
            "name": "agents",
            "subjects": ["*"],
            "allow": {"openai": {"methods": ["POST"], "paths": ["/**"]}},
        }
    ],
}


def _parse(**changes: Any) -> config.Config:
    doc = copy.deepcopy(BASE)
    route_limits = changes.pop("route_limits", None)
    policy_limits = changes.pop("policy_limits", None)
    if route_limits is not None:
        doc["routes"]["openai"]["limits"] = route_limits
    if policy_limits is not None:
        doc["policies"][0]["limits"] = policy_limits
    doc.update(changes)
    return config.parse(json.dumps(doc), {})


def _error(**changes: Any) -> str:
    with pytest.raises(ConfigError) as info:
        _parse(**changes)
    return str(info.value)


def test_no_state_section_means_in_process() -> None:
    """Without `state`, limits are counted in the process and nothing is limited."""
    cfg = _parse()
    assert cfg.state is None
    assert not cfg.limited


def test_state_section_compiles_every_setting(tmp_path: Path) -> None:
    """Every key of `state` lands in RedisSettings, durations and paths read as elsewhere."""
    password = tmp_path / "password"
    cfg = _parse(
        state={
            "url": "rediss://redis.internal:6380/2",
            "username": "keyproxy",
            "password_file": str(password),
            "ca_file": str(tmp_path / "ca.pem"),
            "timeout": "500ms",
            "max_connections": 16,
            "prefix": "kp-prod",
        }
    )
    assert cfg.state == RedisSettings(
        url="rediss://redis.internal:6380/2",
        username="keyproxy",
        password_file=password,
        ca_file=tmp_path / "ca.pem",
        timeout=0.5,
        max_connections=16,
        prefix="kp-prod",
    )
    sentinel = _parse(
        state={
            "url": "redis://",
            "sentinels": ["10.0.0.1:26379", "[::1]:26380"],
            "service_name": "main",
        }
    ).state
    assert sentinel is not None
    assert sentinel.sentinels == (("10.0.0.1", 26379), ("::1", 26380))
    assert sentinel.service_name == "main"
    cluster = _parse(state={"url": "redis://10.0.0.1:7000", "cluster": True}).state
    assert cluster is not None
    assert cluster.cluster


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ({}, "state.url: is required"),
        ({"url": "http://x"}, "state.url: must be a redis://, rediss:// or unix:// URL"),
        ({"url": "redis://x", "ca_file": "/ca.pem"}, "state.ca_file: needs a rediss:// url (TLS)"),
        ({"url": "redis://x", "sentinels": ["x"]}, "state.sentinels[0]: must be host:port"),
        (
            {"url": "redis://x", "sentinels": ["x:1"], "cluster": True},
            "state.cluster: set either sentinels or cluster, not both",
        ),
        (
            {"url": "redis://x", "service_name": "s"},
            "state.service_name: only applies with sentinels",
        ),
        ({"url": "redis://x", "prefix": "{a}"}, "state.prefix: must not contain braces"),
        ({"url": "redis://x", "timeout": 0}, "state.timeout: must be a positive duration"),
        (
            {"url": "redis://x", "timeout": "36501d"},
            "state.timeout: must be a duration of at most 100 years",
        ),
        ({"url": "redis://x", "db": 1}, "state.db: unknown key"),
    ],
)
def test_state_mistakes_name_their_path(state: dict[str, Any], expected: str) -> None:
    """A mistake in `state` is refused with its YAML path."""
    assert _error(state=state).startswith(expected)


def test_route_and_policy_limits_compile() -> None:
    """Rate limits and concurrency caps compile with default names, burst and fail-closed."""
    cfg = _parse(
        route_limits={
            "rate": [{"per": "route", "requests": 600, "window": "1m"}],
            "concurrency": [{"per": "identity", "max": 3}],
        },
        policy_limits={
            "on_store_error": "allow",
            "rate": [
                {"name": "agent-burst", "per": "identity", "requests": 50, "window": "10s"},
                {
                    "per": "task",
                    "requests": 5,
                    "window": "1s",
                    "burst": 2,
                    "on_store_error": "deny",
                },
            ],
        },
    )
    route = cfg.routes["openai"].limits
    assert route.rate == (RateLimit("route.openai.rate.route", "route", 600, 60.0, 60, "deny"),)
    assert route.concurrency == (
        ConcurrencyLimit("route.openai.concurrency.identity", "identity", 3, 30.0, "deny"),
    )
    policy = cfg.policies[0].limits
    assert policy.rate == (
        RateLimit("agent-burst", "identity", 50, 10.0, 5, "allow"),
        RateLimit("policy.agents.rate.task", "task", 5, 1.0, 2, "deny"),
    )
    assert cfg.limited


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        (
            {"rate": [{"per": "caller", "requests": 1, "window": "1s"}]},
            "routes.openai.limits.rate[0].per: must be one of identity, task, token, route",
        ),
        (
            {"rate": [{"per": "route", "window": "1s"}]},
            "routes.openai.limits.rate[0].requests: is required",
        ),
        (
            {"rate": [{"per": "route", "requests": 0, "window": "1s"}]},
            "routes.openai.limits.rate[0].requests: must be a positive whole number",
        ),
        (
            {"concurrency": [{"per": "route", "max": 1, "on_store_error": "open"}]},
            "routes.openai.limits.concurrency[0].on_store_error: must be deny (fail closed)",
        ),
        (
            {"rate": [{"name": "a b", "per": "route", "requests": 1, "window": "1s"}]},
            "routes.openai.limits.rate[0].name: limit names are letters",
        ),
        (
            {"rate": [{"name": "max_uses", "per": "route", "requests": 1, "window": "1s"}]},
            "routes.openai.limits.rate[0].name: 'max_uses' is the name of task tokens'",
        ),
        (
            {
                "rate": [
                    {"per": "route", "requests": 1, "window": "1s"},
                    {"per": "route", "requests": 100, "window": "1h"},
                ]
            },
            "routes.openai.limits.rate[1]: the limit name 'route.openai.rate.route' is also used "
            "by routes.openai.limits.rate[0]",
        ),
        ({"rates": []}, "routes.openai.limits.rates: unknown key, did you mean rate?"),
    ],
)
def test_limit_mistakes_name_their_path(limits: dict[str, Any], expected: str) -> None:
    """A mistake in a route's limits is refused with its YAML path."""
    assert _error(route_limits=limits).startswith(expected)


def test_policy_limit_mistakes_name_the_policy() -> None:
    """A policy's limit mistake names the policy in its path."""
    message = _error(policy_limits={"concurrency": [{"per": "identity"}]})
    assert message.startswith("policies[0] (agents).limits.concurrency[0].max: is required")


def test_the_exchange_limit_compiles_as_a_rate_per_identity() -> None:
    """`tokens.exchange_limit` reads like a route's rate (burst defaulting to a tenth,
    failing closed), is named `tokens.exchange` and counts as a limit for `--workers`;
    without it exchanges are not limited."""
    assert _parse().tokens.exchange_limit is None
    cfg = _parse(tokens={"exchange_limit": {"requests": 20, "window": "1m"}})
    assert cfg.tokens.exchange_limit == RateLimit("tokens.exchange", "identity", 20, 60.0, 2)
    assert cfg.limited  # several workers need a shared store for it, as for a route's
    limit = {"requests": 2, "window": "10s", "burst": 1, "on_store_error": "allow"}
    cfg = _parse(tokens={"exchange_limit": limit})
    assert cfg.tokens.exchange_limit == RateLimit(
        "tokens.exchange", "identity", 2, 10.0, 1, "allow"
    )


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        ({"window": "1m"}, "tokens.exchange_limit.requests: is required"),
        ({"requests": 2}, "tokens.exchange_limit.window: is required"),
        (
            {"requests": 0, "window": "1m"},
            "tokens.exchange_limit.requests: must be a positive whole number",
        ),
        (
            {"requests": 2, "window": "1m", "burst": 0},
            "tokens.exchange_limit.burst: must be a positive whole number",
        ),
        (
            {"requests": 2, "window": "1m", "on_store_error": "open"},
            "tokens.exchange_limit.on_store_error: must be deny (fail closed)",
        ),
        (
            {"requests": 2, "window": "1m", "per": "route"},
            "tokens.exchange_limit.per: unknown key",
        ),
        ("20/m", "tokens.exchange_limit: must be a mapping"),
    ],
)
def test_exchange_limit_mistakes_name_their_path(limit: Any, expected: str) -> None:
    """A mistake in `tokens.exchange_limit` is refused with its YAML path; it is always
    per identity, so `per` (and `name`) are unknown keys there."""
    assert _error(tokens={"exchange_limit": limit}).startswith(expected)


def test_no_route_limit_takes_the_exchange_limit_name() -> None:
    """A route's limit named `tokens.exchange` would count in the exchange limit's keys."""
    limits = {
        "rate": [{"name": "tokens.exchange", "per": "identity", "requests": 1, "window": "1s"}]
    }
    message = _error(route_limits=limits)
    assert message.startswith("routes.openai.limits.rate[0].name: 'tokens.exchange' is the name")


def test_a_new_exchange_limit_applies_on_reload() -> None:
    """A changed `exchange_limit` is a live change of the tokens section: what a reload
    serves has the new limit."""
    old = _parse()
    new = _parse(tokens={"exchange_limit": {"requests": 2, "window": "1m"}})
    changes = config.diff(old, new)
    assert (changes.sections, changes.needs_restart) == (("tokens",), ())
    assert config.keep_running(old, new).tokens.exchange_limit == new.tokens.exchange_limit
