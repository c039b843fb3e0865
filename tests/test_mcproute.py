"""MCP routes end to end: the official `mcp` SDK's client as the agent, its server as the
upstream (checking the key), real OpenBao, and keyproxy between them.

The server writes every request it accepts to its log (tests/mcp/server.py): what keyproxy
refuses must never appear there.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import httpx
import pytest
from aiohttp import web
from httpx_sse import EventSource
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import McpError
from mcp.types import TextContent
from multidict import CIMultiDict

from keyproxy import audit, mcp, mcproute
from keyproxy.caller import Identity
from keyproxy.devserver import Agent, OpenBaoDevServer
from keyproxy.secret import fingerprint
from keyproxy.server.app import TASKS
from keyproxy.tokens.sessionseal import binding
from tests.helpers.cli import clean_env, keyproxy
from tests.helpers.logscan import CANARIES
from tests.helpers.polling import eventually
from tests.helpers.servers import Stack, bearer, running_proxy, serve
from tests.mcp.server import McpServer, running_server

KEY_PATH = "keyproxy/keys/mcp-route"  # no "-test-" in a logged name: new_key()s start "sk-test-"
ROUTE = "issues"
MAX_BODY = 64 * 1024
ENDPOINT = "{}/r/" + ROUTE + "/mcp"  # the server's MCP endpoint, through keyproxy
SESSION = "Mcp-Session-Id"


class Served(NamedTuple):
    server: McpServer
    log: Path
    key_version: int
    key_fingerprint: str  # of the key that version holds (Secret.fingerprint)


@pytest.fixture(scope="module")
def agent(openbao: OpenBaoDevServer) -> Agent:
    return openbao.add_agent("mcp-agent")


@pytest.fixture(scope="module", params=[False, True], ids=["sse", "json"])
def served(
    request: pytest.FixtureRequest, openbao: OpenBaoDevServer, log_dir: Path
) -> Iterator[Served]:
    """The MCP server (answering as SSE streams, then as JSON), its key in OpenBao."""
    key = "mk-" + secrets.token_urlsafe(24)
    CANARIES.add(key)
    version = openbao.put_key(KEY_PATH, key)
    log = log_dir / f"mcp-server-{request.param}.log"
    with running_server(key, json_response=request.param, log=log) as server:
        yield Served(server, log, version, fingerprint(key))


def mcp_config(bao: OpenBaoDevServer, agent: Agent, upstream: str) -> dict[str, Any]:
    return {
        "vault": bao.vault_yaml(refresh_interval="500ms", max_staleness="60s"),
        "identity": {"issuers": [bao.issuer_yaml("openbao")]},
        "tokens": {"max_ttl": "10m", "default_ttl": "2m", "key_refetch_cooldown": "1s"},
        "routes": {
            ROUTE: {
                "kind": "mcp",
                "upstream": upstream,
                "secret": {"path": KEY_PATH},
                "inject": [{"header": "Authorization", "format": "Bearer {key}"}],
                "egress": {"allow_cidrs": ["127.0.0.0/8"]},
                "allow_http": True,
                "max_body": MAX_BODY,
            }
        },
        "policies": [
            {
                "name": "mcp-agent",
                "issuers": ["openbao"],
                "subjects": [agent.entity_id],
                "allow": {ROUTE: {"tools": ["search_issues", "whoami"], "prompts": ["summarize"]}},
            }
        ],
    }


@asynccontextmanager
async def _hostile_route(
    openbao: OpenBaoDevServer, agent: Agent, app: web.Application, *, sampling: bool = False
) -> AsyncIterator[dict[str, Any]]:
    """`app`, a hostile MCP server, on 127.0.0.1 for the time of the block, and the
    configuration of the route to it (sending STREAM_KEY, a canary); with `sampling`, also
    of route "sampling" to it, which lets sampling requests through (search_issues granted)."""
    CANARIES.add(STREAM_KEY)
    await asyncio.to_thread(openbao.put_key, KEY_PATH + "-stream", STREAM_KEY)
    runner, port = await serve(app)
    try:
        cfg = mcp_config(openbao, agent, f"http://127.0.0.1:{port}")
        cfg["routes"][ROUTE] = {**cfg["routes"][ROUTE], "secret": {"path": KEY_PATH + "-stream"}}
        if sampling:
            server_requests = {"server_requests": ["sampling/createMessage"]}
            cfg["routes"]["sampling"] = {**cfg["routes"][ROUTE], "mcp": server_requests}
            cfg["policies"][0]["allow"]["sampling"] = {"tools": ["search_issues"]}
        yield cfg
    finally:
        await runner.cleanup()


@asynccontextmanager
async def proxied(openbao: OpenBaoDevServer, agent: Agent, served: Served) -> AsyncIterator[Stack]:
    origin = served.server.url.removesuffix("/mcp")
    async with running_proxy(mcp_config(openbao, agent, origin)) as stack:
        yield stack


async def task_token(stack: Stack, identity: str, task: str, tools: list[str]) -> str:
    """A task token scoped to `tools` on the MCP route."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{stack.base}/token",
            json={"scope": {ROUTE: {"tools": tools}}, "task": task},
            headers=bearer(identity),
        ) as answer,
    ):
        assert answer.status == 200, await answer.text()
        token = str((await answer.json())["access_token"])
    CANARIES.add(token)
    return token


@asynccontextmanager
async def session(stack: Stack, token: str) -> AsyncIterator[ClientSession]:
    """The SDK's Streamable HTTP client, connected through keyproxy with `token`."""
    async with (
        httpx.AsyncClient(headers=bearer(token), timeout=httpx.Timeout(30, read=60)) as http,
        streamable_http_client(ENDPOINT.format(stack.base), http_client=http) as (read, write, _),
        ClientSession(read, write) as client,
    ):
        await client.initialize()
        yield client


def sealed(stack: Stack, agent: Agent, server_id: str = "session-1", route: str = ROUTE) -> str:
    """The server's `server_id` as keyproxy gives it to `agent` on `route`: sealed for it."""
    bound = binding(route, Identity("openbao", agent.entity_id))
    return stack.app[TASKS].seal.seal(server_id, bound)


