"""What one listener's connections may cost, and the accounting of those it refuses
(keyproxy.server.listen applies them to each connection).

    Limits.of(server)   the `server` section's limits: header and keep-alive timeouts,
                        connections in all and per source address (trusted proxies exempt)
    Guard               a listener's open connections counted against them; a refused or
                        timed-out connection counted and logged at most once a second per
                        reason, so a flood cannot become a log flood
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import structlog

from keyproxy.addresses import IPAddress
from keyproxy.config import Network, ServerConfig
from keyproxy.metrics import Metrics

log = structlog.get_logger("keyproxy.server")

_EVENT_INTERVAL: Final = 1.0  # seconds between two log events of one connection reason


@dataclass(frozen=True)
class Limits:
    """What one listener allows its connections (from `server`, see ServerConfig)."""

    header_timeout: float
    keepalive_timeout: float
    max_connections: int
    max_connections_per_source: int
    trusted: tuple[Network, ...] = ()

    @classmethod
    def of(cls, server: ServerConfig) -> Limits:
        return cls(
            server.header_timeout,
            server.keepalive_timeout,
            server.max_connections,
            server.max_connections_per_source,
            server.trusted_proxies,
        )


class Guard:
    """A listener's connection counts, and the accounting of what it refused. `trusted`
    gives the trusted proxies in force (a reload changes them); else `limits.trusted`."""

    def __init__(
        self,
        limits: Limits,
        metrics: Callable[[], Metrics | None],
        trusted: Callable[[], tuple[Network, ...]] | None = None,
    ) -> None:
        self.limits = limits
        self._metrics = metrics
        self._trusted = trusted or (lambda: limits.trusted)
        self.open = 0
        self._by_source: Counter[str] = Counter()
        self._logged: dict[str, float] = {}

    def exempt(self, address: IPAddress | None) -> bool:
        """Whether a connection from `address` is exempt from the per-source limit: from a
        proxy trusted now. Asked once per connection, which keeps its answer."""
        return address is not None and any(address in n for n in self._trusted())

    def admit(self, source: str, exempt: bool) -> str | None:
        """Count a new connection from `source`, or why it is refused."""
        if self.open >= self.limits.max_connections:
            return "max_connections"
        if not exempt and self._by_source[source] >= self.limits.max_connections_per_source:
            return "max_connections_per_source"
        self.open += 1
        if not exempt:
            self._by_source[source] += 1
        return None

    def release(self, source: str, exempt: bool) -> None:
        self.open -= 1
        if not exempt and source in self._by_source:
            self._by_source[source] -= 1
            if not self._by_source[source]:
                del self._by_source[source]

    def closed(self, reason: str, source: str) -> None:
        """A connection closed by a limit: counted, and logged unless one just was."""
        metrics = self._metrics()
        if metrics is not None:
            metrics.connection_closed(reason)
        now = time.monotonic()
        if now - self._logged.get(reason, -_EVENT_INTERVAL) >= _EVENT_INTERVAL:
            self._logged[reason] = now
            log.warning("connection.closed", reason=reason, source=source)

    def malformed(self, source: str, kind: str, status: int) -> None:
        metrics = self._metrics()
        if metrics is not None:
            metrics.request(None, status, "malformed", 0.0)
        log.warning("request.malformed", source=source, error=kind, status=status)
