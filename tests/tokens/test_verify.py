"""keyproxy.tokens.verify end to end: expired, tampered, misused and loosely encoded task
tokens are refused.

Real OpenBao, a real upstream, the real proxy and real clients."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from keyproxy import config as config_module
from keyproxy.config import Grant
from keyproxy.devserver import Agent, OpenBaoDevServer
from keyproxy.errors import Unauthenticated
from keyproxy.identity import Identity
from keyproxy.tokens import CLOCK_SKEW, LEEWAY, CertificateBinding, TaskTokens
from keyproxy.vault import Vault
from tests.helpers.logscan import CANARIES
from tests.helpers.servers import (
    Stack,
    bearer,
    token_config,
)
from tests.helpers.tokens import SCOPE, Clock, exchange, refused, replicas_of_own_list, status


async def test_expired_task_token_is_401(
    stack: Stack, identity_token: str, http: aiohttp.ClientSession
) -> None:
    """A task token stops working once it expires (plus the small leeway)."""
    code, answer = await exchange(http, stack.base, identity_token, ttl=1)
    assert code == 200
    url = f"{stack.base}/r/r/v1/chat/completions"
    assert await status(http, "POST", url, answer["access_token"]) == 200
    await refused(
        http,
        "POST",
        url,
        answer["access_token"],
        "the expired token kept working",
        within=15,
        interval=0.25,
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _parts(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    head, body, sig = token.split(".")

    def pad(s: str) -> str:
        return s + "=" * (-len(s) % 4)

    return (
        json.loads(base64.urlsafe_b64decode(pad(head))),
        json.loads(base64.urlsafe_b64decode(pad(body))),
        sig,
    )


def _assemble(header: dict[str, Any], claims: dict[str, Any], sig: str) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}.{sig}"


async def test_tampered_and_misused_tokens_are_401(
    stack: Stack,
    openbao: OpenBaoDevServer,
    agent: Agent,
    identity_token: str,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """A changed scope claim, an alg swap, a re-signed token, a task token where a workload
    token is required and the reverse, expired and not-yet-valid tokens all get 401."""
    code, answer = await exchange(http, stack.base, identity_token)
    assert code == 200
    token = answer["access_token"]
    header, claims, sig = _parts(token)
    url = f"{stack.base}/r/r/v1/chat/completions"
    widened = _assemble(
        header, {**claims, "scope": {"r": [{"methods": ["*"], "paths": ["/**"]}]}}, sig
    )
    alg_none = _assemble({**header, "alg": "none"}, claims, "")
    alg_hs = _assemble({**header, "alg": "HS256"}, claims, sig)
    attacker = Ed25519PrivateKey.generate()
    bad_kid = _assemble({**header, "kid": "keyproxy-tokens:v\u00b2"}, claims, sig)
    resigned = jwt.encode(
        claims, attacker, algorithm="EdDSA", headers={"typ": header["typ"], "kid": header["kid"]}
    )
    # Tokens from the real signer, with a clock an hour off either way.
    cfg = config_module.parse(json.dumps(token_config(openbao, agent, "http://127.0.0.1:1")), {})
    vault = Vault(cfg.vault)
    await vault.login()
    identity = Identity("openbao", agent.entity_id, {})
    scope = {"r": (Grant(frozenset({"POST"}), (("v1", "chat", "completions"),)),)}
    try:
        old = await TaskTokens(cfg, vault, clock=lambda: time.time() - 3600).issue(
            identity, scope, ttl=60
        )
        future = await TaskTokens(cfg, vault, clock=lambda: time.time() + 3600).issue(
            identity, scope, ttl=60
        )
    finally:
        vault.close()
    for bad in (widened, alg_none, alg_hs, bad_kid, resigned, old.token, future.token):
        CANARIES.add(bad)
    for bad in (widened, alg_none, alg_hs, bad_kid, resigned, old.token, future.token):
        assert await status(http, "POST", url, bad) == 401
    # A task token is exchanged only for one within it, and an identity token cannot revoke.
    code, answer = await exchange(http, stack.base, token, scope={"other": {"methods": ["GET"]}})
    assert (code, answer["error"]["code"]) == (403, "exceeds_parent_scope")
    async with http.post(f"{stack.base}/token/revoke", headers=bearer(identity_token)) as r:
        assert r.status == 401
    assert await status(http, "POST", url, token) == 200  # the genuine token still works


async def _resign(vault: Vault, header: bytes, payload: bytes) -> str:
    """A token over exactly these bytes, signed by the real Transit key."""
    signing_input = f"{_b64(header)}.{_b64(payload)}"
    _, signature = await vault.transit_sign("transit", "keyproxy-tokens", signing_input.encode())
    token = f"{signing_input}.{_b64(signature)}"
    CANARIES.add(token)
    return token


def _member(claims: dict[str, Any], raw: str) -> bytes:
    """The JSON text of `claims` with one more raw member written last."""
    return (json.dumps(claims)[:-1] + ", " + raw + "}").encode()


async def test_resigned_tokens_outside_strict_json_are_401(
    stack: Stack,
    openbao: OpenBaoDevServer,
    agent: Agent,
    identity_token: str,
    http: aiohttp.ClientSession,
) -> None:
    """Task tokens really signed by the Transit key but whose header or claims are not
    strictly UTF-8 JSON objects (a repeated scope or sub, UTF-16, NaN, an exp past 9999)
    are refused; the same claims re-signed as plain JSON work."""
    code, answer = await exchange(http, stack.base, identity_token)
    assert code == 200, answer
    header, claims, _ = _parts(answer["access_token"])
    head = json.dumps(header).encode()
    wide = json.dumps({"r": [{"methods": ["*"], "paths": ["/**"]}]})
    cfg = config_module.parse(json.dumps(token_config(openbao, agent, "http://127.0.0.1:1")), {})
    vault = Vault(cfg.vault)
    await vault.login()
    try:
        control = await _resign(vault, head, json.dumps(claims).encode())
        refused = {
            "duplicate-scope": await _resign(vault, head, _member(claims, f'"scope": {wide}')),
            "duplicate-sub": await _resign(vault, head, _member(claims, '"sub": "someone-else"')),
            "duplicate-jti": await _resign(vault, head, _member(claims, '"jti": "other"')),
            "utf16": await _resign(vault, head, json.dumps(claims).encode("utf-16")),
            "utf8-bom": await _resign(vault, head, json.dumps(claims).encode("utf-8-sig")),
            "nan": await _resign(vault, head, _member(claims, '"max_uses": NaN')),
            "header-duplicate-kid": await _resign(
                vault,
                (json.dumps(header)[:-1] + ', "kid": "x"}').encode(),
                json.dumps(claims).encode(),
            ),
            "header-utf16": await _resign(
                vault, json.dumps(header).encode("utf-16-le"), json.dumps(claims).encode()
            ),
            "exp-1e20": await _resign(vault, head, json.dumps({**claims, "exp": 1e20}).encode()),
            "iat-negative": await _resign(vault, head, json.dumps({**claims, "iat": -1}).encode()),
        }
    finally:
        vault.close()
    url = f"{stack.base}/r/r/v1/chat/completions"
    assert await status(http, "POST", url, control) == 200
    for name, token in refused.items():
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        async with http.post(url, headers=bearer(token), json=body) as response:
            answer = await response.json()
            assert response.status == 401, (name, answer)
            expected = "invalid_claims" if name in ("exp-1e20", "iat-negative") else "malformed"
            assert answer["error"]["code"] == expected, name


async def test_task_tokens_are_read_by_the_shared_strict_parser(
    openbao: OpenBaoDevServer, agent: Agent
) -> None:
    """The verifier refuses, before any key is looked up, what keyproxy.jws refuses."""
    cfg = config_module.parse(json.dumps(token_config(openbao, agent, "http://127.0.0.1:1")), {})
    vault = Vault(cfg.vault)
    try:
        tasks = TaskTokens(cfg, vault)  # never logged in, no keys: refusals come first
        header = _b64(b'{"alg":"EdDSA","typ":"keyproxy-task+jwt","kid":"keyproxy-tokens:v1"}')
        for payload, why in (
            (b'{"sub":"a","sub":"b"}', "repeated"),
            ('{"sub":"a"}'.encode("utf-32"), "not UTF-8"),
            (b'{"exp":Infinity}', "Infinity"),
        ):
            with pytest.raises(Unauthenticated) as caught:
                await tasks.verify(f"{header}.{_b64(payload)}.{_b64(b'sig')}")
            assert caught.value.reason == "malformed"
            assert why in caught.value.message
    finally:
        vault.close()


async def test_a_certificate_binding_is_read_whole_or_refused(
    stack: Stack,
    openbao: OpenBaoDevServer,
    agent: Agent,
    identity_token: str,
    http: aiohttp.ClientSession,
) -> None:
    """A `cnf` with both renewal members is read as a renewable binding; one with half of
    them, or that is not an object, refuses the token (invalid_claims), never reads unbound."""
    code, answer = await exchange(http, stack.base, identity_token)
    assert code == 200, answer
    header, claims, _ = _parts(answer["access_token"])
    head = json.dumps(header).encode()
    cfg = config_module.parse(json.dumps(token_config(openbao, agent, "http://127.0.0.1:1")), {})
    vault = Vault(cfg.vault)
    await vault.login()
    renewable = {"x5t#S256": "t", "spiffe_id": "spiffe://example.org/a", "spki#S256": "k"}
    halves = [
        {"x5t#S256": "t", "spiffe_id": "spiffe://example.org/a"},
        {"x5t#S256": "t", "spki#S256": "k"},
        {"spiffe_id": "spiffe://example.org/a", "spki#S256": "k"},
        "t",
    ]
    try:
        tasks = TaskTokens(cfg, vault)

        async def with_cnf(cnf: object) -> str:
            return await _resign(vault, head, json.dumps({**claims, "cnf": cnf}).encode())

        verified = await tasks.verify(await with_cnf(renewable))
        assert verified.certificate == CertificateBinding("t", "spiffe://example.org/a", "k")
        for cnf in halves:
            with pytest.raises(Unauthenticated) as caught:
                await tasks.verify(await with_cnf(cnf))
            assert caught.value.reason == "invalid_claims", cnf
    finally:
        vault.close()


async def test_a_delegated_token_never_outlives_its_parent(openbao: OpenBaoDevServer) -> None:
    """However long the revocation list's read before signing takes, a delegated token
    expires with its parent, and its answer says so; one whose signed exp says later (as a
    build that did not cap it signed) is refused once its parent has expired, when the
    parent's revocation may be pruned from the list."""
    clock = Clock()
    async with replicas_of_own_list(openbao, "outlive", count=1, clock=clock) as (
        (tasks,),
        (vault,),
    ):
        who = Identity("openbao", "outlive", {})
        parent = await tasks.issue(who, SCOPE, ttl=60, task="t")
        verified = await tasks.verify(parent.token)
        clock.now += 50  # the read before signing took that long
        child = await tasks.issue(who, SCOPE, ttl=30, task="t", parent=verified)
        CANARIES.update((parent.token, child.token))
        assert (child.expires_at, child.lifetime) == (parent.expires_at, 10)
        header, claims, _ = _parts(child.token)
        later = json.dumps(claims | {"exp": claims["exp"] + 100}).encode()
        late = await _resign(vault, json.dumps(header).encode(), later)
        assert (await tasks.verify(late)).expires_at == parent.expires_at
        clock.now = parent.expires_at + LEEWAY
        with pytest.raises(Unauthenticated, match="expired"):
            await tasks.verify(late)