def server_requests(log: Path) -> list[dict[str, Any]]:
    """The requests the MCP server accepted, as it logged them."""
    if not log.exists():
        return []
    found = []
    for line in log.read_text(encoding="utf-8").splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


def events(audit_log: Path, event: str) -> list[dict[str, Any]]:
    found = []
    for line in audit_log.read_text(encoding="utf-8").splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict) and value.get("event") == event:
            found.append(value)
    return found


async def calls_of(audit_log: Path, task: str, count: int) -> list[dict[str, Any]]:
    """The `mcp.call` events of `task`, once there are `count` of them (bounded wait)."""
    deadline = time.monotonic() + 10
    while len(found := [e for e in events(audit_log, "mcp.call") if e.get("task") == task]) < count:
        assert time.monotonic() < deadline, f"only {len(found)} mcp.call events for {task}"
        await asyncio.sleep(0.05)  # polling interval of a bounded wait
    return found


async def test_a_token_scoped_to_one_tool_lists_calls_and_is_refused_the_other(
    openbao: OpenBaoDevServer,
    agent: Agent,
    served: Served,
    audit_log: Path,
    tmp_path: Path,
) -> None:
    """Through keyproxy the SDK client lists only the granted tool, calls it, and gets a
    JSON-RPC error for the other, which the server never sees; each call is an audit event
    naming the tool and the key version, and `keyproxy audit --calls` lists them per task."""
    identity = openbao.agent_token(agent)
    CANARIES.add(identity)
    task = f"triage-{secrets.token_hex(4)}"
    async with proxied(openbao, agent, served) as stack:
        token = await task_token(stack, identity, task, ["search_issues"])
        async with session(stack, token) as client:
            tools = await client.list_tools()
            assert [t.name for t in tools.tools] == ["search_issues"]
            found = await client.call_tool("search_issues", {"query": "login"})
            assert not found.isError
            assert found.structuredContent == {
                "result": ["Login fails on Safari", "Login page is slow"]
            }
            with pytest.raises(McpError) as refused:
                await client.call_tool("whoami", {})
            assert refused.value.error.code == -32602
            assert "not granted" in refused.value.error.message
            # The session goes on after a refusal.
            assert [p.name for p in (await client.list_prompts()).prompts] == []
    bodies = [r["body"] for r in server_requests(served.log)]
    assert any('"search_issues"' in b for b in bodies)
    assert not any('"whoami"' in b for b in bodies)
    calls = await calls_of(audit_log, task, 5)
    tool_calls = [c for c in calls if c["mcp_method"] == "tools/call"]
    assert [(c["mcp_tool"], c["decision"]) for c in tool_calls] == [
        ("search_issues", "allow"),
        ("whoami", "deny"),
    ]
    # The refused call never went upstream: its request names no key version (it is no use
    # of the key in a blast radius), the allowed one the version it was sent with.
    rids = [c["request_id"] for c in tool_calls]
    sent = await eventually(
        lambda: {e["request_id"]: e for e in events(audit_log, "request")},
        "no request events",
        until=lambda found: all(rid in found for rid in rids),
    )
    assert [sent[rid]["key_version"] for rid in rids] == [served.key_version, None]
    assert [sent[rid]["key_fingerprint"] for rid in rids] == [served.key_fingerprint, None]
    for call in calls:  # a refused call was sent with no key
        allowed = call["decision"] == "allow"
        assert call["key_version"] == (served.key_version if allowed else None)
        assert call["key_fingerprint"] == (served.key_fingerprint if allowed else None)
        assert call["subject"] == agent.entity_id
        assert call["token_id"]
        assert call["route"] == ROUTE
        assert "login" not in json.dumps(call)  # the arguments are never logged
    # The session as a digest: an id read from the log would let another caller join it.
    (served_id,) = {r["session"] for r in server_requests(served.log) if r["session"]}
    assert {c["mcp_session"] for c in calls if c["mcp_method"] != "initialize"} == {
        mcp.session_label(served_id)
    }
    assert served_id not in json.dumps(calls)
    await asyncio.to_thread(audit.flush)
    args = ("audit", str(audit_log), "--route", ROUTE, "--calls", "--task", task, "--json")
    done = await asyncio.to_thread(keyproxy, *args, env=clean_env(tmp_path))
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)["tasks"][task]
    assert [(c["target"], c["decision"]) for c in listed if c["method"] == "tools/call"] == [
        ("search_issues", "allow"),
        ("whoami", "deny"),
    ]
    assert {c["key_version"] for c in listed} == {served.key_version, None}
    assert {c["key_fingerprint"] for c in listed} == {served.key_fingerprint, None}


async def test_the_key_a_tool_echoes_never_reaches_the_caller(
    openbao: OpenBaoDevServer, agent: Agent, served: Served
) -> None:
    """The server's `whoami` puts the key it received in its result: the caller gets it
    redacted, as JSON and as SSE."""
    identity = openbao.agent_token(agent)
    CANARIES.add(identity)
    async with proxied(openbao, agent, served) as stack, session(stack, identity) as client:
        echoed = await client.call_tool("whoami", {})
        [content] = echoed.content
        assert isinstance(content, TextContent)
        assert content.text.startswith("called with key ")
        assert served.server.key not in content.text


@pytest.fixture(scope="module")
def other(openbao: OpenBaoDevServer) -> Agent:
    """A second caller of the route, granted the same tools."""
    return openbao.add_agent("mcp-other")


INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "1"},
    },
}
MCP_POST = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


