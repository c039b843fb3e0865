"""Task tokens end to end: exchange, use, scope, revocation, tampering, Transit rotation.

Real OpenBao (Transit signs, KV holds revocations), a real upstream, the real proxy, and
real clients (aiohttp, the openai SDK, and `keyproxy serve` subprocesses for two replicas).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import openai
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from yarl import URL

from keyproxy import config as config_module
from keyproxy.cli import main
from keyproxy.config import Grant
from keyproxy.devserver import Agent, OpenBaoDevServer
from keyproxy.errors import ConfigError, Forbidden, Unauthenticated, Unavailable, VaultError
from keyproxy.identity import Identity
from keyproxy.metrics import Metrics
from keyproxy.tokens import CLOCK_SKEW, TaskTokens
from keyproxy.vault import Vault
from tests.helpers.cli import ready, started
from tests.helpers.events import read_events
from tests.helpers.logscan import CANARIES
from tests.helpers.polling import eventually
from tests.helpers.servers import (
    Stack,
    Upstream,
    bearer,
    free_port,
    new_key,
    running_proxy,
    token_config,
)


@pytest.fixture(scope="module")
def agent(openbao: OpenBaoDevServer, agent: Agent) -> Agent:
    """conftest's agent, with the key of token_config's routes stored."""
    openbao.put_key("keyproxy/keys/tokens-test", new_key())
    return agent


@pytest.fixture
async def stack(
    openbao: OpenBaoDevServer, agent: Agent, upstream: Upstream
) -> AsyncIterator[Stack]:
    async with running_proxy(token_config(openbao, agent, upstream.url)) as value:
        yield value


async def exchange(
    http: aiohttp.ClientSession, base: str, identity_token: str, **body: Any
) -> tuple[int, dict[str, Any]]:
    body.setdefault("scope", {"r": {"methods": ["POST"], "paths": ["/v1/chat/completions"]}})
    body.setdefault("task", "test-task")
    async with http.post(f"{base}/token", json=body, headers=bearer(identity_token)) as response:
        answer: dict[str, Any] = await response.json()
        if response.status == 200:
            CANARIES.add(answer["access_token"])
        return response.status, answer


async def status(http: aiohttp.ClientSession, method: str, url: str, token: str) -> int:
    async with http.request(
        method,
        url,
        headers=bearer(token),
        json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
    ) as response:
        await response.read()
        return response.status


async def refused(
    http: aiohttp.ClientSession, method: str, url: str, token: str, what: str, **wait: float
) -> None:
    """Until `token` is answered 401 at `url`; `wait` bounds it (`eventually`'s keywords)."""
    await eventually(lambda: status(http, method, url, token), what, until=(401).__eq__, **wait)


async def test_exchange_use_scope_and_revoke(
    stack: Stack, upstream: Upstream, identity_token: str, http: aiohttp.ClientSession
) -> None:
    """An identity token becomes a task token that works inside its scope (also through the
    openai SDK), gets 403 outside it, and 401 once its holder revokes it."""
    code, answer = await exchange(http, stack.base, identity_token, intent="summarise", ttl="3m")
    assert code == 200, answer
    token = answer["access_token"]
    assert answer["scope"] == {"r": [{"methods": ["POST"], "paths": ["/v1/chat/completions"]}]}
    assert 170 <= answer["expires_in"] <= 180
    assert jwt.get_unverified_header(token)["typ"] == "keyproxy-task+jwt"

    client = openai.AsyncOpenAI(base_url=f"{stack.base}/r/r/v1", api_key=token, max_retries=0)
    try:
        chat = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "inside scope"}]
        )
    finally:
        await client.close()
    assert "inside scope" in (chat.choices[0].message.content or "")
    assert await status(http, "GET", f"{stack.base}/r/r/v1/models", token) == 403  # method
    assert await status(http, "POST", f"{stack.base}/r/r/v1/embeddings", token) == 403  # path
    assert await status(http, "POST", f"{stack.base}/r/other/echo", token) == 403  # route
    assert len(upstream.requests) == 1
    assert all(token not in v for v in upstream.requests[0].headers.values())

    async with http.post(f"{stack.base}/token/revoke", headers=bearer(token)) as response:
        assert response.status == 200
        assert (await response.json())["revoked"] == answer["token_id"]
    assert await status(http, "POST", f"{stack.base}/r/r/v1/chat/completions", token) == 401


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


