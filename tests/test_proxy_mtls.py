"""End to end over mutual TLS: X.509-SVID callers and certificate-bound task tokens.

Real OpenBao, the real proxy on its own TLS listener (`server.tls`), the recording upstream,
real TLS handshakes with certificates made by tests/helpers/svid_ca.py, and real clients
(aiohttp, and the openai SDK through its own httpx client).
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import httpx2
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from keyproxy import config
from keyproxy.devserver import Agent, OpenBaoDevServer
from keyproxy.errors import ConfigError
from keyproxy.server import listen as server
from keyproxy.server.app import METRICS, build_admin_app, build_app
from keyproxy.spiffe import thumbprint
from tests.helpers.events import read_events
from tests.helpers.logscan import CANARIES
from tests.helpers.polling import eventually
from tests.helpers.servers import Upstream, bearer, new_key, token_config
from tests.helpers.svid_ca import Issued, SvidCA
from tests.helpers.tokens import delegate

GRANT = {"methods": ["GET", "POST"], "paths": ["/v1/**", "/echo"]}
KEY_PATH = "keyproxy/keys/tokens-test"  # token_config's routes' key


@dataclass
class MtlsStack:
    base: str  # https://127.0.0.1:PORT
    admin: str  # http://127.0.0.1:PORT
    tmp: Path
    cas: dict[str, SvidCA]
    server_cert: Path
    server_key: Path

    def context(self, client: Issued | None) -> ssl.SSLContext:
        """A client context trusting keyproxy's certificate, presenting `client` if given."""
        context = ssl.create_default_context(cadata=self.cas["server"].bundle_pem().decode())
        if client is not None:
            cert, key = client.write(self.tmp, f"client-{thumbprint(client.der)[:12]}")
            context.load_cert_chain(cert, key)
        return context

    def session(self, client: Issued | None) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(ssl=self.context(client))
        return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10))


@pytest.fixture
def cas() -> dict[str, SvidCA]:
    """keyproxy's server CA, two trusted trust domains, and a CA nobody trusts."""
    return {
        "server": SvidCA("server.test"),
        "example": SvidCA("example.org", intermediate=True),
        "partner": SvidCA("partner.org"),
        "stranger": SvidCA("example.org"),
    }


@pytest.fixture
def seeded(openbao: OpenBaoDevServer) -> str:
    key = new_key()
    openbao.put_key(KEY_PATH, key)
    return key


def mtls_config(
    openbao: OpenBaoDevServer, agent: Agent, upstream: str, tmp: Path, cas: dict[str, SvidCA]
) -> tuple[dict[str, Any], Path, Path]:
    """token_config's routes and agent policy, served over TLS asking for client SVIDs of
    example.org (a SPIFFE bundle) and partner.org (PEM); a policy for one SPIFFE ID."""
    cert, key = cas["server"].server_cert().write(tmp, "server")
    (tmp / "example.json").write_bytes(cas["example"].bundle_json())
    (tmp / "partner.pem").write_bytes(cas["partner"].bundle_pem())
    cfg = token_config(openbao, agent, upstream)
    cfg["server"] = {
        "tls": {
            "certificate": str(cert),
            "key": str(key),
            "client_auth": "optional",
            "trust_bundles": {
                "example.org": str(tmp / "example.json"),
                "partner.org": str(tmp / "partner.pem"),
            },
        }
    }
    cfg["policies"].append(
        {
            "name": "svid-agent",
            "issuers": ["spiffe://example.org"],
            "subjects": ["spiffe://example.org/agent"],
            "allow": {"r": GRANT},
        }
    )
    return cfg, cert, key


@asynccontextmanager
async def running(cfg: dict[str, Any]) -> AsyncIterator[tuple[int, int]]:
    compiled = config.parse(json.dumps(cfg), {})
    app = build_app(compiled)
    limits = server.Limits.of(compiled.server)
    runner, port = await server.start(app, "127.0.0.1", 0, limits, metrics=lambda: app.get(METRICS))
    try:
        admin, admin_port = await server.start(build_admin_app(app), "127.0.0.1", 0, limits)
        try:
            yield port, admin_port
        finally:
            await admin.cleanup()
    finally:
        await runner.cleanup()


@pytest.fixture
async def stack(
    openbao: OpenBaoDevServer,
    agent: Agent,
    upstream: Upstream,
    seeded: str,
    tmp_path: Path,
    cas: dict[str, SvidCA],
) -> AsyncIterator[MtlsStack]:
    cfg, cert, key = mtls_config(openbao, agent, upstream.url, tmp_path, cas)
    async with running(cfg) as (port, admin_port):
        yield MtlsStack(
            f"https://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", tmp_path, cas, cert, key
        )