async def test_a_session_is_bound_to_the_caller_that_opened_it(
    openbao: OpenBaoDevServer, agent: Agent, other: Agent, served: Served, audit_log: Path
) -> None:
    """The server's session id reaches its caller sealed, and any replica opens it for that
    caller, also with a task token exchanged for its identity. Another caller of the route
    presenting it (another workload, a sub-agent holding a token delegated from the caller's,
    or anyone with the server's own id or a forged one) gets the 404 of an unknown session,
    in its audit event, and the server never sees the request; the session's caller ends it."""
    cfg = mcp_config(openbao, agent, served.server.url.removesuffix("/mcp"))
    cfg["policies"].append({**cfg["policies"][0], "name": "other", "subjects": [other.entity_id]})
    mine, theirs = openbao.agent_token(agent), openbao.agent_token(other)
    CANARIES.update((mine, theirs))
    url = ENDPOINT.format
    async with (
        running_proxy(cfg) as stack,
        running_proxy(cfg) as replica,
        aiohttp.ClientSession() as http,
    ):

        async def post(base: str, token: str, message: Any, sid: str | None) -> Any:
            headers = {**bearer(token), **MCP_POST} | ({SESSION: sid} if sid else {})
            return await http.post(url(base), json=message, headers=headers)

        async with await post(stack.base, mine, INITIALIZE, None) as opened:
            assert opened.status == 200, await opened.text()
            given = opened.headers[SESSION]
            await opened.read()
        async with http.get(f"{replica.admin}/readyz") as ready:
            assert (await ready.json())["mcp_session_key"] == {"needed": True, "read": True}
        async with await post(replica.base, mine, _rpc(2, "tools/list"), given) as listed:
            assert listed.status == 200, await listed.text()
            assert "search_issues" in await listed.text()
        server_id = server_requests(served.log)[-1]["session"]
        assert server_id
        assert given.startswith("kp1.")
        assert given.endswith("." + server_id)
        assert given != server_id

        task = f"bound-{secrets.token_hex(4)}"
        exchanged = await task_token(stack, mine, task, ["search_issues"])
        async with await post(replica.base, exchanged, _call(3, "search_issues"), given) as same:
            assert same.status == 200, await same.text()  # the same caller
            await same.read()
        narrower = {"scope": {ROUTE: {"tools": ["search_issues"]}}}
        async with http.post(
            f"{stack.base}/token", json=narrower, headers=bearer(exchanged)
        ) as child:
            assert child.status == 200, await child.text()
            delegated = (await child.json())["access_token"]
        CANARIES.add(delegated)

        before = len(server_requests(served.log))
        rids = []
        attempts = [
            (delegated, "POST", given),  # a sub-agent is a caller of its own
            (theirs, "POST", given),
            (theirs, "GET", given),
            (theirs, "DELETE", given),
            (theirs, "POST", server_id),
            (mine, "POST", server_id),  # not sealed: no one's
            (mine, "POST", given[:-1] + ("x" if given[-1] != "x" else "y")),
        ]
        for token, method, sid in attempts:
            headers = {**bearer(token), **MCP_POST, SESSION: sid}
            body = json.dumps(_call(3, "search_issues")) if method == "POST" else None
            async with http.request(method, url(stack.base), data=body, headers=headers) as no:
                assert no.status == 404, (method, sid)
                assert (await no.json())["error"]["code"] == "mcp_session_unknown"
                rids.append(no.headers["X-Request-Id"])
        assert len(server_requests(served.log)) == before

        headers = {**bearer(mine), SESSION: given}
        async with http.delete(url(replica.base), headers=headers) as ended:
            assert ended.status == 200, await ended.text()
        assert server_requests(served.log)[-1] == {
            "method": "DELETE",
            "body": "",
            "session": server_id,
        }

    def refused() -> list[dict[str, Any]]:
        return [e for e in events(audit_log, "request") if e.get("request_id") in rids]

    logged = await eventually(refused, "no audit events", until=lambda found: len(found) == 7)
    # Never sent upstream: no key version, so no part of the key's blast radius.
    assert {(e["decision"], e["reason"], e["status"], e["key_version"]) for e in logged} == {
        ("allow", "mcp_session_unknown", 404, None)
    }
    assert {e["subject"] for e in logged} == {agent.entity_id, other.entity_id}


async def test_no_mcp_request_goes_upstream_while_the_session_key_cannot_be_read(
    openbao: OpenBaoDevServer, agent: Agent, served: Served
) -> None:
    """With the session key unreadable (here: kept where keyproxy's Vault policy reads
    nothing), every MCP request is a 503 with Retry-After, and the server sees none: it
    would open a session that could not be given to its caller."""
    cfg = mcp_config(openbao, agent, served.server.url.removesuffix("/mcp"))
    cfg["tokens"]["state_path"] = "keyproxy/unreadable"  # outside keyproxy-proxy's paths
    identity = openbao.agent_token(agent)
    CANARIES.add(identity)
    before = len(server_requests(served.log))
    async with running_proxy(cfg) as stack, aiohttp.ClientSession() as http:
        headers = {**bearer(identity), **MCP_POST}
        async with http.post(ENDPOINT.format(stack.base), json=INITIALIZE, headers=headers) as no:
            assert no.status == 503
            assert (await no.json())["error"]["code"] == "mcp_session_key_unavailable"
            assert int(no.headers["Retry-After"]) > 0
        async with http.get(f"{stack.admin}/readyz") as answer:
            detail = await answer.json()
            assert answer.status == 200  # the other routes serve: reported, not required
            assert detail["mcp_session_key"] == {"needed": True, "read": False}
    assert len(server_requests(served.log)) == before


async def _two_sessions(request: web.Request) -> web.Response:
    """An initialize answered naming two sessions, or an empty one."""
    answer = {"jsonrpc": "2.0", "id": 1, "result": {}}
    named = request.app[NAMED]
    return web.json_response(answer, headers=CIMultiDict((SESSION, n) for n in named))


NAMED = web.AppKey("named", list[str])


@pytest.mark.parametrize("named", [["a-1", "b-2"], [""]], ids=["two", "empty"])
async def test_an_answer_naming_two_sessions_or_an_empty_one_is_refused(
    openbao: OpenBaoDevServer, agent: Agent, named: list[str]
) -> None:
    """A server's answer with two Mcp-Session-Id headers, or an empty one, is a 502: which
    session the caller is in is not guessed at (invariant 12)."""
    app = web.Application()
    app[NAMED] = named
    app.router.add_post("/mcp", _two_sessions)
    async with _hostile_route(openbao, agent, app) as cfg:
        identity = openbao.agent_token(agent)
        CANARIES.add(identity)
        headers = {**bearer(identity), **MCP_POST}
        async with running_proxy(cfg) as stack, aiohttp.ClientSession() as http:
            url = ENDPOINT.format(stack.base)
            async with http.post(url, json=INITIALIZE, headers=headers) as answer:
                assert answer.status == 502
                assert (await answer.json())["error"]["code"] == "mcp_bad_answer"
                assert SESSION not in answer.headers