async def test_grant_is_the_intersection_with_policy(
    stack: Stack, identity_token: str, http: aiohttp.ClientSession
) -> None:
    """Asking for more than policy allows yields the allowed part only; nothing allowed is
    403; a TTL above the policy's cap is clamped; max_uses is enforced."""
    code, answer = await exchange(
        http,
        stack.base,
        identity_token,
        ttl="1h",
        max_uses=2,
        scope={
            "r": {"methods": ["GET", "DELETE"], "paths": ["/v1/models", "/admin"]},
            "other": {"methods": ["GET", "POST"], "paths": ["/echo"]},
        },
    )
    assert code == 200, answer
    assert answer["scope"] == {
        "r": [{"methods": ["GET"], "paths": ["/v1/models"]}],
        "other": [{"methods": ["GET"], "paths": ["/echo"]}],
    }
    assert answer["expires_in"] == 300  # policy max_ttl 5m, below tokens.max_ttl 10m
    token = answer["access_token"]
    assert [await status(http, "GET", f"{stack.base}/r/r/v1/models", token) for _ in range(3)] == [
        200,
        200,
        401,
    ]
    code, answer = await exchange(
        http, stack.base, identity_token, scope={"r": {"methods": ["DELETE"], "paths": ["/x"]}}
    )
    assert code == 403
    assert answer["error"]["code"] == "nothing_granted"


async def test_rfc8693_token_exchange_form(
    stack: Stack, identity_token: str, http: aiohttp.ClientSession
) -> None:
    """A standard OAuth token-exchange request gets a Bearer token with the granted scope."""
    form = {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": identity_token,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "scope": "r:POST:/v1/chat/completions",
        "audience": "other",
        "task": "oauth-client",
    }
    async with http.post(f"{stack.base}/token", data=form) as response:
        answer = await response.json()
        assert response.status == 200, answer
    CANARIES.add(answer["access_token"])
    assert answer["token_type"] == "Bearer"
    assert answer["issued_token_type"] == "urn:ietf:params:oauth:token-type:jwt"
    assert answer["scope"] == "r:POST:/v1/chat/completions other:GET:/echo"
    assert await status(http, "GET", f"{stack.base}/r/other/echo", answer["access_token"]) == 200


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
    # A task token cannot be exchanged again, and an identity token cannot revoke.
    code, answer = await exchange(http, stack.base, token)
    assert (code, answer["error"]["code"]) == (401, "wrong_token_type")
    async with http.post(f"{stack.base}/token/revoke", headers=bearer(identity_token)) as r:
        assert r.status == 401
    assert await status(http, "POST", url, token) == 200  # the genuine token still works


async def test_transit_rotation_keeps_old_tokens_valid(
    stack: Stack, openbao: OpenBaoDevServer, identity_token: str, http: aiohttp.ClientSession
) -> None:
    """After the Transit key rotates, old tokens keep working and new ones name the new
    version; the JWKS endpoint publishes both."""
    _, first = await exchange(http, stack.base, identity_token)
    await asyncio.to_thread(openbao.bao, "write", "-f", "transit/keys/keyproxy-tokens/rotate")
    _, second = await exchange(http, stack.base, identity_token)
    old_kid = jwt.get_unverified_header(first["access_token"])["kid"]
    new_kid = jwt.get_unverified_header(second["access_token"])["kid"]
    assert int(new_kid.rsplit(":v", 1)[1]) == int(old_kid.rsplit(":v", 1)[1]) + 1
    url = f"{stack.base}/r/r/v1/chat/completions"
    assert await status(http, "POST", url, first["access_token"]) == 200
    assert await status(http, "POST", url, second["access_token"]) == 200
    async with http.get(f"{stack.base}/.well-known/jwks.json") as response:
        kids = {k["kid"] for k in (await response.json())["keys"]}
    assert {old_kid, new_kid} <= kids