def request_id(name: str) -> dict[str, str]:
    return {"X-Request-Id": f"mtls-{name}-{id(name)}-{asyncio.get_running_loop().time()}"}


async def post(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    body = {"model": "keyproxy-demo", "messages": [{"role": "user", "content": "hi"}]}
    async with session.post(url, json=body, headers=headers or {}) as response:
        return response.status, await response.json(content_type=None)


async def request_event(audit_log: Path, rid: str) -> dict[str, Any]:
    events = await eventually(
        lambda: [
            e for e in read_events(audit_log) if e.get("request_id") == rid and "decision" in e
        ],
        f"no audit event for {rid}",
    )
    return events[0]


def refusals(audit_log: Path, reason: str) -> int:
    return sum(
        1
        for e in read_events(audit_log)
        if e.get("event") == "tls.refused" and e.get("reason") == reason
    )


# ----------------------------------------------------------------------------- SVID callers


async def test_a_valid_svid_is_allowed_by_a_policy_naming_its_spiffe_id(
    stack: MtlsStack, upstream: Upstream, seeded: str, audit_log: Path
) -> None:
    """A caller presenting only its X.509-SVID is the identity spiffe://example.org/agent of
    issuer spiffe://example.org; the policy naming that ID lets it through with the key."""
    rid = request_id("valid")
    async with stack.session(stack.cas["example"].svid("/agent")) as session:
        status, _ = await post(session, f"{stack.base}/r/r/v1/chat/completions", rid)
    assert status == 200
    assert [r.headers["Authorization"] for r in upstream.requests] == [f"Bearer {seeded}"]
    event = await request_event(audit_log, rid["X-Request-Id"])
    assert (event["issuer"], event["subject"]) == (
        "spiffe://example.org",
        "spiffe://example.org/agent",
    )
    assert (event["decision"], event["policy"]) == ("allow", "svid-agent")


@pytest.mark.parametrize(
    ("make", "status", "reason"),
    [
        # A valid SVID of a trusted trust domain no policy names.
        (lambda cas: cas["partner"].svid("/agent"), 403, "no_policy_for_identity"),
        # example.org's CA vouching for an ID of partner.org: the handshake's union of
        # bundles passes it, the bundle of its own trust domain does not.
        (
            lambda cas: cas["example"].svid_for("spiffe://partner.org/agent"),
            401,
            "svid_untrusted",
        ),
        (
            lambda cas: cas["example"].svid_for(
                "spiffe://example.org/agent", "spiffe://example.org/other"
            ),
            401,
            "svid_uri_san_count",
        ),
        (lambda cas: cas["example"].ca_as_leaf(), 401, "svid_leaf_is_ca"),
        (lambda cas: None, 401, "no_credential"),
    ],
    ids=["other-trust-domain", "cross-domain-signer", "two-uri-sans", "ca-as-leaf", "none"],
)
async def test_callers_refused_after_the_handshake(
    stack: MtlsStack,
    upstream: Upstream,
    audit_log: Path,
    make: Callable[[dict[str, SvidCA]], Issued | None],
    status: int,
    reason: str,
) -> None:
    """Each wrong certificate (or none) is refused with its reason before any upstream
    contact, and the request's audit event says so."""
    rid = request_id(reason)
    async with stack.session(make(stack.cas)) as session:
        got, body = await post(session, f"{stack.base}/r/r/v1/chat/completions", rid)
    assert got == status
    assert body["error"]["code"] == reason
    assert upstream.requests == []
    event = await request_event(audit_log, rid["X-Request-Id"])
    assert (event["decision"], event["reason"], event["status"]) == ("deny", reason, status)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda cas: cas["example"].expired_svid(), "svid_expired"),
        (lambda cas: cas["stranger"].svid("/agent"), "svid_untrusted"),
    ],
    ids=["expired", "unknown-ca"],
)
async def test_callers_refused_in_the_handshake(
    stack: MtlsStack,
    upstream: Upstream,
    audit_log: Path,
    make: Callable[[dict[str, SvidCA]], Issued],
    reason: str,
) -> None:
    """An expired SVID and one of an unknown CA fail the handshake: no request is read, the
    refusal is a `tls.refused` audit event and is counted."""
    before = refusals(audit_log, reason)
    async with stack.session(make(stack.cas)) as session:
        with pytest.raises(aiohttp.ClientError):
            await post(session, f"{stack.base}/r/r/v1/chat/completions")
    assert upstream.requests == []
    await eventually(lambda: refusals(audit_log, reason) > before, f"no tls.refused {reason}")
    async with aiohttp.ClientSession() as plain, plain.get(f"{stack.admin}/metrics") as response:
        metrics = await response.text()
    assert f'keyproxy_tls_refused_total{{listener="proxy",reason="{reason}"}}' in metrics