def _rpc(rid: int, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "method": method, "params": params or {}}


# A tools/list request, as the caller of a hostile server's route sends it.
LISTING = json.dumps(_rpc(3, "tools/list")).encode()


def _granted_search(cfg: dict[str, Any], openbao: OpenBaoDevServer, agent: Agent) -> dict[str, str]:
    """The agent granted search_issues alone on the route of `cfg`: its headers for a POST."""
    cfg["policies"][0]["allow"][ROUTE] = {"tools": ["search_issues"]}
    identity = openbao.agent_token(agent)
    CANARIES.add(identity)
    return {**bearer(identity), "Content-Type": "application/json"}


def _call(rid: int, name: str) -> dict[str, Any]:
    return _rpc(rid, "tools/call", {"name": name, "arguments": {"query": "x"}})


HOSTILE: list[tuple[str, bytes, int]] = [
    ("malformed JSON", b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call",', 400),
    (
        "batch hiding an ungranted call",
        json.dumps([_call(1, "search_issues"), _call(2, "whoami")]).encode(),
        200,
    ),
    ("name differing by case", json.dumps(_call(1, "Search_Issues")).encode(), 200),
    ("fullwidth name", json.dumps(_call(1, "\uff53earch_issues")).encode(), 200),
    ("zero-width name", json.dumps(_call(1, "search\u200b_issues")).encode(), 200),
    ("decomposed name", json.dumps(_call(1, "search_issue\u0301s")).encode(), 200),
    ("method alias", json.dumps(_rpc(1, "tools.call", {"name": "search_issues"})).encode(), 200),
    ("method case", json.dumps(_rpc(1, "Tools/Call", {"name": "search_issues"})).encode(), 200),
    (
        "name given twice",
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
        b'"params":{"name":"search_issues","name":"whoami"}}',
        400,
    ),
    (
        "a name a case-blind server reads instead",
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
        b'"params":{"name":"search_issues","Name":"whoami"}}',
        200,
    ),
    (
        "the name only by another case",
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"NAME":"whoami"}}',
        200,
    ),
    (
        "the name in another case, escaped",
        b'{"jsonrpc":"2.0","id":1,"method":"prompts/get",'
        b'"params":{"name":"summarize","n\\u0041me":"other"}}',
        200,
    ),
    ("huge message", json.dumps(_call(1, "search_issues" + "x" * MAX_BODY)).encode(), 413),
    (
        "an elicitation the route withholds, accepted by the client",
        b'{"jsonrpc":"2.0","id":0,"result":{"action":"accept","content":{"confirm":true}}}',
        400,
    ),
]


async def test_hostile_messages_are_refused_and_never_forwarded(
    openbao: OpenBaoDevServer, agent: Agent, served: Served
) -> None:
    """Malformed JSON, a batch hiding an ungranted call, names differing by case or Unicode
    form, method aliases, a member given twice and a huge message are each refused (with a
    JSON-RPC error where one can be read) and never reach the server."""
    identity = openbao.agent_token(agent)
    CANARIES.add(identity)
    async with proxied(openbao, agent, served) as stack:
        token = await task_token(stack, identity, "hostile", ["search_issues"])
        before = len(server_requests(served.log))
        headers = {
            **bearer(token),
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
            "MCP-Protocol-Version": "2025-03-26",  # the revision with batches
        }
        async with aiohttp.ClientSession() as http:
            for name, body, status in HOSTILE:
                async with http.post(
                    f"{stack.base}/r/{ROUTE}/mcp", data=body, headers=headers
                ) as answer:
                    assert answer.status == status, name
                    if status != 413:
                        value = await answer.json()
                        errors = value if isinstance(value, list) else [value]
                        assert all(e["jsonrpc"] == "2.0" and e["error"] for e in errors), name
            # The allowed tool's call, in bytes a server decoding by the caller's charset
            # reads as another tool's: only JSON in UTF-8 goes, as keyproxy read it.
            for kinds in UNREAD_AS_SENT:
                sent = CIMultiDict(headers)
                sent.popall("Content-Type")
                sent.extend(("Content-Type", kind) for kind in kinds)
                async with http.post(
                    f"{stack.base}/r/{ROUTE}/mcp", data=UTF7_CALL, headers=sent
                ) as answer:
                    assert answer.status == 400, kinds
                    error = (await answer.json())["error"]["code"]
                    # Two Content-Types are refused before the MCP step (malformed_request).
                    assert error == (-32600 if len(kinds) == 1 else "malformed_request"), kinds
            # A body said to be compressed: the server may decompress what keyproxy read as
            # JSON (a text that is also a brotli stream) or JSON keyproxy never read.
            plain = json.dumps(_call(1, "search_issues")).encode()
            for coding, body in [
                ("gzip", gzip.compress(json.dumps(_call(1, "whoami")).encode())),
                ("br", plain),
                ("identity, gzip", plain),
            ]:
                sent = CIMultiDict(headers)
                sent["Content-Encoding"] = coding
                async with http.post(
                    f"{stack.base}/r/{ROUTE}/mcp", data=body, headers=sent
                ) as answer:
                    assert answer.status == 400, coding
                    error = (await answer.json())["error"]
                    assert error["code"] in (-32600, -32700), coding
            # A protocol version or session sent twice: the server may read the other.
            allowed = json.dumps(
                {
                    "jsonrpc": "2.0",
                    "id": 1,
                    "method": "tools/call",
                    "params": {"name": "search_issues"},
                }
            )
            for name, values in TWICE:
                sent = CIMultiDict(headers)
                sent.popall(name, None)
                sent.extend((name, value) for value in values)
                async with http.post(
                    f"{stack.base}/r/{ROUTE}/mcp", data=allowed, headers=sent
                ) as answer:
                    assert answer.status == 400, (name, values)
                    error = (await answer.json())["error"]
                    assert (error["code"], error["message"]) == (
                        -32600,
                        f"{name} is sent more than once",
                    )
    assert len(server_requests(served.log)) == before