@pytest.mark.parametrize("revoked", ["task", "subject", "token_id"])
async def test_a_delegation_its_parent_s_revocation_overtook_is_refused(
    openbao: OpenBaoDevServer, revoked: str
) -> None:
    """A revocation recorded (by another replica) after the parent was checked and before
    the child is signed, however long ago by then, refuses the child: a task's or a
    subject's names no token id the child's cascade could find, and covers only tokens
    issued before it."""
    clock = Clock()
    async with replicas_of_own_list(openbao, f"overtaken-{revoked}", clock=clock) as (
        (here, there),
        _,
    ):
        who = Identity("openbao", f"overtaken-{revoked}", {})
        parent = await here.issue(who, SCOPE, ttl=60, task="t")
        CANARIES.add(parent.token)
        verified = await here.verify(parent.token)
        if revoked == "task":
            await there.revoke(task="t")
        elif revoked == "subject":
            await there.revoke(subject=f"{who.issuer}|{who.subject}")
        else:
            await there.revoke(token_id=parent.token_id, expires_at=parent.expires_at)
        clock.now += CLOCK_SKEW + 1  # the read before signing took that long
        with pytest.raises(Unauthenticated, match="revoked"):
            await here.issue(who, SCOPE, ttl=30, task="t", parent=verified)


async def test_a_token_of_an_earlier_build_naming_no_list_is_judged_as_before(
    openbao: OpenBaoDevServer,
) -> None:
    """A token an earlier build issued names no revocation place (claim `rl`): another
    replica accepts it, judging it by the list it reads, and refuses it once that list names
    it; never `state_moved`."""
    async with replicas_of_own_list(openbao, "no-rl") as ((here, there), _):
        issued = await here.issue(Identity("openbao", "no-rl", {}), SCOPE, ttl=60)
        claims = jwt.decode(issued.token, options={"verify_signature": False})
        assert "rl" in claims
        del claims["rl"]
        earlier = await here._sign(claims)  # signed as an earlier build signed its tokens
        CANARIES.update((issued.token, earlier))
        assert (await there.verify(earlier)).token_id == issued.token_id
        await here.revoke(token_id=issued.token_id, expires_at=issued.expires_at)
        await there.refresh_revocations()
        with pytest.raises(Unauthenticated, match="revoked"):
            await there.verify(earlier)
