"""What changes between two configurations: the change list of a reload and of `check --diff`.

    diff(old, new) -> Changes     routes, policies and issuers added, removed and changed
                                  (by name), other sections changed, and the settings that
                                  keep their running value until a restart

Pure: no I/O. Everything compiled is a frozen dataclass, so "changed" is inequality of the
compiled objects: a comment or a reordering of keys in the file changes nothing here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from keyproxy.config.model import Config

# Settings a running server cannot take over: its listeners are bound and its Vault client
# logged in with them. A reload keeps their running values and names them.
RESTART_ONLY = (
    "server.host",
    "server.port",
    "server.admin",
    "server.header_timeout",
    "server.keepalive_timeout",
    "server.max_connections",
    "server.max_connections_per_source",
    "server.tls",  # the settings; the files' content is re-read live (keyproxy.tls)
    "vault",
    "state",  # the store is made once, at start
)


@dataclass(frozen=True)
class Delta:
    """Names added, removed and changed in one section."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def as_dict(self) -> dict[str, list[str]]:
        return {
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": list(self.changed),
        }


@dataclass(frozen=True)
class Changes:
    routes: Delta = Delta()
    policies: Delta = Delta()
    issuers: Delta = Delta()
    sections: tuple[str, ...] = ()  # other settings changed that apply live ("tokens", ...)
    needs_restart: tuple[str, ...] = ()  # changed, but kept at their running value

    def __bool__(self) -> bool:
        return bool(self.routes or self.policies or self.issuers or self.sections) or bool(
            self.needs_restart
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "routes": self.routes.as_dict(),
            "policies": self.policies.as_dict(),
            "issuers": self.issuers.as_dict(),
            "sections": list(self.sections),
            "needs_restart": list(self.needs_restart),
        }

    def lines(self) -> list[str]:
        """The change list as text, one change a line (`+ route openai`, `~ policy ci`)."""
        out = []
        for kind, delta in (
            ("route", self.routes),
            ("policy", self.policies),
            ("issuer", self.issuers),
        ):
            out += [f"+ {kind} {name}" for name in delta.added]
            out += [f"- {kind} {name}" for name in delta.removed]
            out += [f"~ {kind} {name}" for name in delta.changed]
        out += [f"~ {name}" for name in self.sections]
        out += [f"! {name} (needs a restart)" for name in self.needs_restart]
        return out


def diff(old: Config, new: Config, *, started: Config | None = None) -> Changes:
    """The changes from `old` to `new`; the restart-only settings `new` gives otherwise than
    `started` (what the server started with: each reload keeps those, `old` by default)."""
    started = old if started is None else started
    return Changes(
        routes=_delta(old.routes, new.routes),
        policies=_delta({p.name: p for p in old.policies}, {p.name: p for p in new.policies}),
        issuers=_delta({i.name: i for i in old.identity}, {i.name: i for i in new.identity}),
        sections=_sections(old, new),
        needs_restart=tuple(n for n in RESTART_ONLY if _at(started, n) != _at(new, n)),
    )


def keep_running(running: Config, new: Config) -> Config:
    """`new` with the restart-only settings of `running`: what a reload serves."""
    vault = running.vault
    server = running.server
    # Only the live part of `server` follows the new file.
    server = type(server)(
        **{f.name: getattr(server, f.name) for f in fields(server)}
        | {"trusted_proxies": new.server.trusted_proxies}
    )
    return Config(
        vault=vault,
        identity=new.identity,
        routes=new.routes,
        policies=new.policies,
        server=server,
        tokens=new.tokens,
        state=running.state,
    )


def _delta(old: Mapping[str, object], new: Mapping[str, object]) -> Delta:
    return Delta(
        added=tuple(name for name in new if name not in old),
        removed=tuple(name for name in old if name not in new),
        changed=tuple(name for name in new if name in old and old[name] != new[name]),
    )


def _sections(old: Config, new: Config) -> tuple[str, ...]:
    out = []
    if old.tokens != new.tokens:
        out.append("tokens")
    if old.server.trusted_proxies != new.server.trusted_proxies:
        out.append("server.trusted_proxies")
    return tuple(out)


def _at(config: Config, dotted: str) -> object:
    value: object = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value