async def test_only_the_mcp_endpoint_is_reached(
    openbao: OpenBaoDevServer, agent: Agent, served: Served, audit_log: Path
) -> None:
    """Off the route's MCP endpoint (`/mcp`, the default), a GET, DELETE or POST to any path of the
    server's origin (another case, a trailing slash, an API beside it) is a 404 that says
    where MCP is served, and never reaches the server with the key. It is refused before any
    limit counts it or the key is fetched: its audit event is a denial with no key version."""
    identity = openbao.agent_token(agent)
    CANARIES.add(identity)
    rids = []
    async with proxied(openbao, agent, served) as stack, aiohttp.ClientSession() as http:
        before = len(server_requests(served.log))
        headers = {**bearer(identity), "Content-Type": "application/json"}
        ping = json.dumps(_rpc(1, "ping")).encode()
        for path in ("/admin/keys", "/mcp/", "/MCP", "/", "", "/%6d%63p/x"):
            for method in ("GET", "DELETE", "POST"):
                rids.append(rid := f"off-endpoint-{secrets.token_hex(8)}")
                async with http.request(
                    method,
                    f"{stack.base}/r/{ROUTE}{path}",
                    data=ping if method == "POST" else None,
                    headers={**headers, "X-Request-Id": rid},
                ) as answer:
                    assert answer.status == 404, (method, path)
                    error = (await answer.json())["error"]
                    assert error["code"] == "not_mcp_endpoint", (method, path)
                    assert "/mcp" in error["message"], (method, path)
        assert len(server_requests(served.log)) == before

    def refused() -> list[dict[str, Any]]:
        return [e for e in events(audit_log, "request") if e.get("request_id") in rids]

    logged = await eventually(refused, "no audit events", until=lambda found: len(found) == 18)
    assert {(e["decision"], e["reason"], e["key_version"]) for e in logged} == {
        ("deny", "not_mcp_endpoint", None)
    }


TWICE = [
    ("MCP-Protocol-Version", ["2025-03-26", "2025-06-18"]),
    ("MCP-Protocol-Version", ["2025-03-26", "2025-03-26"]),
    ("Mcp-Session-Id", ["session-1", "session-2"]),
]


# A call of the granted search_issues that a server decoding UTF-7 reads as delete_repo.
UTF7_CALL = (
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_issues",'
    b'"arguments":{"q":"+ACIAfQAsACI-name+ACIAOgAi-delete+AF8-repo+ACIALAAi-x+ACIAOgB7ACI-'
    b'y+ACIAOgAi-"}}}'
)
UNREAD_AS_SENT = [
    ["application/json; charset=utf-7"],
    ["application/json; charset=UTF-16"],
    ["application/json; charset=utf-8; charset=utf-7"],
    ["application/json; charset=utf-8", "application/json; charset=utf-7"],
    ["application/json; profile=x"],
    ["text/plain"],
    ["application/x-www-form-urlencoded"],
]


SAMPLING = {"jsonrpc": "2.0", "id": 7, "method": "sampling/createMessage", "params": {}}
ELICIT = {"jsonrpc": "2.0", "id": 8, "method": "elicitation/create", "params": {}}
PING = {"jsonrpc": "2.0", "id": 9, "method": "ping"}
CHANGED = {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}


def _sse(*messages: dict[str, Any]) -> bytes:
    return b"".join(
        b"event: message\r\ndata: " + json.dumps(m).encode() + b"\r\n\r\n" for m in messages
    )


async def _stream_server(request: web.Request) -> web.StreamResponse:
    """A server's GET stream: two server requests, a ping and a notification, in events
    split across writes; and a tools/list answer as SSE to a POST."""
    assert request.headers["Authorization"] == f"Bearer {STREAM_KEY}"
    assert request.headers["Mcp-Session-Id"] == "session-1"
    if request.method == "POST":
        body = await request.json()
        if "method" not in body:  # keyproxy answering a request it withheld
            request.app[REPLIES].append(body)
            return web.Response(status=202)
        tools = [
            {"name": n, "inputSchema": {"type": "object"}} for n in ("search_issues", "whoami")
        ]
        answer = {"jsonrpc": "2.0", "id": body["id"], "result": {"tools": tools}}
        data = _sse(answer)
    else:
        data = _sse(SAMPLING, ELICIT, PING, CHANGED)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for start in range(0, len(data), 7):  # every event cut across writes
        await response.write(data[start : start + 7])
    await response.write_eof()
    return response


STREAM_KEY = "sk-stream-" + secrets.token_urlsafe(16)
REPLIES = web.AppKey("replies", list[dict[str, Any]])


async def test_the_servers_get_stream_passes_only_allowed_server_requests(
    openbao: OpenBaoDevServer, agent: Agent
) -> None:
    """On a session's GET stream a sampling or elicitation request reaches the caller only
    where the route allows it (ping and notifications always do), and keyproxy answers the
    server each one it withheld; tools/list answers on an SSE stream are filtered however
    the events are cut."""
    app = web.Application()
    app[REPLIES] = []
    app.router.add_route("*", "/mcp", _stream_server)
    async with _hostile_route(openbao, agent, app, sampling=True) as cfg:
        identity = openbao.agent_token(agent)
        CANARIES.add(identity)
        async with running_proxy(cfg) as stack, aiohttp.ClientSession() as http:
            seen = {}
            for name in (ROUTE, "sampling"):
                headers = {**bearer(identity), SESSION: sealed(stack, agent, route=name)}
                async with http.get(f"{stack.base}/r/{name}/mcp", headers=headers) as answer:
                    assert answer.status == 200
                    seen[name] = await answer.read()
            assert seen[ROUTE] == _sse(PING, CHANGED)
            assert seen["sampling"] == _sse(SAMPLING, PING, CHANGED)
            deadline = time.monotonic() + 10
            while len(app[REPLIES]) < 3:  # 7 and 8 withheld on one route, 8 on the other
                assert time.monotonic() < deadline, f"replies: {app[REPLIES]}"
                await asyncio.sleep(0.05)  # polling interval of a bounded wait
            assert sorted((r["id"], r["error"]["code"]) for r in app[REPLIES]) == [
                (7, -32601),
                (8, -32601),
                (8, -32601),
            ]
            async with http.post(
                f"{stack.base}/r/sampling/mcp",
                data=LISTING,
                headers={**headers, "Content-Type": "application/json"},
            ) as answer:
                text = (await answer.read()).decode()
            assert '"search_issues"' in text
            assert "whoami" not in text