# ----------------------------------------------------------------------- bound task tokens


async def ask_token(
    session: aiohttp.ClientSession, base: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """POST /token for the chat route with `headers`: the status and the JSON answer (its
    token registered for the log scan)."""
    body = {"scope": {"r": {"methods": ["POST"], "paths": ["/v1/chat/completions"]}}}
    async with session.post(f"{base}/token", json=body, headers=headers or {}) as r:
        answer: dict[str, Any] = await r.json()
    if "access_token" in answer:
        CANARIES.add(answer["access_token"])
    return r.status, answer


async def exchange_over(session: aiohttp.ClientSession, base: str, identity_token: str) -> str:
    status, answer = await ask_token(session, base, bearer(identity_token))
    assert status == 200, answer
    token: str = answer["access_token"]
    return token


async def test_a_certificate_bound_token_works_only_on_its_own_certificate(
    stack: MtlsStack, upstream: Upstream, identity_token: str, audit_log: Path
) -> None:
    """A task token requested over mTLS is bound to that certificate (cnf.x5t#S256): it works
    on it, and gets 401 token_binding_mismatch with another valid SVID or with none."""
    own = stack.cas["example"].svid("/agent")
    async with stack.session(own) as session:
        token = await exchange_over(session, stack.base, identity_token)
        status, _ = await post(session, f"{stack.base}/r/r/v1/chat/completions", bearer(token))
    assert status == 200
    assert len(upstream.requests) == 1
    for other in (stack.cas["example"].svid("/agent"), None):
        rid = request_id("bound")
        async with stack.session(other) as session:
            got, body = await post(
                session, f"{stack.base}/r/r/v1/chat/completions", bearer(token) | rid
            )
        assert (got, body["error"]["code"]) == (401, "token_binding_mismatch")
        event = await request_event(audit_log, rid["X-Request-Id"])
        assert event["reason"] == "token_binding_mismatch"
    assert len(upstream.requests) == 1


async def test_a_bound_tokens_heartbeat_revoke_and_delegation_need_its_certificate(
    stack: MtlsStack, upstream: Upstream, identity_token: str
) -> None:
    """A certificate-bound token is heartbeaten, revoked and delegated only over its own
    certificate (401 token_binding_mismatch with another SVID or none), so a copy taken from
    its holder can neither keep it alive, end its task nor pass it on; its child is bound to
    the same certificate."""
    own = stack.cas["example"].svid("/agent")
    body = {
        "scope": {"r": {"methods": ["POST"], "paths": ["/v1/chat/completions"]}},
        "idle_ttl": "60s",
    }
    async with (
        stack.session(own) as session,
        session.post(f"{stack.base}/token", json=body, headers=bearer(identity_token)) as r,
    ):
        answer = await r.json()
        assert r.status == 200, answer
    token: str = answer["access_token"]
    CANARIES.add(token)
    for other in (stack.cas["example"].svid("/agent"), None):
        async with stack.session(other) as session:
            for path in ("/token/heartbeat", "/token/revoke"):
                async with session.post(stack.base + path, headers=bearer(token)) as r:
                    refusal = (r.status, (await r.json())["error"]["code"])
                assert refusal == (401, "token_binding_mismatch"), path
            code, refused_child = await delegate(session, stack.base, token)
            assert (code, refused_child["error"]["code"]) == (401, "token_binding_mismatch")
    async with stack.session(own) as session:
        async with session.post(f"{stack.base}/token/heartbeat", headers=bearer(token)) as r:
            assert r.status == 200
        code, child = await delegate(session, stack.base, token)
        assert code == 200, child
        CANARIES.add(child["access_token"])
    url = f"{stack.base}/r/r/v1/chat/completions"
    async with stack.session(None) as session:
        got, refused = await post(session, url, bearer(child["access_token"]))
    assert (got, refused["error"]["code"]) == (401, "token_binding_mismatch")
    async with stack.session(own) as session:
        assert (await post(session, url, bearer(child["access_token"])))[0] == 200
        async with session.post(f"{stack.base}/token/revoke", headers=bearer(token)) as r:
            assert r.status == 200
    assert len(upstream.requests) == 1


async def test_a_bound_token_follows_its_svid_renewed_with_the_same_key(
    stack: MtlsStack, upstream: Upstream, identity_token: str
) -> None:
    """A bound token works on a renewal of its SVID (same SPIFFE ID, same key), and gets 401
    on an SVID of the same ID with another key or of another ID with the same key."""
    own = stack.cas["example"].svid("/agent")
    async with stack.session(own) as session:
        token = await exchange_over(session, stack.base, identity_token)
    url = f"{stack.base}/r/r/v1/chat/completions"
    renewed = stack.cas["example"].svid("/agent", key=own.key)
    async with stack.session(renewed) as session:
        assert (await post(session, url, bearer(token)))[0] == 200
    for other in (
        stack.cas["example"].svid("/agent"),
        stack.cas["example"].svid("/b", key=own.key),
    ):
        async with stack.session(other) as session:
            got, body = await post(session, url, bearer(token))
        assert (got, body["error"]["code"]) == (401, "token_binding_mismatch")
    assert len(upstream.requests) == 1


async def test_an_svid_alone_exchanges_for_a_bound_token(
    stack: MtlsStack, upstream: Upstream, audit_log: Path
) -> None:
    """POST /token with no bearer token over mTLS: the X.509-SVID is the identity exchanged
    (token.issued names it), the token is bound to it, and it is 401 without the SVID."""
    own = stack.cas["example"].svid("/agent")
    url = f"{stack.base}/r/r/v1/chat/completions"
    async with stack.session(own) as session:
        status, answer = await ask_token(session, stack.base)
        assert status == 200, answer
        token: str = answer["access_token"]
        assert (await post(session, url, bearer(token)))[0] == 200
    issued = (
        await eventually(
            lambda: [
                e
                for e in read_events(audit_log)
                if e.get("event") == "token.issued" and e.get("token_id") == answer["token_id"]
            ],
            "no token.issued event",
        )
    )[-1]
    assert (issued["issuer"], issued["subject"]) == (
        "spiffe://example.org",
        "spiffe://example.org/agent",
    )
    assert issued["bound_certificate"] is True
    async with stack.session(None) as session:
        got, refused = await post(session, url, bearer(token))
    assert (got, refused["error"]["code"]) == (401, "token_binding_mismatch")
    stranger = stack.cas["partner"].svid("/agent")
    async with stack.session(stranger) as session:
        status, _ = await ask_token(session, stack.base)
        assert status == 403  # an SVID no policy names is granted nothing
    assert len(upstream.requests) == 1


async def test_a_certificate_that_is_no_svid_binds_exactly_and_exchanges_nothing_alone(
    stack: MtlsStack, upstream: Upstream, identity_token: str
) -> None:
    """A client certificate the handshake trusts but that is no valid X.509-SVID (two URI
    SANs): beside an identity token the task token is bound to exactly it, and no SVID of
    the same ID carries it; alone it exchanges for nothing (401, its reason)."""
    odd = stack.cas["example"].svid_for("spiffe://example.org/agent", "spiffe://example.org/b")
    url = f"{stack.base}/r/r/v1/chat/completions"
    async with stack.session(odd) as session:
        token = await exchange_over(session, stack.base, identity_token)
        assert (await post(session, url, bearer(token)))[0] == 200
        status, answer = await ask_token(session, stack.base)
        assert (status, answer["error"]["code"]) == (401, "svid_uri_san_count")
    async with stack.session(stack.cas["example"].svid("/agent")) as session:
        got, refused = await post(session, url, bearer(token))
    assert (got, refused["error"]["code"]) == (401, "token_binding_mismatch")
    assert len(upstream.requests) == 1


async def test_a_token_requested_without_a_certificate_is_not_bound(
    stack: MtlsStack, upstream: Upstream, identity_token: str
) -> None:
    """Requested without a client certificate, a task token stays a bearer token."""
    async with stack.session(None) as session:
        token = await exchange_over(session, stack.base, identity_token)
    async with stack.session(stack.cas["partner"].svid("/x")) as session:
        status, _ = await post(session, f"{stack.base}/r/r/v1/chat/completions", bearer(token))
    assert status == 200


# --------------------------------------------------------------------------------- rotation


async def test_server_certificate_replaced_while_a_client_keeps_calling(
    stack: MtlsStack, upstream: Upstream
) -> None:
    """The server certificate and key are replaced on disk while a client keeps calling: new
    handshakes present the new certificate and no request fails."""
    client = stack.cas["example"].svid("/agent")
    url = f"{stack.base}/r/r/v1/chat/completions"
    statuses: list[int] = []
    stop = asyncio.Event()

    async def keep_calling() -> None:
        while not stop.is_set() and len(statuses) < 2000:
            # A new connection per call: each one is a new handshake.
            connector = aiohttp.TCPConnector(ssl=stack.context(client), force_close=True)
            async with aiohttp.ClientSession(connector=connector) as session:
                statuses.append((await post(session, url))[0])

    caller = asyncio.create_task(keep_calling())
    try:
        await eventually(lambda: len(statuses) >= 3, "no calls before the replacement")
        replacement = stack.cas["server"].server_cert()
        # An atomic replace of each file, as cert-manager and SPIRE helpers write them.
        (stack.tmp / "new.key").write_bytes(replacement.key_pem())
        (stack.tmp / "new.crt").write_bytes(replacement.chain_pem())
        (stack.tmp / "new.key").replace(stack.server_key)
        (stack.tmp / "new.crt").replace(stack.server_cert)
        expected = thumbprint(replacement.der)
        await eventually(
            lambda: asyncio.to_thread(served_thumbprint, stack),
            "the new certificate is not served",
            until=expected.__eq__,
        )
        seen = len(statuses)
        await eventually(lambda: len(statuses) >= seen + 3, "no calls after the replacement")
    finally:
        stop.set()
        await caller
    assert statuses
    assert set(statuses) == {200}


def served_thumbprint(stack: MtlsStack) -> str:
    port = int(stack.base.rsplit(":", 1)[1])
    context = stack.context(None)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return thumbprint(der)


# ------------------------------------------------------------------------------- openai SDK


async def test_openai_sdk_with_only_its_svid(
    stack: MtlsStack, upstream: Upstream, seeded: str
) -> None:
    """The openai SDK, through an httpx client presenting the agent's SVID and no API key,
    completes a chat completion; the upstream gets the Vault key."""
    http_client = httpx2.AsyncClient(verify=stack.context(stack.cas["example"].svid("/agent")))
    # The SDK insists on an API key; none is sent: the request omits its Authorization header.
    client = openai.AsyncOpenAI(
        base_url=f"{stack.base}/r/r/v1",
        api_key="unused",
        http_client=http_client,
        max_retries=0,
    )
    try:
        chat = await client.chat.completions.create(
            model="keyproxy-demo",
            messages=[{"role": "user", "content": "hello"}],
            extra_headers={"Authorization": openai.omit},
        )
    finally:
        await client.close()
    assert "hello" in (chat.choices[0].message.content or "")
    assert [r.headers["Authorization"] for r in upstream.requests] == [f"Bearer {seeded}"]


# ------------------------------------------------------------------ required client certs


def refused_on(audit_log: Path, listener: str, reason: str) -> int:
    return sum(
        1
        for e in read_events(audit_log)
        if e.get("event") == "tls.refused"
        and (e.get("listener"), e.get("reason")) == (listener, reason)
    )


async def test_required_client_certificates_on_both_listeners(
    openbao: OpenBaoDevServer,
    agent: Agent,
    upstream: Upstream,
    seeded: str,
    tmp_path: Path,
    cas: dict[str, SvidCA],
    audit_log: Path,
) -> None:
    """With client_auth required, a caller without a certificate is refused in the handshake
    (svid_missing, audited per listener); the admin listener has its own TLS, and an SVID
    holder reads its metrics, where the refusals are counted. A certificate the handshake
    let through that is no valid SVID (no SPIFFE ID, a CA as leaf) reaches no admin
    endpoint."""
    cfg, cert, key = mtls_config(openbao, agent, upstream.url, tmp_path, cas)
    cfg["server"]["tls"]["client_auth"] = "required"
    cfg["server"]["admin"] = {"tls": {**cfg["server"]["tls"]}}
    async with running(cfg) as (port, admin_port):
        stack = MtlsStack(f"https://127.0.0.1:{port}", "", tmp_path, cas, cert, key)
        admin = f"https://127.0.0.1:{admin_port}"
        for listener, url in (("proxy", f"{stack.base}/healthz"), ("admin", f"{admin}/healthz")):
            before = refused_on(audit_log, listener, "svid_missing")
            async with stack.session(None) as session:
                with pytest.raises(aiohttp.ClientError):
                    # POST: aiohttp tries an idempotent request again on a dropped connection.
                    async with session.post(url) as response:
                        await response.read()
            await eventually(
                lambda: refused_on(audit_log, listener, "svid_missing") > before,  # noqa: B023  # awaited in this iteration
                f"no tls.refused svid_missing on {listener}",
            )
        async with (
            stack.session(cas["example"].svid("/agent")) as session,
            session.get(f"{admin}/metrics") as response,
        ):
            assert response.status == 200
            metrics = await response.text()
            async with session.head(f"{admin}/healthz") as head:  # a load balancer's probe
                assert head.status == 200
        assert 'keyproxy_tls_refused_total{listener="proxy",reason="svid_missing"} 1.0' in metrics
        assert 'keyproxy_tls_refused_total{listener="admin",reason="svid_missing"} 1.0' in metrics
        for not_svid, reason in (
            (cas["example"].issue([x509.DNSName("agent.example.org")]), "svid_uri_san_count"),
            (cas["example"].ca_as_leaf(), "svid_leaf_is_ca"),
        ):
            async with stack.session(not_svid) as session:
                for method, path in (("GET", "/metrics"), ("POST", "/reload"), ("GET", "/readyz")):
                    async with session.request(method, f"{admin}{path}") as response:
                        assert response.status == 401, (path, reason)
                        assert (await response.json())["error"]["code"] == reason
        async with stack.session(cas["example"].svid("/agent")) as session:
            status, _ = await post(session, f"{stack.base}/r/r/v1/chat/completions")
        assert status == 200


async def test_tls_files_that_cannot_be_read_stop_the_start(
    openbao: OpenBaoDevServer,
    agent: Agent,
    upstream: Upstream,
    tmp_path: Path,
    cas: dict[str, SvidCA],
) -> None:
    """A certificate that is not there, or a key that does not match it, is a ConfigError
    naming server.tls before anything listens."""
    cfg, cert, key = mtls_config(openbao, agent, upstream.url, tmp_path, cas)
    cfg["server"]["tls"]["certificate"] = str(tmp_path / "missing.crt")
    with pytest.raises(ConfigError) as caught:
        build_app(config.parse(json.dumps(cfg), {}))
    assert caught.value.path == "server.tls.certificate"
    assert "missing.crt" in caught.value.message
    cfg["server"]["tls"]["certificate"] = str(cert)
    key.write_bytes(cas["server"].server_cert().key_pem())  # another certificate's key
    with pytest.raises(ConfigError) as caught:
        build_app(config.parse(json.dumps(cfg), {}))
    assert caught.value.path == "server.tls"


async def test_trust_bundle_replaced_while_a_client_keeps_calling(
    stack: MtlsStack, upstream: Upstream
) -> None:
    """example.org's bundle is replaced on disk, first by the old and a new CA, then by the
    new CA alone: new handshakes follow each file (the old CA's SVIDs keep working while it
    is in the bundle, then are refused), and nothing restarts."""
    old = stack.cas["example"].svid("/agent")
    renewed = SvidCA("example.org")
    url = f"{stack.base}/r/r/v1/chat/completions"

    async def call(client: Issued) -> int:
        connector = aiohttp.TCPConnector(ssl=stack.context(client), force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            try:
                return (await post(session, url))[0]
            except aiohttp.ClientError:
                return 0  # refused in the handshake

    assert await call(old) == 200
    assert await call(renewed.svid("/agent")) == 0
    both = stack.cas["example"].bundle_pem() + renewed.bundle_pem()
    (stack.tmp / "bundle.new").write_bytes(both)
    (stack.tmp / "bundle.new").replace(stack.tmp / "example.json")
    fresh = renewed.svid("/agent")
    await eventually(lambda: call(fresh), "the new CA is not trusted", until=(200).__eq__)
    assert await call(old) == 200  # both CAs in the bundle: the old SVIDs still work
    (stack.tmp / "bundle.new").write_bytes(renewed.bundle_pem())
    (stack.tmp / "bundle.new").replace(stack.tmp / "example.json")
    await eventually(lambda: call(old), "the old CA is still trusted", until=(0).__eq__)
    assert await call(fresh) == 200


# ------------------------------------------------- certificates forwarded by a front proxy


def xfcc(issued: Issued) -> str:
    """Envoy's x-forwarded-client-cert for `issued`: its leaf in Cert, its chain in Chain."""
    leaf = issued.certificate.public_bytes(Encoding.PEM)
    return f'Hash=ab12;Cert="{quote(leaf, safe="")}";Chain="{quote(issued.chain_pem(), safe="")}"'


@asynccontextmanager
async def forwarding_stack(
    openbao: OpenBaoDevServer,
    agent: Agent,
    upstream: str,
    tmp: Path,
    cas: dict[str, SvidCA],
    *,
    form: str,
    trusted: str,
) -> AsyncIterator[str]:
    """mtls_config's stack taking the client certificate from a front proxy's header
    (`form`) when the peer is inside `trusted`; its https base URL."""
    cfg, _, _ = mtls_config(openbao, agent, upstream, tmp, cas)
    cfg["server"]["trusted_proxies"] = [trusted]
    cfg["server"]["tls"]["forwarded_client_cert"] = {"format": form}
    cfg["policies"].append(
        {
            "name": "svid-partner",
            "issuers": ["spiffe://partner.org"],
            "subjects": ["spiffe://partner.org/agent"],
            "allow": {"r": GRANT},
        }
    )
    async with running(cfg) as (port, _):
        yield f"https://127.0.0.1:{port}"


@pytest.fixture
async def front(
    openbao: OpenBaoDevServer,
    agent: Agent,
    upstream: Upstream,
    seeded: str,
    tmp_path: Path,
    cas: dict[str, SvidCA],
) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    """forwarding_stack with the XFCC header from 127.0.0.1 trusted (the route's key
    seeded), and the front proxy's session to it."""
    async with (
        forwarding_stack(
            openbao, agent, upstream.url, tmp_path, cas, form="xfcc", trusted="127.0.0.1/32"
        ) as base,
        plain_session(cas) as session,
    ):
        yield base, session


def plain_session(
    cas: dict[str, SvidCA], own: tuple[Issued, Path] | None = None
) -> aiohttp.ClientSession:
    """A client trusting keyproxy's certificate and presenting none (or its `own`, written
    to the directory given): the front proxy."""
    context = ssl.create_default_context(cadata=cas["server"].bundle_pem().decode())
    if own is not None:
        context.load_cert_chain(*own[0].write(own[1], "front"))
    connector = aiohttp.TCPConnector(ssl=context)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10))


