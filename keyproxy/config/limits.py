"""The `state` section (where limits are counted) and the `limits` of routes and policies."""

from __future__ import annotations

import re
from typing import Literal, get_args

from keyproxy.config.node import Node, opt, required
from keyproxy.config.store import ConcurrencyLimit, LimitPer, Limits, RateLimit, RedisSettings

# A limit's name is part of its keys in the store, of the RateLimit headers (a quoted
# string) and of metrics labels: plain characters only.
LIMIT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}\Z")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
# The name the token's max_uses counter goes by: no configured limit may take it.
MAX_USES = "max_uses"
_PERS: tuple[str, ...] = get_args(LimitPer)
_RATE = ("requests", "window", "burst", "on_store_error")  # a rate's fields besides its name
# The name of tokens.exchange_limit, in its store keys and its RateLimit fields.
EXCHANGE_LIMIT = "tokens.exchange"
_URL_SCHEMES = ("redis", "rediss", "unix")


def state_config(node: Node) -> RedisSettings:
    f = node.mapping(
        {
            "url",
            "username",
            "password_file",
            "ca_file",
            "sentinels",
            "service_name",
            "cluster",
            "timeout",
            "max_connections",
            "prefix",
        }
    )
    url_node = required(node, f, "url")
    url = url_node.string()
    scheme = url.partition("://")[0].lower()
    if scheme not in _URL_SCHEMES or "://" not in url:
        raise url_node.error("must be a redis://, rediss:// or unix:// URL")
    d = RedisSettings()
    settings = RedisSettings(
        url=url,
        username=opt(f, "username", Node.string, None),
        password_file=opt(f, "password_file", Node.path_value, None),
        ca_file=opt(f, "ca_file", Node.path_value, None),
        sentinels=opt(f, "sentinels", _sentinels, ()),
        service_name=opt(f, "service_name", Node.string, d.service_name),
        cluster=opt(f, "cluster", Node.boolean, False),
        timeout=opt(f, "timeout", Node.duration, d.timeout),
        max_connections=opt(f, "max_connections", Node.count, d.max_connections),
        prefix=opt(f, "prefix", Node.string, d.prefix),
    )
    if settings.ca_file is not None and scheme != "rediss":
        raise f["ca_file"].error("needs a rediss:// url (TLS)")
    if settings.sentinels and settings.cluster:
        raise f["cluster"].error("set either sentinels or cluster, not both")
    if "service_name" in f and not settings.sentinels:
        raise f["service_name"].error("only applies with sentinels")
    if "{" in settings.prefix or "}" in settings.prefix:
        raise f["prefix"].error("must not contain braces (it becomes a Cluster hash tag)")
    return settings


def _sentinels(node: Node) -> tuple[tuple[str, int], ...]:
    out = []
    for item in node.sequence():
        host, colon, port = item.string().rpartition(":")
        if not colon or not host or not port.isascii() or not port.isdigit():
            raise item.error("must be host:port")
        if not 0 < int(port) < 65536:
            raise item.error("the port must be 1-65535")
        out.append((host.strip("[]"), int(port)))
    if not out:
        raise node.error("must list at least one host:port")
    return tuple(out)


def limits_config(node: Node, owner: str) -> Limits:
    """A route's or a policy's `limits`; `owner` ("route.openai", "policy.agents") starts
    the default names of its limits."""
    f = node.mapping({"rate", "concurrency", "on_store_error"})
    default: Literal["deny", "allow"] = opt(f, "on_store_error", _on_store_error, "deny")
    rates: list[Node] = opt(f, "rate", Node.sequence, [])
    caps: list[Node] = opt(f, "concurrency", Node.sequence, [])
    rate = tuple(_rate(item, owner, default) for item in rates)
    concurrency = tuple(_concurrency(item, owner, default) for item in caps)
    return Limits(rate, concurrency)


def _name(f: dict[str, Node], owner: str, kind: str, per: str) -> str:
    if "name" not in f:
        return f"{_UNSAFE.sub('_', owner)}.{kind}.{per}"[:128]
    name = f["name"].string()
    if not LIMIT_NAME.match(name):
        raise f["name"].error("limit names are letters, digits, '_', '.', '-' (max 128)")
    if name == MAX_USES:
        raise f["name"].error(f"{MAX_USES!r} is the name of task tokens' use counters")
    if name == EXCHANGE_LIMIT:
        # It would count in tokens.exchange_limit's keys.
        raise f["name"].error(f"{EXCHANGE_LIMIT!r} is the name of tokens.exchange_limit")
    return name


def _per(node: Node, f: dict[str, Node], allowed: tuple[str, ...]) -> LimitPer:
    per = required(node, f, "per").string()
    if per not in allowed:
        raise f["per"].error(f"must be one of {', '.join(allowed)}")
    return per  # type: ignore[return-value]  # checked against LimitPer's values above


def _rate(node: Node, owner: str, default: Literal["deny", "allow"]) -> RateLimit:
    f = node.mapping({"name", "per", *_RATE})
    per = _per(node, f, _PERS)
    return _rate_of(node, f, _name(f, owner, "rate", per), per, default)


def exchange_limit(node: Node) -> RateLimit:
    """`tokens.exchange_limit`: token exchanges per workload identity (a delegation counts as
    the identity its chain was issued to), named `EXCHANGE_LIMIT`."""
    f = node.mapping(set(_RATE))
    return _rate_of(node, f, EXCHANGE_LIMIT, "identity", "deny")


def _rate_of(
    node: Node, f: dict[str, Node], name: str, per: LimitPer, default: Literal["deny", "allow"]
) -> RateLimit:
    """The rate `node` (read as `f`) sets: its requests, window, burst and on_store_error."""
    requests = required(node, f, "requests").count()
    return RateLimit(
        name=name,
        per=per,
        requests=requests,
        window=required(node, f, "window").duration(),
        # A tenth of the window's requests may come at once: a window admits at most
        # requests + burst.
        burst=opt(f, "burst", Node.count, max(1, requests // 10)),
        on_store_error=opt(f, "on_store_error", _on_store_error, default),
    )


def _concurrency(node: Node, owner: str, default: Literal["deny", "allow"]) -> ConcurrencyLimit:
    f = node.mapping({"name", "per", "max", "lease", "on_store_error"})
    per = _per(node, f, _PERS)
    return ConcurrencyLimit(
        name=_name(f, owner, "concurrency", per),
        per=per,
        max=required(node, f, "max").count(),
        lease=opt(f, "lease", Node.duration, 30.0),
        on_store_error=opt(f, "on_store_error", _on_store_error, default),
    )


def _on_store_error(node: Node) -> Literal["deny", "allow"]:
    value = node.string()
    if value not in ("deny", "allow"):
        raise node.error("must be deny (fail closed) or allow")
    return value  # type: ignore[return-value]  # checked above