# Answers the MCP SDK's client reads as JSON or SSE (any 2xx but 202; the media type by
# prefix, in any case) though they are not a plain 200 of the exact type.
ODD_ANSWERS = [
    (201, "application/json"),
    (203, "Text/Event-Stream"),
    (200, "application/jsonl"),
    (200, "application/json, text/html"),
    (200, "text/event-stream-x; charset=utf-8"),
    (206, "application/json;charset=utf-8"),
]
# Content-Types the TypeScript SDK's client reads as an event stream or JSON (the media type
# anywhere in the header, event streams first) but the Python one another way, or not at all.
AMBIGUOUS = [
    "text/plain; x=text/event-stream",
    "text/html; profile=application/json",
    "application/json; profile=text/event-stream",
]
CASES = web.AppKey("cases", list[tuple[int, str]])


async def _odd_lister(request: web.Request) -> web.Response:
    """A tools/list answer listing a tool the route does not grant, in the next odd form."""
    assert request.headers["Authorization"] == f"Bearer {STREAM_KEY}"
    status, kind = request.app[CASES].pop(0)
    tools = [{"name": n, "inputSchema": {"type": "object"}} for n in ("search_issues", "whoami")]
    answer = {"jsonrpc": "2.0", "id": (await request.json())["id"], "result": {"tools": tools}}
    body = _sse(answer) if "event-stream" in kind.lower() else json.dumps(answer).encode()
    return web.Response(status=status, body=body, headers={"Content-Type": kind})


async def test_no_answer_the_sdk_reads_escapes_the_list_filter(
    openbao: OpenBaoDevServer, agent: Agent
) -> None:
    """A tools/list answer in any form the MCP SDK's client would read (another 2xx, the
    media type in another case or with a suffix) is filtered like a 200 of the exact type:
    a tool the route does not grant never reaches the caller. One whose Content-Type names
    JSON or an event stream only elsewhere than its media type (which the TypeScript SDK's
    client reads as such) is a 502."""
    app = web.Application()
    app[CASES] = [*ODD_ANSWERS, *((200, kind) for kind in AMBIGUOUS)]
    app.router.add_post("/mcp", _odd_lister)
    async with _hostile_route(openbao, agent, app) as cfg:
        headers = _granted_search(cfg, openbao, agent)
        async with running_proxy(cfg) as stack, aiohttp.ClientSession() as http:
            for status, kind in ODD_ANSWERS:
                async with http.post(
                    f"{stack.base}/r/{ROUTE}/mcp", data=LISTING, headers=headers
                ) as answer:
                    text = (await answer.read()).decode()
                assert answer.status == status, kind
                assert '"search_issues"' in text, kind
                assert "whoami" not in text, (status, kind)
            for kind in AMBIGUOUS:
                async with http.post(
                    f"{stack.base}/r/{ROUTE}/mcp", data=LISTING, headers=headers
                ) as answer:
                    text = (await answer.read()).decode()
                assert answer.status == 502, kind
                assert "whoami" not in text, kind


async def _replayer(request: web.Request) -> web.StreamResponse:
    """A GET stream resumed after the caller's Last-Event-ID, replaying the tools/list
    answer sent on the stream it resumes (listing a tool the route does not grant)."""
    assert request.headers["Authorization"] == f"Bearer {STREAM_KEY}"
    assert request.headers["Last-Event-ID"] == "priming-1"
    tools = [{"name": n, "inputSchema": {"type": "object"}} for n in ("search_issues", "whoami")]
    data = b"id: listed-1\r\n" + _sse({"jsonrpc": "2.0", "id": 3, "result": {"tools": tools}})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for start in range(0, len(data), 5):
        await response.write(data[start : start + 5])
    await response.write_eof()
    return response


async def test_a_list_answer_replayed_on_a_resumed_stream_is_filtered(
    openbao: OpenBaoDevServer, agent: Agent
) -> None:
    """A GET resuming a stream (Last-Event-ID) gets the tools/list answer replayed with no
    list request pending on it: it is filtered all the same, as the client reads it as the
    answer to its earlier request."""
    app = web.Application()
    app.router.add_get("/mcp", _replayer)
    async with _hostile_route(openbao, agent, app) as cfg:
        cfg["policies"][0]["allow"][ROUTE] = {"tools": ["search_issues"]}
        identity = openbao.agent_token(agent)
        CANARIES.add(identity)
        async with running_proxy(cfg) as stack, aiohttp.ClientSession() as http:
            headers = {
                **bearer(identity),
                SESSION: sealed(stack, agent),
                "Last-Event-ID": "priming-1",
            }
            async with http.get(ENDPOINT.format(stack.base), headers=headers) as answer:
                assert answer.status == 200
                text = (await answer.read()).decode()
        assert text.startswith("id: listed-1\r\n")
        assert '"search_issues"' in text
        assert "whoami" not in text


async def _json_asker(request: web.Request) -> web.Response:
    """A tools/call answered as JSON with a sampling request in its place (in 2025-03-26 in a
    batch with a notification: both forms an SDK client reads and acts on); a notification
    answered with a 200 and an empty JSON body (which no client reads)."""
    assert request.headers["Authorization"] == f"Bearer {STREAM_KEY}"
    if "id" not in await request.json():
        return web.Response(content_type="application/json")
    batch = request.headers.get("MCP-Protocol-Version") == "2025-03-26"
    return web.json_response([SAMPLING, CHANGED] if batch else SAMPLING)