@pytest.mark.parametrize(
    ("form", "header", "value", "trust_domain"),
    [
        # Envoy's Chain carries example.org's intermediate CA.
        ("xfcc", "X-Forwarded-Client-Cert", xfcc, "example"),
        # nginx forwards the leaf only: partner.org's root signs it directly.
        (
            "escaped_pem",
            "Ssl-Client-Cert",
            lambda issued: quote(issued.certificate.public_bytes(Encoding.PEM), safe=""),
            "partner",
        ),
    ],
    ids=["envoy-xfcc", "nginx-escaped-pem"],
)
async def test_a_trusted_front_proxy_forwards_the_callers_svid(  # fixtures and parameters
    openbao: OpenBaoDevServer,
    agent: Agent,
    upstream: Upstream,
    seeded: str,
    tmp_path: Path,
    cas: dict[str, SvidCA],
    audit_log: Path,
    form: str,
    header: str,
    value: Callable[[Issued], str],
    trust_domain: str,
) -> None:
    """From a peer in trusted_proxies, the SVID in the front proxy's header is the identity
    the policy allows; the header never reaches the upstream."""
    rid = request_id(form)
    async with (
        forwarding_stack(
            openbao, agent, upstream.url, tmp_path, cas, form=form, trusted="127.0.0.1/32"
        ) as base,
        plain_session(cas) as session,
    ):
        forwarded = {header: value(cas[trust_domain].svid("/agent"))}
        status, _ = await post(session, f"{base}/r/r/v1/chat/completions", forwarded | rid)
    assert status == 200
    assert [r.headers["Authorization"] for r in upstream.requests] == [f"Bearer {seeded}"]
    assert header not in upstream.requests[0].headers
    event = await request_event(audit_log, rid["X-Request-Id"])
    expected = {"example": "svid-agent", "partner": "svid-partner"}[trust_domain]
    assert (event["subject"], event["policy"]) == (
        f"spiffe://{trust_domain}.org/agent",
        expected,
    )


