"""/metrics reports requests, decisions, tokens and key state with correct values."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from keyproxy.devserver import OpenBaoDevServer
from keyproxy.metrics import BUCKETS, Metrics, write_rotation_textfile
from tests.helpers.logscan import CANARIES
from tests.helpers.polling import eventually
from tests.helpers.servers import Upstream, bearer, new_key, running_proxy, token_config

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(http: aiohttp.ClientSession, base: str) -> Samples:
    async with http.get(f"{base}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return samples(await response.text())


async def test_metrics_after_allowed_denied_and_rotated_traffic(
    openbao: OpenBaoDevServer, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """After allowed, denied and unauthenticated requests, token exchanges and a key
    rotation, every series has the value the traffic implies."""
    path = "keyproxy/keys/tokens-test"
    first = openbao.put_key(path, new_key())
    agent = openbao.add_agent("metrics-agent")
    identity = openbao.agent_token(agent)
    CANARIES.add(identity)
    async with running_proxy(token_config(openbao, agent, upstream.url)) as stack:
        url = f"{stack.base}/r/r/echo"
        for _ in range(3):
            async with http.get(url, headers=bearer(identity)) as r:
                assert r.status == 200
        async with http.delete(url, headers=bearer(identity)) as r:
            assert r.status == 403
        async with http.get(url) as r:
            assert r.status == 401
        scope = {"r": {"methods": ["GET"], "paths": ["/echo"]}}
        async with http.post(
            f"{stack.base}/token", json={"scope": scope}, headers=bearer(identity)
        ) as r:
            token = (await r.json())["access_token"]
            CANARIES.add(token)
        async with http.post(
            f"{stack.base}/token",
            json={"scope": {"r": {"methods": ["DELETE"], "paths": ["/x"]}}},
            headers=bearer(identity),
        ) as r:
            assert r.status == 403
        async with http.post(f"{stack.base}/token/revoke", headers=bearer(token)) as r:
            assert r.status == 200

        found = await scrape(http, stack.admin)
        assert (
            value(found, "keyproxy_requests_total", route="r", status="200", decision="allow") == 3
        )
        assert (
            value(found, "keyproxy_requests_total", route="r", status="403", decision="deny") == 1
        )
        assert (
            value(found, "keyproxy_requests_total", route="r", status="401", decision="deny") == 1
        )
        assert value(found, "keyproxy_request_duration_seconds_count", route="r") == 3
        for event in ("issued", "denied", "revoked"):
            assert value(found, "keyproxy_tokens_total", event=event) == 1
        assert value(found, "keyproxy_key_version", route="r") == first
        assert value(found, "keyproxy_key_ready", route="r") == 1
        assert 0 <= value(found, "keyproxy_key_age_seconds", route="r") < 120
        assert value(found, "keyproxy_key_rotations_total", route="r") == 0
        reads = value(found, "keyproxy_vault_reads_total", route="r")
        assert reads >= 1

        second = await asyncio.to_thread(openbao.put_key, path, new_key())
        found = await eventually(
            lambda: scrape(http, stack.admin),
            "the new version never showed in /metrics",
            within=5,
            interval=0.1,
            until=lambda f: value(f, "keyproxy_key_version", route="r") == second,
        )
        assert value(found, "keyproxy_key_rotations_total", route="r") == 1
        assert value(found, "keyproxy_key_age_seconds", route="r") < 10
        assert value(found, "keyproxy_vault_read_errors_total", route="r") == 0
        assert value(found, "keyproxy_vault_reads_total", route="r") > reads  # the new version
        text = await (await http.get(f"{stack.base}/metrics")).text()
        assert identity not in text


def test_rotation_textfile(tmp_path: Path) -> None:
    """`rotate --metrics-file` writes each route's last result, failures flagged."""
    path = tmp_path / "rotation.prom"
    write_rotation_textfile(path, [("a", "rotated"), ("b", "failed")])
    found = samples(path.read_text())
    assert value(found, "keyproxy_rotation_failed", route="a") == 0
    assert value(found, "keyproxy_rotation_failed", route="b") == 1
    assert (
        value(found, "keyproxy_rotation_last_run_timestamp_seconds", route="a", result="rotated")
        > 0
    )


def test_request_metrics_expose_what_prometheus_client_would() -> None:
    """The plain-dict request counters scrape exactly as prometheus-client's own Counter and
    Histogram would after the same requests (bucket edges included)."""
    metrics = Metrics(dict)
    reference = CollectorRegistry()
    counter = Counter("keyproxy_requests", "x", ["route", "status", "decision"], registry=reference)
    histogram = Histogram(
        "keyproxy_request_duration_seconds", "x", ["route"], buckets=BUCKETS, registry=reference
    )
    requests = [
        ("r", 200, "allow", 0.003),
        ("r", 200, "allow", 0.005),  # on a bucket's edge: counted in that bucket
        ("r", 200, "allow", 0.3),
        ("r", 403, "deny", 0.001),
        (None, 404, "deny", 0.0),
        ("s", 502, "allow", 500.0),  # above every bound
    ]
    for route, status, decision, seconds in requests:
        metrics.request(route, status, decision, seconds)
        counter.labels(route or "-", str(status), decision).inc()
        if decision == "allow":
            histogram.labels(route or "-").observe(seconds)

    def sample_lines(text: str) -> list[str]:
        return sorted(
            line
            for line in text.splitlines()
            if line.startswith("keyproxy_request") and "_created" not in line
        )

    ours = sample_lines(metrics.exposition()[0].decode())
    assert ours == sample_lines(generate_latest(reference).decode())
    assert len(ours) == 4 + 2 * (
        len(BUCKETS) + 3
    )  # 4 counters; 2 routes: buckets, +Inf, count, sum
