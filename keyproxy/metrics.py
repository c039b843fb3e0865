"""Prometheus metrics, served at GET /metrics (prometheus-client, one registry per app).

    keyproxy_requests_total{route,status,decision}      counter, every proxied request
    keyproxy_request_duration_seconds{route}            histogram, allowed requests
    keyproxy_tokens_total{event}                        counter: issued, denied, revoked
    keyproxy_tokens_ended_total{reason}                 counter: task tokens ended, by end reason
    keyproxy_connections_closed_total{reason}           counter: connections keyproxy closed
                                                        (max_connections,
                                                        max_connections_per_source,
                                                        header_timeout)
    keyproxy_key_version{route}                         gauge: the KV version being injected
    keyproxy_key_age_seconds{route}                     gauge: since Vault created that version
    keyproxy_key_staleness_seconds{route}               gauge: since last read or confirmed
    keyproxy_key_ready{route}                           gauge: 1 when a fresh key is loaded
    keyproxy_key_rotations_total{route}                 counter: new versions this replica saw
    keyproxy_vault_reads_total{route}                   counter: key reads from Vault
    keyproxy_vault_read_errors_total{route}             counter: failed key reads
    keyproxy_identity_keys_age_seconds{issuer}          gauge: since the issuer's JWKS was fetched
    keyproxy_identity_keys{issuer}                      gauge: usable keys in it (0: all refused)
    keyproxy_identity_keys_stale{issuer}                gauge: 1 past jwks_max_staleness
    keyproxy_identity_stale_refusals_total{issuer}      counter: tokens refused for stale keys
    keyproxy_token_keys_age_seconds                     gauge: since the Transit keys were read
    keyproxy_token_keys_stale                           gauge: 1 past tokens.key_max_staleness
    keyproxy_token_keys_stale_refusals_total            counter: task tokens refused for it
    keyproxy_revocation_list_entries                    gauge: entries of the list held
    keyproxy_revocation_list_read                       gauge: 1 once the list was read
    keyproxy_revocation_list_age_seconds                gauge: since its last whole read began
    keyproxy_limit_refusals_total{route,limit}          counter: requests a limit refused
                                                        (also for the state store's faults)
    keyproxy_state_store_decisions_total                counter: decisions asked of the store
    keyproxy_state_store_errors_total                   counter: decisions it did not answer
    keyproxy_state_store_decision_seconds               summary: time per decision (_sum,
                                                        _count), and its _max since start

The key, signing-key, revocation-list and store series are read from their holders when
scraped (keyproxy.gauges), so they cost the request path nothing. Rotation runs (`keyproxy
rotate`) are separate processes: they report through `keyproxy rotate --metrics-file`, for
node_exporter's textfile collector. No label or value ever holds a key or a token.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
    write_to_textfile,
)
from prometheus_client.core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from keyproxy import gauges
from keyproxy.state import StoreStats
from keyproxy.tokens.listread import RevocationStatus
from keyproxy.tokens.revocation import END_REASONS

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# The buckets' upper bounds as the exposition writes them ("le" labels).
_BOUNDS = (*(floatToGoString(b) for b in BUCKETS), "+Inf")  # type: ignore[no-untyped-call]


class Metrics:
    """The serving process's metrics."""

    def __init__(self, key_status: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = _RequestCollector()
        self.registry.register(self._requests)
        self.tokens = Counter(
            "keyproxy_tokens",
            "Task tokens issued, denied and revoked by this replica.",
            ["event"],
            registry=self.registry,
        )
        self.tokens_ended = Counter(
            "keyproxy_tokens_ended",
            "Task tokens whose end this replica recorded, by reason: completed, failed, timeout "
            "(the holder's word), heartbeat_lost, parent_revoked.",
            ["reason"],
            registry=self.registry,
        )
        for reason in END_REASONS:
            if reason != "operator":  # recorded by `keyproxy token revoke`, not a replica
                self.tokens_ended.labels(reason)
        self.connections_closed = Counter(
            "keyproxy_connections_closed",
            "Connections keyproxy refused or closed by a limit, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.tls_refusals = Counter(
            "keyproxy_tls_refused",
            "TLS handshakes refused (an untrusted, expired or missing client certificate, or no "
            "TLS at all), by listener and reason.",
            ["listener", "reason"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "keyproxy_config_reload",
            "Configuration reloads, by result: ok, error (the running one stays), unchanged.",
            ["result"],
            registry=self.registry,
        )
        for result in ("ok", "error", "unchanged"):
            self.reloads.labels(result)
        self.config_loaded = Gauge(
            "keyproxy_config_loaded_timestamp_seconds",
            "When the configuration in force was loaded (Unix time), labelled by its hash.",
            ["hash"],
            registry=self.registry,
        )
        self.registry.register(gauges.KeyCollector(key_status))
        self.limit_refusals = Counter(
            "keyproxy_limit_refusals",
            "Requests refused by a limit (or because the state store could not check it), "
            "by route and limit name.",
            ["route", "limit"],
            registry=self.registry,
        )
        # Counts one request: (route, status, decision, seconds). The collector's own
        # method, called on every request without a call in between.
        self.request: Callable[[str | None, int, str, float], None] = self._requests.add

    def config_in_force(self, digest: str, loaded_at: float) -> None:
        """The configuration now serving: its hash and load time (one series at a time)."""
        self.config_loaded.clear()
        self.config_loaded.labels(digest).set(loaded_at)

    def token_ended(self, reason: str) -> None:
        """A task token's end was recorded here, for `reason` (keyproxy.tokens.END_REASONS)."""
        self.tokens_ended.labels(reason).inc()

    def connection_closed(self, reason: str) -> None:
        self.connections_closed.labels(reason).inc()

    def tls_refused(self, listener: str, reason: str) -> None:
        self.tls_refusals.labels(listener, reason).inc()

    def limit_refused(self, route: str | None, limit: str) -> None:
        self.limit_refusals.labels(route or "-", limit).inc()

    def watch_store(self, stats: StoreStats) -> None:
        """Export the state store's running totals. Read when scraped."""
        self.registry.register(gauges.StoreCollector(stats))

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def watch_signing_keys(
        self,
        issuers: Callable[[], dict[str, dict[str, Any]]],
        task_keys: Callable[[], dict[str, Any]],
    ) -> None:
        """Export the verification keys' freshness: the identity verifier's `key_status` per
        issuer, and the task tokens' `key_status`. Read when scraped."""
        self.registry.register(gauges.SigningKeysCollector(issuers, task_keys))

    def watch_revocations(self, status: Callable[[], RevocationStatus]) -> None:
        """Export the revocation list as this process holds it (`RevocationStore.
        revocation_status`): read when scraped."""
        self.registry.register(gauges.RevocationsCollector(status))


class _RequestCollector(Collector):
    """Request counts and durations, kept in plain dicts by the event loop's thread (the only
    writer) and turned into a counter and a histogram when scraped: prometheus-client's own
    children take a lock and walk the buckets on every update, on every request. Keys are
    bounded by routes x statuses x decisions."""

    def __init__(self) -> None:
        self.counts: defaultdict[tuple[str | None, int, str], int] = defaultdict(int)
        # Per route: requests per bucket (the last one above every bound), and their sum.
        self.buckets: defaultdict[str | None, list[int]] = defaultdict(
            lambda: [0] * (len(BUCKETS) + 1)
        )
        self.sums: defaultdict[str | None, float] = defaultdict(float)

    def add(self, route: str | None, status: int, decision: str, seconds: float) -> None:
        self.counts[route, status, decision] += 1
        if decision == "allow":
            self.buckets[route][bisect.bisect_left(BUCKETS, seconds)] += 1
            self.sums[route] += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "keyproxy_requests",
            "Requests through the proxy, by route, status and policy decision.",
            labels=["route", "status", "decision"],
        )
        for (route, status, decision), count in sorted(
            self.counts.items(), key=lambda item: (item[0][0] or "-", item[0][1], item[0][2])
        ):
            requests.add_metric([route or "-", str(status), decision], count)
        latency = HistogramMetricFamily(
            "keyproxy_request_duration_seconds",
            "Time from request to the end of the answer, allowed requests.",
            labels=["route"],
        )
        for route, counts in sorted(self.buckets.items(), key=lambda item: item[0] or "-"):
            cumulative = itertools.accumulate(counts)
            latency.add_metric(
                [route or "-"], list(zip(_BOUNDS, cumulative, strict=True)), self.sums[route]
            )
        yield requests
        yield latency


def write_rotation_textfile(path: Path, outcomes: Sequence[tuple[str, str]]) -> None:
    """For `keyproxy rotate --metrics-file`: the result of this run per route, as gauges a
    textfile collector picks up (a run is a process; counters would not survive it)."""
    registry = CollectorRegistry()
    last = Gauge(
        "keyproxy_rotation_last_run_timestamp_seconds",
        "When keyproxy rotate last ran for the route, by result.",
        ["route", "result"],
        registry=registry,
    )
    failed = Gauge(
        "keyproxy_rotation_failed",
        "1 when the route's last rotation run failed.",
        ["route"],
        registry=registry,
    )
    now = time.time()
    for route, result in outcomes:
        last.labels(route, result).set(now)
        failed.labels(route).set(1.0 if result == "failed" else 0.0)
    write_to_textfile(str(path), registry)