async def test_the_header_from_an_untrusted_peer_is_ignored_and_dropped(  # fixtures
    openbao: OpenBaoDevServer,
    agent: Agent,
    upstream: Upstream,
    seeded: str,
    tmp_path: Path,
    cas: dict[str, SvidCA],
    identity_token: str,
) -> None:
    """From a peer outside trusted_proxies the forwarded certificate is no identity (401
    without a token), and with a token it is still never forwarded upstream."""
    forwarded = {"X-Forwarded-Client-Cert": xfcc(cas["example"].svid("/agent"))}
    async with (
        forwarding_stack(
            openbao, agent, upstream.url, tmp_path, cas, form="xfcc", trusted="10.0.0.0/8"
        ) as base,
        plain_session(cas) as session,
    ):
        url = f"{base}/r/r/v1/chat/completions"
        status, body = await post(session, url, forwarded)
        assert (status, body["error"]["code"]) == (401, "no_credential")
        assert upstream.requests == []
        status, _ = await post(session, url, forwarded | bearer(identity_token))
    assert status == 200
    assert [r.headers["Authorization"] for r in upstream.requests] == [f"Bearer {seeded}"]
    assert "X-Forwarded-Client-Cert" not in upstream.requests[0].headers


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (lambda cas: "Cert=not-a-certificate", "forwarded_cert_malformed"),
        (lambda cas: 'Cert="unterminated', "forwarded_cert_malformed"),
        (lambda cas: "By=spiffe://front;Hash=ab12", "forwarded_cert_malformed"),
        (
            lambda cas: f"{xfcc(cas['example'].svid('/agent'))},{xfcc(cas['example'].svid('/b'))}",
            "forwarded_cert_ambiguous",
        ),
        (
            lambda cas: (
                "Cert="
                + quote(
                    cas["example"].svid("/agent").certificate.public_bytes(Encoding.PEM) * 2,
                    safe="",
                )
            ),
            "forwarded_cert_ambiguous",
        ),
        (lambda cas: xfcc(cas["stranger"].svid("/agent")), "svid_untrusted"),
        (lambda cas: xfcc(cas["example"].expired_svid()), "svid_expired"),
    ],
    ids=[
        "not-pem",
        "unterminated",
        "no-cert",
        "two-elements",
        "two-certs",
        "unknown-ca",
        "expired",
    ],
)
async def test_wrong_forwarded_certificates_are_refused(
    front: tuple[str, aiohttp.ClientSession],
    upstream: Upstream,
    cas: dict[str, SvidCA],
    value: Callable[[dict[str, SvidCA]], str],
    reason: str,
) -> None:
    """A malformed, ambiguous or untrusted forwarded certificate from a trusted front proxy
    is refused with its reason before any upstream contact."""
    base, session = front
    headers = {"X-Forwarded-Client-Cert": value(cas)}
    status, body = await post(session, f"{base}/r/r/v1/chat/completions", headers)
    assert (status, body["error"]["code"]) == (401, reason)
    assert upstream.requests == []


