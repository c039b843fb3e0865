"""Microbenchmarks of the per-request steps keyproxy optimised, before and after, in one process.

    .venv/bin/python bench/micro.py

- audit: one `request` event through the real structlog pipeline (to /dev/null), with 10,
  1,000 and 8,000 registered secret values, against the previous implementation (asdict plus
  a scan of every secret for every string);
- policy: `explain` (reads every policy, in order) against `compile(...).decide` with 10 and
  1,000 policies, the caller's policy last;
- identity: verifying an RS256 token in full against a cache hit.

Numbers are microseconds per call on this machine: compare them with each other, not across
machines. No network, except a JWKS served from 127.0.0.1 for the identity case.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import aiohttp
import jwt
import structlog
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from keyproxy import audit, policy, redact, secret
from keyproxy.config import Grant, Issuer, Policy
from keyproxy.identity import Identity, IdentityVerifier
from keyproxy.secret import REDACTED


def per_call(fn: Callable[[], object], calls: int = 20_000) -> float:
    for _ in range(calls // 10):
        fn()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1e6


def _record() -> audit.RequestRecord:
    record = audit.RequestRecord(method="GET", path="/v1/models", source="127.0.0.1")
    record.route, record.issuer, record.subject = "openai", "openbao", "6f1c2d0e-agent"
    record.policy, record.decision, record.reason = "agent", "allow", "allowed"
    record.key_version, record.status, record.upstream_status = 3, 200, 200
    record.duration_ms = 1.234
    return record


def _old_scrub(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """The processor before this change: every secret searched in every string."""

    def scrub(value: Any, values: frozenset[str]) -> Any:
        if isinstance(value, str):
            for s in values:
                if s in value:
                    value = value.replace(s, REDACTED)
            return value
        return value

    values = secret.known_values()
    return {k: scrub(v, values) for k, v in event.items()}


def _old_emit(log: Any) -> None:
    log.info("request", **asdict(_record()))


def bench_audit() -> None:
    with open(os.devnull, "w", encoding="utf-8") as sink:  # noqa: PTH123  # a plain sink
        registered = 0
        for count in (10, 1000, 8000):
            secret.register(*("sk-" + secrets.token_urlsafe(24) for _ in range(count - registered)))
            registered = count
            audit.configure(sink)
            new = per_call(lambda: audit.emit(_record()))
            config = structlog.get_config()
            processors = list(config["processors"])
            processors[processors.index(redact.scrub_secrets)] = _old_scrub
            structlog.configure(processors=processors)
            log = structlog.get_logger("keyproxy.audit")
            old = per_call(functools.partial(_old_emit, log), 2000)
            print(f"audit event, {count:5} secrets: before {old:8.1f} us   after {new:6.1f} us")
    audit.configure(sys.stderr, level="warning")  # the sink is closed now


def bench_policy() -> None:
    def grant(route: str) -> dict[str, Grant]:
        return {route: Grant(frozenset({"GET"}), (("v1", "**"),))}

    for count in (10, 1000):
        policies = [
            Policy(name=f"p{i}", subjects=(f"agent-{i}",), allow=grant(f"r{i}"))
            for i in range(count - 1)
        ]
        policies.append(Policy(name="mine", subjects=("me",), allow=grant("mine")))
        who = Identity("k8s", "me", {})
        facts = (who, "mine", "GET", ("v1", "models"), ipaddress.ip_address("10.0.0.1"))
        indexed = policy.compile(policies)
        linear = per_call(functools.partial(policy.explain, policies, *facts), 2000)
        fast = per_call(functools.partial(indexed.decide, *facts))
        print(
            f"policy decide, {count:5} policies: every policy (explain) {linear:8.1f} us   "
            f"indexed {fast:6.1f} us"
        )


async def bench_identity() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "k1", "use": "sig"}

    async def jwks(_: web.Request) -> web.Response:
        return web.json_response({"keys": [jwk]})

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    issuer = Issuer(
        name="k8s",
        issuer="https://issuer.test",
        audiences=("keyproxy",),
        algorithms=("RS256",),
        jwks_uri=f"http://127.0.0.1:{port}/jwks",
    )
    now = int(time.time())
    claims = {"iss": issuer.issuer, "sub": "agent", "aud": "keyproxy", "exp": now + 600}
    token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})
    async with aiohttp.ClientSession() as http:
        cached = IdentityVerifier([issuer], http)
        uncached = IdentityVerifier([issuer], http, cache_size=0)
        await cached.prefetch()
        await uncached.prefetch()

        async def timed(verifier: IdentityVerifier, calls: int) -> float:
            await verifier.verify(token)
            started = time.perf_counter()
            for _ in range(calls):
                await verifier.verify(token)
            return (time.perf_counter() - started) / calls * 1e6

        full, hit = await timed(uncached, 2000), await timed(cached, 20_000)
        print(f"token verify (RS256):     full {full:8.1f} us   cache hit {hit:6.1f} us")
    await runner.cleanup()


def main() -> None:
    bench_audit()
    bench_policy()
    asyncio.run(bench_identity())


if __name__ == "__main__":
    main()