def test_exception_tokens_need_owner_and_reason(
    openbao: OpenBaoDevServer,
    agent: Agent,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`keyproxy token issue` refuses an exception token without owner or reason, caps its
    TTL, and `token list` shows the one it issued with owner, reason and expiry."""
    path = tmp_path / "k.yaml"
    cfg = token_config(openbao, agent, "http://127.0.0.1:1")
    cfg["vault"]["auth"] = {"method": "token"}
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("BAO_TOKEN", openbao.root_token)
    base = [
        "token",
        "issue",
        "-c",
        str(path),
        "--route",
        "r",
        "--paths",
        "/v1/models",
        "--methods",
        "GET",
        "--ttl",
        "48h",
    ]
    assert main([*base, "--reason", "legacy batch job"]) == 2
    assert main([*base, "--owner", "alice@example.com"]) == 2
    capsys.readouterr()
    assert main([*base, "--owner", "alice@example.com", "--reason", "legacy batch job"]) == 0
    out = capsys.readouterr()
    CANARIES.add(out.out.strip())
    assert "24h" in out.err or "86400" in out.err
    assert main(["token", "list", "-c", str(path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    mine = [e for e in listed if e["owner"] == "alice@example.com"]
    assert mine
    assert mine[0]["reason"] == "legacy batch job"
    assert mine[0]["expires_at"] - time.time() <= 86400 + 5
    # Revoking the owner's exception tokens removes them from the list.
    revoke = ["token", "revoke", "-c", str(path), "--issuer", "exception"]
    assert main([*revoke, "--subject", "alice@example.com"]) == 0
    assert main(["token", "list", "-c", str(path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert not [e for e in listed if e["owner"] == "alice@example.com"]


def test_revocation_by_subject_tolerates_clock_skew() -> None:
    """A subject or task revocation also covers tokens a replica with a clock a few seconds
    ahead stamped as issued after it; id revocations outlive their token's expiry."""
    from keyproxy.tokens import CLOCK_SKEW, Revocations  # noqa: PLC0415

    revocations = Revocations(subjects={"k8s|bot": 1000.0 + CLOCK_SKEW})
    assert revocations.names("t1", "k8s|bot", None, 1000.0 + CLOCK_SKEW - 1)
    assert not revocations.names("t1", "k8s|bot", None, 1000.0 + CLOCK_SKEW + 1)
    revocations.ids["t2"] = 2000.0
    revocations.prune(2000.0 + CLOCK_SKEW, 900.0)
    assert "t2" in revocations.ids


# ----------------------------------------------------------------------------- replicas


@pytest.fixture
def replicas(
    openbao: OpenBaoDevServer, agent: Agent, tmp_path: Path, log_dir: Path
) -> Iterator[list[str]]:
    """Two `keyproxy serve` processes sharing one OpenBao; yields their base URLs."""
    path = tmp_path / "k.yaml"
    path.write_text(yaml.safe_dump(token_config(openbao, agent, "http://127.0.0.1:9")))
    with contextlib.ExitStack() as replicas:
        bases = []
        for i in range(2):
            port = free_port()
            args = ("serve", "-c", str(path), "--port", str(port), "--admin-port", "0")
            replicas.enter_context(started(*args, out=log_dir / f"replica-{i}.out"))
            bases.append(f"http://127.0.0.1:{port}")
        yield bases


async def test_revocation_reaches_another_replica_within_2s(
    replicas: list[str], identity_token: str, http: aiohttp.ClientSession
) -> None:
    """A token revoked through one replica is refused by the other within 2 s."""
    a, b = replicas
    await ready(http, a)
    await ready(http, b)
    code, answer = await exchange(
        http, a, identity_token, scope={"other": {"methods": ["GET"], "paths": ["/echo"]}}
    )
    assert code == 200, answer
    token = answer["access_token"]
    # Both replicas accept it (the upstream is unreachable, so 502 means "authorised").
    assert await status(http, "GET", f"{b}/r/other/echo", token) == 502
    async with http.post(f"{a}/token/revoke", headers=bearer(token)) as response:
        assert response.status == 200
    await refused(
        http,
        "GET",
        f"{b}/r/other/echo",
        token,
        "the other replica still accepts the token",
        within=2.0,
        interval=0.05,
    )


async def test_operator_revokes_by_task(
    stack: Stack,
    openbao: OpenBaoDevServer,
    agent: Agent,
    identity_token: str,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`keyproxy token revoke --task` ends every token of that task."""
    _, answer = await exchange(http, stack.base, identity_token, task="op-revoke-me")
    url = f"{stack.base}/r/r/v1/chat/completions"
    assert await status(http, "POST", url, answer["access_token"]) == 200
    path = tmp_path / "k.yaml"
    cfg = token_config(openbao, agent, "http://127.0.0.1:1")
    cfg["vault"]["auth"] = {"method": "token"}
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("BAO_TOKEN", openbao.root_token)
    assert (
        await asyncio.to_thread(
            main, ["token", "revoke", "-c", str(path), "--task", "op-revoke-me"]
        )
        == 0
    )
    await refused(
        http,
        "POST",
        url,
        answer["access_token"],
        "the revoked token kept working",
        within=2,
        interval=0.05,
    )


async def test_vault_down_exchange_503_existing_tokens_work(
    fresh_openbao: OpenBaoDevServer, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """With Vault stopped, the exchange answers 503 and existing task tokens keep verifying."""
    bao = fresh_openbao
    bao.put_key("keyproxy/keys/tokens-test", new_key())
    agent = bao.add_agent("outage")
    identity_token = bao.agent_token(agent)
    CANARIES.add(identity_token)
    async with running_proxy(token_config(bao, agent, upstream.url)) as stack:
        code, answer = await exchange(http, stack.base, identity_token)
        assert code == 200
        bao.stop()
        code, failed = await exchange(http, stack.base, identity_token)
        assert code == 503, failed
        url = f"{stack.base}/r/r/v1/chat/completions"
        assert await status(http, "POST", url, answer["access_token"]) == 200


# ----------------------------------------------------------------------------- strict encoding


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


# ----------------------------------------------------------------------------- stale keys


class VaultRelay:
    """A TCP relay on 127.0.0.1 in front of OpenBao that can hold requests (a stalled Vault)
    or drop connections (Vault down), and records the requests it held."""

    def __init__(self, target: str) -> None:
        url = URL(target)
        self.target = (url.host or "127.0.0.1", url.port or 8200)
        self.gate = asyncio.Event()
        self.gate.set()
        self.down = False
        self.held: list[bytes] = []
        self.url = ""
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        self.gate.set()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        for pump in (
            self._pump(reader, up_writer, requests=True),
            self._pump(up_reader, writer, requests=False),
        ):
            task = asyncio.create_task(pump)
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, requests: bool
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                if requests and self.down:
                    break
                if requests and not self.gate.is_set():
                    self.held.append(chunk)
                    await self.gate.wait()
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def relay(openbao: OpenBaoDevServer) -> AsyncIterator[VaultRelay]:
    value = VaultRelay(openbao.addr)
    await value.start()
    yield value
    await value.close()


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def _tokens_via(
    relay: VaultRelay, openbao: OpenBaoDevServer, agent: Agent, clock: Clock, **tokens: str
) -> tuple[TaskTokens, Vault]:
    cfg_doc = token_config(openbao, agent, "http://127.0.0.1:1")
    cfg_doc["vault"]["addr"] = relay.url
    cfg_doc["tokens"] |= tokens
    cfg = config_module.parse(json.dumps(cfg_doc), {})
    vault = Vault(cfg.vault)
    await vault.login()
    tasks = TaskTokens(cfg, vault, clock=clock)
    await tasks.refresh_keys(force=True)
    return tasks, vault


SCOPE = {"r": (Grant(frozenset({"POST"}), (("v1", "chat", "completions"),)),)}


async def test_known_key_never_waits_for_a_stalled_vault(
    relay: VaultRelay, openbao: OpenBaoDevServer, agent: Agent
) -> None:
    """The public keys are re-read in the background; while that read is stalled in Vault a
    token with a known key verifies at once, and a version added meanwhile is known as soon
    as the read lands."""
    tasks, vault = await _tokens_via(
        relay, openbao, agent, Clock(), key_refresh_interval="200ms", key_max_staleness="1h"
    )
    identity = Identity("openbao", agent.entity_id, {})
    issued = await tasks.issue(identity, SCOPE, ttl=120)
    CANARIES.add(issued.token)
    before = tasks.key_status()["versions"]
    relay.gate.clear()
    runner = asyncio.create_task(tasks.run())
    try:
        await eventually(
            lambda: any(b"/transit/keys/keyproxy-tokens" in h for h in relay.held),
            "the background key read never reached Vault",
            interval=0.02,
        )
        verified = await tasks.verify(issued.token)  # never seen: a full signature check
        assert verified.token_id == issued.token_id
        assert not relay.gate.is_set()  # the key read is still waiting in Vault
        await asyncio.to_thread(openbao.bao, "write", "-f", "transit/keys/keyproxy-tokens/rotate")
        relay.gate.set()
        await eventually(
            lambda: tasks.key_status()["versions"] == [*before, max(before) + 1],
            "the background read never brought the new version",
            interval=0.02,
        )
        assert tasks.key_status()["age"] < 5
    finally:
        relay.gate.set()
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        vault.close()


async def test_keys_past_max_staleness_refuse_task_tokens(
    relay: VaultRelay, openbao: OpenBaoDevServer, agent: Agent
) -> None:
    """With Vault down the known public keys verify until tokens.key_max_staleness after the
    last good read; then task tokens get 503 token_keys_stale (counted) until a read
    succeeds again."""
    clock = Clock()
    tasks, vault = await _tokens_via(
        relay, openbao, agent, clock, key_refresh_interval="1m", key_max_staleness="2m"
    )
    try:
        identity = Identity("openbao", agent.entity_id, {})
        remembered = await tasks.issue(identity, SCOPE, ttl=600)
        fresh = await tasks.issue(identity, SCOPE, ttl=600)
        CANARIES.update({remembered.token, fresh.token})
        await tasks.verify(remembered.token)
        relay.down = True
        with pytest.raises(VaultError):
            await tasks.refresh_keys(force=True)
        clock.now += 120  # at the limit: still trusted
        assert (await tasks.verify(remembered.token)).token_id == remembered.token_id
        clock.now += 1
        for token in (remembered.token, fresh.token):
            with pytest.raises(Unavailable) as caught:
                await tasks.verify(token)
            assert (caught.value.reason, caught.value.status) == ("token_keys_stale", 503)
        assert tasks.key_status() | {"versions": None} == {
            "age": pytest.approx(121, abs=1),
            "stale": True,
            "versions": None,
            "stale_refusals": 2,
        }
        metrics = Metrics(dict)
        metrics.watch_signing_keys(dict, tasks.key_status)
        exposition = metrics.exposition()[0].decode()
        assert "keyproxy_token_keys_stale 1.0" in exposition
        assert "keyproxy_token_keys_stale_refusals_total 2.0" in exposition
        relay.down = False
        await tasks.refresh_keys(force=True)
        assert (await tasks.verify(fresh.token)).token_id == fresh.token_id
        assert tasks.key_status()["stale"] is False
    finally:
        vault.close()


# ----------------------------------------------------------------------------- revocation


async def test_holder_revocation_is_one_audit_event(
    stack: Stack, identity_token: str, http: aiohttp.ClientSession, audit_log: Path
) -> None:
    """A holder revoking its token writes exactly one token.revoked event, with who revoked,
    the token id, the task, and the identity's issuer and subject."""
    code, answer = await exchange(http, stack.base, identity_token, task="one-event")
    assert code == 200, answer
    async with http.post(f"{stack.base}/token/revoke", headers=bearer(answer["access_token"])) as r:
        assert r.status == 200
    # Both events of one request reach the file in one write: once one is there, all are.
    events = await eventually(
        lambda: [
            e
            for e in read_events(audit_log)
            if e.get("event") == "token.revoked" and e.get("token_id") == answer["token_id"]
        ],
        "no token.revoked event",
    )
    assert len(events) == 1, events
    assert {k: events[0].get(k) for k in ("by", "task", "issuer", "subject")} == {
        "by": "holder",
        "task": "one-event",
        "issuer": "openbao",
        "subject": stack.config.policies[0].subjects[0],
    }
    nulls = [e for e in read_events(audit_log) if e.get("event") == "token.revoked"]
    assert not [e for e in nulls if e.get("by") is None]


@pytest.fixture
async def revocable(
    openbao: OpenBaoDevServer, upstream: Upstream
) -> AsyncIterator[tuple[Stack, Agent, str]]:
    """A proxy for an agent of its own, so revoking its subject touches no other test."""
    own = openbao.add_agent("revoked-agent")
    token = openbao.agent_token(own)
    CANARIES.add(token)
    async with running_proxy(token_config(openbao, own, upstream.url)) as value:
        yield value, own, token


async def test_revoked_subject_or_task_gets_no_new_token(
    revocable: tuple[Stack, Agent, str],
    openbao: OpenBaoDevServer,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Right after `keyproxy token revoke --task` that task gets no new token (403
    task_revoked) while other tasks do; right after `--issuer --subject` the identity gets
    none (403 subject_revoked); tokens issued before are refused on use."""
    stack, own, identity_token = revocable
    path = tmp_path / "k.yaml"
    cfg = token_config(openbao, own, "http://127.0.0.1:1")
    cfg["vault"]["auth"] = {"method": "token"}
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("BAO_TOKEN", openbao.root_token)
    code, before = await exchange(http, stack.base, identity_token, task="doomed")
    assert code == 200
    revoke = ["token", "revoke", "-c", str(path)]
    assert await asyncio.to_thread(main, [*revoke, "--task", "doomed"]) == 0
    code, answer = await exchange(http, stack.base, identity_token, task="doomed")
    assert (code, answer["error"]["code"]) == (403, "task_revoked")
    code, other = await exchange(http, stack.base, identity_token, task="another")
    assert code == 200, other
    subject = ["--issuer", "openbao", "--subject", own.entity_id]
    assert await asyncio.to_thread(main, [*revoke, *subject]) == 0
    for task in ("another", "fresh", None):
        body = {"task": task} if task else {"task": ""}
        code, answer = await exchange(http, stack.base, identity_token, **body)
        assert (code, answer["error"]["code"]) == (403, "subject_revoked"), task
    url = f"{stack.base}/r/r/v1/chat/completions"
    for token in (before["access_token"], other["access_token"]):
        assert await status(http, "POST", url, token) == 401


async def test_issuance_refusal_covers_what_the_revocation_covers(
    openbao: OpenBaoDevServer,
) -> None:
    """A subject revocation refuses issuance exactly for tokens it would name (issued up to
    CLOCK_SKEW after it), and no longer after that; the same for a task."""
    own = openbao.add_agent("skew-agent")
    cfg = config_module.parse(json.dumps(token_config(openbao, own, "http://127.0.0.1:1")), {})
    vault = Vault(cfg.vault)
    await vault.login()
    clock = Clock()
    clock.now = float(int(clock.now))
    try:
        tasks = TaskTokens(cfg, vault, clock=clock)
        identity = Identity("openbao", own.entity_id, {})
        await tasks.revoke(subject=f"openbao|{own.entity_id}", task="skewed")
        clock.now += CLOCK_SKEW  # a token stamped now is still named by the revocation
        for task, reason in ((None, "subject_revoked"), ("skewed", "subject_revoked")):
            with pytest.raises(Forbidden) as caught:
                await tasks.issue(identity, SCOPE, ttl=60, task=task)
            assert caught.value.reason == reason
        other = Identity("openbao", "someone-else", {})
        with pytest.raises(Forbidden) as caught:
            await tasks.issue(other, SCOPE, ttl=60, task="skewed")
        assert caught.value.reason == "task_revoked"
        assert (await tasks.issue(other, SCOPE, ttl=60, task="unrelated")).token_id
        clock.now += 1  # past the window: the revocation names no token stamped now
        issued = await tasks.issue(identity, SCOPE, ttl=60, task="skewed")
        CANARIES.add(issued.token)
        assert (await tasks.verify(issued.token)).token_id == issued.token_id
    finally:
        vault.close()


def test_key_refresh_settings(openbao: OpenBaoDevServer, agent: Agent) -> None:
    """The Transit keys are re-read every minute and trusted for an hour by default; a max
    staleness below the refresh interval is refused with its YAML path."""
    doc = token_config(openbao, agent, "http://127.0.0.1:1")
    tokens = config_module.parse(json.dumps(doc), {}).tokens
    assert (tokens.key_refresh_interval, tokens.key_max_staleness) == (60.0, 3600.0)
    doc["tokens"] |= {"key_refresh_interval": "5m", "key_max_staleness": "1m"}
    with pytest.raises(ConfigError) as caught:
        config_module.parse(json.dumps(doc), {})
    assert caught.value.path == "tokens.key_max_staleness"


async def test_broker_events_and_answers_carry_the_request_id(
    stack: Stack, identity_token: str, http: aiohttp.ClientSession, audit_log: Path
) -> None:
    """An exchange, a refused exchange and a holder revocation each answer with the caller's
    X-Request-Id and write it into their events; the refusal is a warning."""
    scope = {"r": {"methods": ["POST"], "paths": ["/v1/chat/completions"]}}
    issued_headers = {**bearer(identity_token), "X-Request-Id": "broker-issue-1"}
    async with http.post(
        f"{stack.base}/token", json={"scope": scope, "task": "rid"}, headers=issued_headers
    ) as response:
        assert response.status == 200
        assert response.headers["X-Request-Id"] == "broker-issue-1"
        token = (await response.json())["access_token"]
        CANARIES.add(token)
    denied_headers = {**bearer(identity_token), "X-Request-Id": "broker-deny-1"}
    nothing = {"scope": {"other": {"methods": ["DELETE"], "paths": ["/x"]}}}
    async with http.post(f"{stack.base}/token", json=nothing, headers=denied_headers) as response:
        assert response.status == 403
        assert response.headers["X-Request-Id"] == "broker-deny-1"
    revoke_headers = {**bearer(token), "X-Request-Id": "broker-revoke-1"}
    async with http.post(f"{stack.base}/token/revoke", headers=revoke_headers) as response:
        assert response.status == 200
        assert response.headers["X-Request-Id"] == "broker-revoke-1"
    wanted = {
        "token.issued": "broker-issue-1",
        "token.denied": "broker-deny-1",
        "token.revoked": "broker-revoke-1",
    }
    found = await eventually(
        lambda: {
            e["event"]: e
            for e in read_events(audit_log)
            if e.get("request_id") in wanted.values() and e.get("event") in wanted
        },
        f"events missing of {sorted(wanted)}",
        until=lambda f: set(f) == set(wanted),
    )
    assert {name: e["request_id"] for name, e in found.items()} == wanted
    assert found["token.denied"]["level"] == "warning"