@pytest.mark.parametrize("subject", ["identity token", "garbage"])
async def test_token_refuses_an_untrusted_forwarded_certificate_first(
    front: tuple[str, aiohttp.ClientSession],
    cas: dict[str, SvidCA],
    identity_token: str,
    subject: str,
) -> None:
    """A forwarded certificate had no handshake: at /token it must be a valid SVID even
    beside a subject token (else a token would be bound to an unverified certificate), and
    its refusal comes before the token's own check."""
    token = identity_token if subject == "identity token" else "not.a.jwt"
    base, session = front
    header = {"X-Forwarded-Client-Cert": xfcc(cas["stranger"].svid("/agent"))}
    status, answer = await ask_token(session, base, bearer(token) | header)
    assert (status, answer["error"]["code"]) == (401, "svid_untrusted"), answer


async def test_a_bound_token_checks_the_forwarded_certificate(
    front: tuple[str, aiohttp.ClientSession],
    upstream: Upstream,
    cas: dict[str, SvidCA],
    identity_token: str,
) -> None:
    """A task token requested with a forwarded certificate is bound to it: it works with that
    certificate forwarded, and not with another one."""
    own, other = cas["example"].svid("/agent"), cas["example"].svid("/agent")
    base, session = front
    header = {"X-Forwarded-Client-Cert": xfcc(own)}
    status, answer = await ask_token(session, base, bearer(identity_token) | header)
    assert status == 200, answer
    token: str = answer["access_token"]
    url = f"{base}/r/r/v1/chat/completions"
    status, _ = await post(session, url, bearer(token) | header)
    assert status == 200
    wrong = {"X-Forwarded-Client-Cert": xfcc(other)}
    status, refused = await post(session, url, bearer(token) | wrong)
    assert (status, refused["error"]["code"]) == (401, "token_binding_mismatch")
    assert len(upstream.requests) == 1


async def test_a_front_proxys_own_certificate_is_no_callers_identity(  # fixtures
    openbao: OpenBaoDevServer,
    agent: Agent,
    upstream: Upstream,
    seeded: str,
    tmp_path: Path,
    cas: dict[str, SvidCA],
) -> None:
    """A trusted front proxy that presents its own SVID and forwards a request without the
    header (its caller sent no certificate) lends that caller no identity: 401, nothing sent."""
    async with (
        forwarding_stack(
            openbao, agent, upstream.url, tmp_path, cas, form="xfcc", trusted="127.0.0.1/32"
        ) as base,
        plain_session(cas, (cas["example"].svid("/agent"), tmp_path)) as session,
    ):
        url = f"{base}/r/r/v1/chat/completions"
        status, body = await post(session, url)
        assert (status, body["error"]["code"]) == (401, "no_credential")
        status, answer = await ask_token(session, base, {})
        assert status == 401, answer
    assert upstream.requests == []
