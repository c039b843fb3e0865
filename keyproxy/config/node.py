"""A YAML value with its path (`Node`), so every error can say where it is, and the readers
the sections share: optional and required keys, durations, sizes, secret references."""

from __future__ import annotations

import contextlib
import ipaddress
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from keyproxy.config.loader import close_match, item_path, key_path
from keyproxy.config.model import Network, SecretRef
from keyproxy.errors import ConfigError
from keyproxy.text import hidden

T = TypeVar("T")

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# The longest duration: 100 years. A longer one is no setting anybody means, and some are
# refused further down (a rate window or lease of a few thousand years is a number the state
# store rejects, which would refuse every request of its limit).
MAX_DURATION = 100 * 365 * 86400.0
_SIZE = re.compile(r"^(\d+)\s*(B|KiB|MiB|GiB)?$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


class Node:
    """A YAML value with its path, so every error can say where it is."""

    def __init__(self, value: Any, path: str) -> None:
        self.value = value
        self.path = path

    def error(self, message: str) -> ConfigError:
        return ConfigError(self.path or "(top level)", message)

    def mapping(self, allowed: set[str]) -> dict[str, Node]:
        if not isinstance(self.value, dict):
            raise self.error("must be a mapping")
        out: dict[str, Node] = {}
        for key, value in self.value.items():
            child = self._child(str(key))
            if not isinstance(key, str):
                raise child.error("keys must be strings")
            if key not in allowed:
                raise child.error(
                    f"unknown key{did_you_mean(key, allowed)} "
                    f"(expected one of: {', '.join(sorted(allowed))})"
                )
            out[key] = Node(value, child.path)
        return out

    def items(self) -> list[tuple[str, Node]]:
        if not isinstance(self.value, dict):
            raise self.error("must be a mapping")
        return [(str(k), Node(v, self._child(str(k)).path)) for k, v in self.value.items()]

    def sequence(self) -> list[Node]:
        if not isinstance(self.value, list):
            raise self.error("must be a list")
        return [
            Node(v, item_path(self.path, i, v.get("name") if isinstance(v, dict) else None))
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
        """Seconds, positive and at most MAX_DURATION: a number, or a number with a unit. One
        too large for a float (an integer of 400 digits, `.inf`) is no duration."""
        value = self.value
        seconds = math.nan
        if isinstance(value, int | float) and not isinstance(value, bool):
            with contextlib.suppress(OverflowError):
                seconds = float(value)
        elif isinstance(value, str) and (match := _DURATION.match(value)):
            seconds = float(match[1]) * _DURATION_UNITS[match[2]]
        if not (math.isfinite(seconds) and seconds > 0):
            raise self.error("must be a positive duration such as 500ms, 30s, 15m, 24h")
        if seconds > MAX_DURATION:
            raise self.error("must be a duration of at most 100 years (36500d)")
        return seconds

    def size(self) -> int:
        value = self.value
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        match = _SIZE.match(value) if isinstance(value, str) else None
        if not match or int(match[1]) <= 0:
            raise self.error("must be a positive size such as 65536, 64KiB or 10MiB")
        return int(match[1]) * _SIZE_UNITS[match[2]]

    def count(self) -> int:
        return self.whole(1, None, "a positive whole number")

    def whole(self, low: int, high: int | None, wanted: str) -> int:
        """A whole number from `low` to `high` (None: no bound), or the error "must be
        `wanted`". YAML's true and false are no numbers here."""
        value = self.value
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or value < low
            or (high is not None and value > high)
        ):
            raise self.error(f"must be {wanted}")
        return value

    def host_name(self) -> str:
        """A host name as a Host header gives it: lower case, without a final dot or a port."""
        name = self.string().lower().rstrip(".")
        if not name or any(c in name for c in ":/@[]% "):
            raise self.error("must be a host name, without a port")
        return name

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

    def _child(self, key: str) -> Node:
        return Node(None, key_path(self.path, key))


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    match = close_match(word, choices)
    return f", did you mean {match}?" if match else ""


def opt(fields: dict[str, Node], key: str, read: Callable[[Node], T], default: T) -> T:
    node = fields.get(key)
    return default if node is None else read(node)


def required(node: Node, fields: dict[str, Node], key: str) -> Node:
    if key not in fields:
        raise node._child(key).error("is required")
    return fields[key]


def secret_ref(node: Node, kv_mount: str, default_field: str = "api_key") -> SecretRef:
    f = node.mapping({"mount", "path", "field"})
    return SecretRef(
        mount=opt(f, "mount", Node.string, kv_mount).strip("/"),
        path=required(node, f, "path").string().strip("/"),
        field=opt(f, "field", Node.string, default_field),
    )


def key_template(node: Node) -> str:
    template = node.string()
    rest = template.replace("{key}", "", 1)
    if "{key}" not in template or "{" in rest or "}" in rest:
        raise node.error("must contain {key} exactly once and no other braces")
    if hidden(template):  # the rule of keys and agents' names (keyproxy.text)
        raise node.error("must not contain control characters (C0, DEL, C1 or bidirectional)")
    return template