async def test_a_server_request_in_a_json_answer_is_withheld_too(
    openbao: OpenBaoDevServer, agent: Agent, audit_log: Path
) -> None:
    """A server request the route does not allow, sent in a JSON answer rather than on a
    stream, never reaches the caller (a 502: a JSON answer holds only responses); where the
    route allows it, it passes. The answer to a POST of notifications only, which no client
    reads, passes unread. The log says why an answer was refused."""
    app = web.Application()
    app.router.add_post("/mcp", _json_asker)
    async with _hostile_route(openbao, agent, app, sampling=True) as cfg:
        identity = openbao.agent_token(agent)
        CANARIES.add(identity)
        call = json.dumps(_call(1, "search_issues")).encode()
        before = len(events(audit_log, "mcp_bad_answer"))
        async with running_proxy(cfg) as stack, aiohttp.ClientSession() as http:
            for name, version, status in [
                (ROUTE, "2025-06-18", 502),
                (ROUTE, "2025-03-26", 502),
                ("sampling", "2025-06-18", 200),
                ("sampling", "2025-03-26", 200),
            ]:
                headers = {
                    **bearer(identity),
                    "Content-Type": "application/json",
                    "MCP-Protocol-Version": version,
                }
                async with http.post(
                    f"{stack.base}/r/{name}/mcp", data=call, headers=headers
                ) as answer:
                    text = (await answer.read()).decode()
                assert answer.status == status, (name, version)
                assert ("sampling/createMessage" in text) == (status == 200), (name, version)
                initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
                async with http.post(
                    f"{stack.base}/r/{name}/mcp", data=json.dumps(initialized), headers=headers
                ) as answer:
                    assert (answer.status, await answer.read()) == (200, b""), (name, version)
        # The operator's log says why each answer was refused.
        whys = [e["why"] for e in events(audit_log, "mcp_bad_answer")[before:]]
        assert whys == ["a JSON answer holds a server request the route does not allow"] * 2


FLOOD = 300  # server requests on one stream, each withheld
HELD = web.AppKey("held", list[int])
RELEASE = web.AppKey("release", asyncio.Event)


async def _flooder(request: web.Request) -> web.StreamResponse:
    """A GET stream of FLOOD sampling requests; each answer keyproxy POSTs is held until
    the test releases them."""
    assert request.headers["Authorization"] == f"Bearer {STREAM_KEY}"
    if request.method == "POST":
        request.app[HELD].append((await request.json())["id"])
        await request.app[RELEASE].wait()
        return web.Response(status=202)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(_sse(*({**SAMPLING, "id": n} for n in range(FLOOD))))
    await response.write_eof()
    return response


async def test_a_flood_of_withheld_server_requests_holds_a_bounded_number_of_answers(
    openbao: OpenBaoDevServer, agent: Agent, audit_log: Path
) -> None:
    """A server streaming request after request the route withholds gets keyproxy's answers
    to at most mcproute.MAX_REPLIES at a time; past that one is dropped (logged once per
    stream), never queued without bound."""
    CANARIES.add(STREAM_KEY)
    await asyncio.to_thread(openbao.put_key, KEY_PATH + "-stream", STREAM_KEY)
    app = web.Application()
    app[HELD] = []
    app[RELEASE] = asyncio.Event()
    app.router.add_route("*", "/mcp", _flooder)
    runner, port = await serve(app)
    try:
        cfg = mcp_config(openbao, agent, f"http://127.0.0.1:{port}")
        cfg["routes"][ROUTE] = {**cfg["routes"][ROUTE], "secret": {"path": KEY_PATH + "-stream"}}
        identity = openbao.agent_token(agent)
        CANARIES.add(identity)
        before = len(events(audit_log, "mcp_reply_dropped"))
        async with running_proxy(cfg) as stack, aiohttp.ClientSession() as http:
            async with http.get(ENDPOINT.format(stack.base), headers=bearer(identity)) as answer:
                assert answer.status == 200
                assert await answer.read() == b""  # every event withheld
            # Every answer keyproxy sends was started while the stream was read.
            await eventually(
                lambda: len(app[HELD]) == mcproute.MAX_REPLIES,
                "the server never held exactly MAX_REPLIES answers",
            )
            assert len(events(audit_log, "mcp_reply_dropped")) == before + 1
            app[RELEASE].set()
        held: list[int] = app[HELD]
        assert sorted(held) == list(range(mcproute.MAX_REPLIES))
    finally:
        app[RELEASE].set()
        await runner.cleanup()


# SSE answers in a charset other than UTF-8: the SDK's client (httpx) decodes a stream by
# its charset, keyproxy's reader as UTF-8, so the two would read different events.
CHARSETS = [
    (["text/event-stream; charset=utf-16le"], 502),
    (["text/event-stream; charset=latin-1"], 502),
    (["text/event-stream; charset=utf-8; charset=utf-16le"], 502),
    (["text/event-stream", "text/event-stream; charset=utf-16le"], 502),
    (['text/event-stream; charset="UTF-8"'], 200),
    (["text/event-stream; charset=utf8"], 200),  # UTF-8's other name, to every decoder
    (["text/event-stream"], 200),
]


async def _charset_lister(request: web.Request) -> web.Response:
    """A tools/list answer listing a tool the route does not grant, as an SSE stream in the
    next charset (encoded in it)."""
    assert request.headers["Authorization"] == f"Bearer {STREAM_KEY}"
    kinds, _ = request.app[CHARSET_CASES].pop(0)
    tools = [{"name": n, "inputSchema": {"type": "object"}} for n in ("search_issues", "whoami")]
    answer = {"jsonrpc": "2.0", "id": (await request.json())["id"], "result": {"tools": tools}}
    body = _sse(answer)
    if "utf-16le" in kinds[-1]:
        # Ended by a blank line as keyproxy reads the bytes (and a stray character to httpx).
        body = body.decode().encode("utf-16le") + b"\n\n"
    return web.Response(body=body, headers=CIMultiDict(("Content-Type", k) for k in kinds))


