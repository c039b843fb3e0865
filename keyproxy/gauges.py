"""The serving process's state as Prometheus metrics, read from its holders when scraped
(keyproxy.metrics registers them): each route's key, the signing keys' freshness, the
revocation list and the state store. Reading them costs the request path nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from keyproxy.state import StoreStats
from keyproxy.tokens.listread import RevocationStatus


class RevocationsCollector(Collector):
    """The revocation list's size and whether it was read, read when scraped."""

    def __init__(self, status: Callable[[], RevocationStatus]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        yield GaugeMetricFamily(
            "keyproxy_revocation_list_entries",
            "Entries of the revocation list this process holds (revoked token ids, subjects "
            "and tasks not yet pruned); about 290,000 fit in its 16 shards, 18,000 in each.",
            value=status.entries,
        )
        yield GaugeMetricFamily(
            "keyproxy_revocation_list_read",
            "1 once this process has read the revocation list (until then a task token "
            "makes it try, and gets 503 if it cannot).",
            value=1.0 if status.read else 0.0,
        )
        age = GaugeMetricFamily(
            "keyproxy_revocation_list_age_seconds",
            "Seconds since this process's last whole read of the revocation list began (none "
            "before the first); past tokens.revocation_max_staleness a task token makes it "
            "read again, and gets 503 if it cannot.",
        )
        if status.age is not None:
            age.add_metric([], status.age)
        yield age


class KeyCollector(Collector):
    """Key-cache state, read when scraped."""

    def __init__(self, key_status: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self._status = key_status

    def collect(self) -> Iterator[Metric]:
        version = GaugeMetricFamily(
            "keyproxy_key_version", "KV version of the key being injected.", labels=["route"]
        )
        age = GaugeMetricFamily(
            "keyproxy_key_age_seconds",
            "Seconds since Vault created the key version being injected.",
            labels=["route"],
        )
        staleness = GaugeMetricFamily(
            "keyproxy_key_staleness_seconds",
            "Seconds since the key was last read from Vault, or confirmed unchanged by the "
            "change index.",
            labels=["route"],
        )
        ready = GaugeMetricFamily(
            "keyproxy_key_ready", "1 when a fresh key is loaded for the route.", labels=["route"]
        )
        rotations = CounterMetricFamily(
            "keyproxy_key_rotations", "New key versions this replica picked up.", labels=["route"]
        )
        reads = CounterMetricFamily(
            "keyproxy_vault_reads", "Reads of the route's key from Vault.", labels=["route"]
        )
        errors = CounterMetricFamily(
            "keyproxy_vault_read_errors", "Failed reads of the route's key.", labels=["route"]
        )
        now = time.time()
        for route, entry in sorted(self._status().items()):
            if entry.get("version") is not None:
                version.add_metric([route], entry["version"])
            if entry.get("created_at") is not None:
                age.add_metric([route], max(0.0, now - entry["created_at"]))
            if entry.get("age") is not None:
                staleness.add_metric([route], entry["age"])
            ready.add_metric([route], 1.0 if entry.get("fresh") else 0.0)
            rotations.add_metric([route], entry.get("versions_seen", 0))
            reads.add_metric([route], entry.get("reads", 0))
            errors.add_metric([route], entry.get("read_errors", 0))
        yield from (version, age, staleness, ready, rotations, reads, errors)


class SigningKeysCollector(Collector):
    """How old the keys are that tokens are verified with, read when scraped."""

    def __init__(
        self,
        issuers: Callable[[], dict[str, dict[str, Any]]],
        task_keys: Callable[[], dict[str, Any]],
    ) -> None:
        self._issuers = issuers
        self._task_keys = task_keys

    def collect(self) -> Iterator[Metric]:
        age = GaugeMetricFamily(
            "keyproxy_identity_keys_age_seconds",
            "Seconds since the issuer's keys were last fetched successfully.",
            labels=["issuer"],
        )
        usable = GaugeMetricFamily(
            "keyproxy_identity_keys",
            "Usable keys in the issuer's last key set (0: its tokens are refused, unknown_kid).",
            labels=["issuer"],
        )
        stale = GaugeMetricFamily(
            "keyproxy_identity_keys_stale",
            "1 when the issuer's keys are past jwks_max_staleness (its tokens are refused).",
            labels=["issuer"],
        )
        refused = CounterMetricFamily(
            "keyproxy_identity_stale_refusals",
            "Tokens refused because the issuer's keys were too old to trust.",
            labels=["issuer"],
        )
        for issuer, entry in sorted(self._issuers().items()):
            if entry["age"] is not None:
                age.add_metric([issuer], entry["age"])
                usable.add_metric([issuer], entry["keys"])
            stale.add_metric([issuer], 1.0 if entry["stale"] else 0.0)
            refused.add_metric([issuer], entry["stale_refusals"])
        own = self._task_keys()
        own_age = GaugeMetricFamily(
            "keyproxy_token_keys_age_seconds",
            "Seconds since the task tokens' Transit public keys were last read.",
        )
        if own["age"] is not None:
            own_age.add_metric([], own["age"])
        own_stale = GaugeMetricFamily(
            "keyproxy_token_keys_stale",
            "1 when the Transit public keys are past tokens.key_max_staleness.",
            value=1.0 if own["stale"] else 0.0,
        )
        own_refused = CounterMetricFamily(
            "keyproxy_token_keys_stale_refusals",
            "Task tokens refused because the Transit public keys were too old to trust.",
            value=own["stale_refusals"],
        )
        yield from (age, usable, stale, refused, own_age, own_stale, own_refused)


class StoreCollector(Collector):
    """The state store's decisions, faults and latency, read when scraped."""

    def __init__(self, stats: StoreStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        yield CounterMetricFamily(
            "keyproxy_state_store_decisions",
            "Limit decisions asked of the state store.",
            value=stats.decisions,
        )
        yield CounterMetricFamily(
            "keyproxy_state_store_errors",
            "Decisions the state store did not answer (each limit then followed its "
            "on_store_error).",
            value=stats.errors,
        )
        yield SummaryMetricFamily(
            "keyproxy_state_store_decision_seconds",
            "Time per limit decision, one round trip to the store.",
            count_value=stats.decisions,
            sum_value=stats.decision_seconds_total,
        )
        yield GaugeMetricFamily(
            "keyproxy_state_store_decision_seconds_max",
            "The longest limit decision since the process started.",
            value=stats.decision_seconds_max,
        )