CHARSET_CASES = web.AppKey("charset_cases", list[tuple[list[str], int]])


async def test_an_event_stream_in_another_charset_is_refused(
    openbao: OpenBaoDevServer, agent: Agent
) -> None:
    """An SSE answer declaring a charset other than UTF-8 (or two) is a 502, never passed on:
    the SDK's client decodes a stream by its charset, so UTF-16 bytes that keyproxy reads as
    no event at all would be a tools/list answer (or a server request) it never filtered."""
    app = web.Application()
    app[CHARSET_CASES] = list(CHARSETS)
    app.router.add_post("/mcp", _charset_lister)
    async with _hostile_route(openbao, agent, app) as cfg:
        headers = _granted_search(cfg, openbao, agent)
        async with running_proxy(cfg) as stack, httpx.AsyncClient() as http:
            for kinds, status in CHARSETS:
                async with http.stream(
                    "POST", ENDPOINT.format(stack.base), content=LISTING, headers=headers
                ) as answer:
                    # Read as the SDK's client reads a stream (httpx_sse, by the charset).
                    if answer.status_code == 200:
                        seen = [e.data async for e in EventSource(answer).aiter_sse()]
                    else:
                        seen = [(await answer.aread()).decode()]
                assert answer.status_code == status, kinds
                assert "whoami" not in "".join(seen), kinds
                assert ('"search_issues"' in "".join(seen)) == (status == 200), kinds


async def test_a_delegated_tokens_calls_name_its_chain(
    openbao: OpenBaoDevServer, agent: Agent, served: Served, audit_log: Path
) -> None:
    """A child delegated from an MCP task token gets at most the parent's tools (asking for
    another is refused), and each of its calls' audit events names the whole chain."""
    identity = openbao.agent_token(agent)
    CANARIES.add(identity)
    task = f"delegated-{secrets.token_hex(4)}"
    async with proxied(openbao, agent, served) as stack:
        parent = await task_token(stack, identity, task, ["search_issues"])
        async with aiohttp.ClientSession() as http:
            wider = {"scope": {ROUTE: {"tools": ["search_issues", "whoami"]}}}
            async with http.post(f"{stack.base}/token", json=wider, headers=bearer(parent)) as r:
                assert (r.status, (await r.json())["error"]["code"]) == (
                    403,
                    "exceeds_parent_scope",
                )
            async with http.post(
                f"{stack.base}/token",
                json={"scope": {ROUTE: {"tools": ["search_issues"]}}},
                headers=bearer(parent),
            ) as answer:
                assert answer.status == 200
                child = await answer.json()
        CANARIES.add(child["access_token"])
        async with session(stack, child["access_token"]) as client:
            tools = await client.list_tools()
            assert [t.name for t in tools.tools] == ["search_issues"]
    calls = await calls_of(audit_log, task, 2)
    assert {c["chain"] for c in calls} == {",".join(child["chain"])}
    assert {c["token_id"] for c in calls} == {child["token_id"]}


class FramedUpstream:
    """A raw MCP server that reads each request on a connection exactly as its head frames it
    (its Content-Length, none meaning no body) and records the request line, the fields and
    the body; a GET's answer is a stream holding a server request keyproxy withholds (and
    answers), any other request's an empty 202. A length that promises bytes never sent ends
    the connection unrecorded after 5 s; bytes sent beyond it are read as the next request."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str], bytes]] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *rest = head.decode("latin-1").removesuffix("\r\n\r\n").split("\r\n")
                fields = {}
                for field in rest:
                    name, _, value = field.partition(":")
                    fields[name.strip().lower()] = value.strip()
                async with asyncio.timeout(5):
                    body = await reader.readexactly(int(fields.get("content-length", "0")))
                self.seen.append((line, fields, body))
                if line.startswith("GET "):
                    data = _sse(SAMPLING)
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(data), data)
                    )
                else:
                    writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_the_upstream_is_told_the_length_of_exactly_the_body_it_gets(
    openbao: OpenBaoDevServer, agent: Agent
) -> None:
    """An MCP GET or DELETE sends no body, and keyproxy's answer to a server request it
    withheld a body of its own: whatever length the caller declared for its body goes with
    none of them, so the upstream never reads the caller's next bytes (or the next request
    on a pooled connection, carrying the key) as part of this one."""
    CANARIES.add(STREAM_KEY)
    await asyncio.to_thread(openbao.put_key, KEY_PATH + "-stream", STREAM_KEY)
    upstream = FramedUpstream()
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        cfg = mcp_config(openbao, agent, f"http://127.0.0.1:{port}")
        cfg["routes"][ROUTE]["secret"] = {"path": KEY_PATH + "-stream"}
        identity = openbao.agent_token(agent)
        CANARIES.add(identity)
        # What a caller would have the upstream read as a request of its own.
        smuggled = b"DELETE /admin HTTP/1.1\r\nHost: x\r\nUser-Agent: "
        url = ENDPOINT.format
        async with running_proxy(cfg) as stack, aiohttp.ClientSession() as http:
            headers = {**bearer(identity), SESSION: sealed(stack, agent)}
            for method in ("GET", "DELETE", "GET"):
                async with http.request(
                    method, url(stack.base), data=smuggled, headers=headers
                ) as answer:
                    assert answer.status in (200, 202), await answer.text()
                    await answer.read()
            await eventually(
                lambda: sum(line.startswith("POST ") for line, _, _ in upstream.seen) == 2,
                f"the withheld requests' answers never came: {upstream.seen}",
            )
        assert [line.split()[0] for line, _, _ in upstream.seen if "POST" not in line] == [
            "GET",
            "DELETE",
            "GET",
        ]
        for line, fields, body in upstream.seen:
            assert line.endswith(" /mcp HTTP/1.1"), line
            assert "transfer-encoding" not in fields, line
            assert int(fields.get("content-length", "0")) == len(body), line
            assert fields["authorization"] == f"Bearer {STREAM_KEY}"
            if line.startswith("POST "):
                assert json.loads(body)["error"]["code"] == -32601
            else:
                assert body == b"", line
    finally:
        server.close()
        await server.wait_closed()
