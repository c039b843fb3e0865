"""Configuration reload (keyproxy.server.reload) in process: a real OpenBao, a real upstream,
the real app on loopback listeners; and the change list of keyproxy.config.changes."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import time
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from structlog.testing import capture_logs

from keyproxy import config
from keyproxy.cli import main
from keyproxy.devserver import Agent, OpenBaoDevServer
from keyproxy.errors import NotFound, Unavailable
from keyproxy.server import listen as server
from keyproxy.server.app import METRICS, RELOADER, TASKS, build_admin_app, build_app
from keyproxy.server.reload import short, text_digest
from tests.helpers import cli
from tests.helpers.configs import CONFIG_SECTIONS
from tests.helpers.events import read_events
from tests.helpers.issuer import Issuer
from tests.helpers.logscan import CANARIES
from tests.helpers.polling import eventually
from tests.helpers.servers import Upstream, bearer, new_key, token_config
from tests.helpers.tokens import delegate, exchange

KEY_PATH = "keyproxy/keys/tokens-test"


# ----------------------------------------------------------------------------- the change list


def _parsed(cfg: dict[str, Any]) -> config.Config:
    return config.parse(json.dumps(cfg), {})


def _small() -> dict[str, Any]:
    cfg = copy.deepcopy(CONFIG_SECTIONS)
    route = {
        "upstream": "https://api.example.com",
        "secret": {"path": "keyproxy/keys/a"},
        "inject": [{"header": "Authorization", "format": "Bearer {key}"}],
    }
    cfg["routes"] = {"a": route, "b": dict(route, secret={"path": "keyproxy/keys/b"})}
    cfg["policies"] = [
        {
            "name": "p",
            "issuers": ["k8s"],
            "subjects": ["s"],
            "allow": {"a": {"methods": ["GET"], "paths": ["/**"]}},
        }
    ]
    return cfg


def test_diff_names_routes_policies_and_issuers_by_change() -> None:
    """Routes, policies and issuers added, removed and changed are named; others are not."""
    old = _small()
    new = copy.deepcopy(old)
    del new["routes"]["b"]
    new["routes"]["c"] = old["routes"]["b"]
    new["routes"]["a"]["upstream"] = "https://api2.example.com"
    new["policies"][0]["allow"]["a"]["methods"] = ["POST"]
    new["policies"].append(dict(old["policies"][0], name="q"))
    new["identity"]["issuers"][0]["audiences"] = ["other"]
    changes = config.diff(_parsed(old), _parsed(new))
    assert changes.routes == config.Delta(added=("c",), removed=("b",), changed=("a",))
    assert changes.policies == config.Delta(added=("q",), changed=("p",))
    assert changes.issuers == config.Delta(changed=("k8s",))
    assert changes.needs_restart == ()
    assert "+ route c" in changes.lines()
    assert "- route b" in changes.lines()


def test_diff_of_equal_files_is_empty_and_listeners_need_a_restart() -> None:
    """An identical configuration changes nothing; a new listen port is reported as needing
    a restart and keeps its running value."""
    old = _small()
    assert not config.diff(_parsed(old), _parsed(copy.deepcopy(old)))
    new = copy.deepcopy(old)
    new["server"] = {"port": 9999, "admin": {"port": 9998}}
    changes = config.diff(_parsed(old), _parsed(new))
    assert changes.needs_restart == ("server.port", "server.admin")
    kept = config.keep_running(_parsed(old), _parsed(new))
    assert kept.server.port == _parsed(old).server.port
    assert kept.server.admin == _parsed(old).server.admin


def test_the_state_store_needs_a_restart_and_keeps_its_running_settings() -> None:
    """A new `state:` section is reported as needing a restart (the store is made once, at
    start), and what a reload serves keeps the running store's settings."""
    old = _small()
    old["state"] = {"url": "redis://127.0.0.1:6379/0"}
    new = copy.deepcopy(old)
    new["state"] = {"url": "redis://127.0.0.1:6380/0"}
    assert config.diff(_parsed(old), _parsed(new)).needs_restart == ("state",)
    kept = config.keep_running(_parsed(old), _parsed(new))
    assert kept.state == _parsed(old).state


def test_check_diff_prints_the_change_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`keyproxy check --diff OLD NEW` prints the reload's change list, one change a line."""
    old, new = _small(), _small()
    del new["routes"]["b"]
    new["policies"][0]["allow"]["a"]["methods"] = ["POST"]
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    (tmp_path / "new.yaml").write_text(yaml.safe_dump(new))
    assert main(["check", "--diff", str(tmp_path / "old.yaml"), str(tmp_path / "new.yaml")]) == 0
    assert capsys.readouterr().out.splitlines() == ["- route b", "~ policy p"]


def test_check_diff_reads_the_old_file_from_a_pipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`keyproxy check --diff <(git show HEAD~1:keyproxy.yaml) keyproxy.yaml`: a command
    reading the file once reads a pipe (only a reload refuses anything but a regular file)."""
    old, new = _small(), _small()
    del new["routes"]["b"]
    (tmp_path / "new.yaml").write_text(yaml.safe_dump(new))
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, yaml.safe_dump(old).encode())  # far less than a pipe holds
        os.close(write_end)
        assert main(["check", "--diff", f"/dev/fd/{read_end}", str(tmp_path / "new.yaml")]) == 0
    finally:
        os.close(read_end)
    assert capsys.readouterr().out.splitlines() == ["- route b"]


# ----------------------------------------------------------------------------- a served reload


@dataclass
class Served:
    base: str
    admin: str
    app: web.Application
    path: Path


@pytest.fixture
def route_key(openbao: OpenBaoDevServer) -> None:
    """The key of token_config's routes, for every test here."""
    openbao.put_key(KEY_PATH, new_key())


@pytest.fixture
async def served(
    openbao: OpenBaoDevServer, agent: Agent, upstream: Upstream, tmp_path: Path, route_key: None
) -> AsyncIterator[Served]:
    path = tmp_path / "keyproxy.yaml"
    path.write_text(yaml.safe_dump(token_config(openbao, agent, upstream.url)))
    app = build_app(config.load(path), source=path)
    limits = server.Limits.of(config.load(path).server)
    runner, port = await server.start(app, "127.0.0.1", 0, limits, metrics=lambda: app.get(METRICS))
    try:
        admin, admin_port = await server.start(build_admin_app(app), "127.0.0.1", 0, limits)
        try:
            yield Served(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", app, path)
        finally:
            await admin.cleanup()
    finally:
        await runner.cleanup()


async def _reload(http: aiohttp.ClientSession, served: Served) -> dict[str, Any]:
    async with http.post(f"{served.admin}/reload") as response:
        assert response.status == 200
        answer: dict[str, Any] = await response.json()
        return answer


async def _metric(http: aiohttp.ClientSession, served: Served, line: str) -> bool:
    async with http.get(f"{served.admin}/metrics") as response:
        return line in (await response.text()).splitlines()


async def test_broken_files_leave_the_running_configuration_serving(
    served: Served, openbao: OpenBaoDevServer, agent: Agent, upstream: Upstream
) -> None:
    """A file with bad YAML, a policy naming an unknown route, or a key given twice is refused
    with its YAML path logged and counted; the running configuration keeps serving."""
    good = served.path.read_text()
    token = openbao.agent_token(agent)
    unknown = token_config(openbao, agent, upstream.url)
    unknown["policies"][0]["allow"]["nowhere"] = {"methods": ["GET"]}
    texts = {
        "bad YAML": "routes: [unclosed\n",
        "unknown route in a policy": yaml.safe_dump(unknown),
        "duplicate key": good.replace("routes:\n", "routes:\n  r: {}\n", 1),
    }
    async with aiohttp.ClientSession() as http:
        running = served.app[RELOADER].current.digest
        for name, text in texts.items():
            served.path.write_text(text)
            with capture_logs() as logs:
                answer = await _reload(http, served)
            assert answer["result"] == "error", name
            failed = [e for e in logs if e["event"] == "config.reload_failed"]
            assert len(failed) == 1, name
            assert failed[0]["file"] == str(served.path)
            if name == "unknown route in a policy":
                assert failed[0]["yaml_path"].startswith("policies[0] (agent).allow")
            if name == "duplicate key":
                assert failed[0]["yaml_path"] == "routes.r"
                assert failed[0]["error"].startswith("duplicate key")
            assert served.app[RELOADER].current.digest == running
            async with http.get(f"{served.base}/r/r/echo", headers=bearer(token)) as response:
                assert response.status == 200, name
        assert await _metric(http, served, 'keyproxy_config_reload_total{result="error"} 3.0')
        served.path.write_text(good)
        assert (await _reload(http, served))["result"] == "unchanged"
        assert await _metric(http, served, 'keyproxy_config_reload_total{result="unchanged"} 1.0')


async def test_a_removed_grant_denies_a_task_token_on_its_next_request(
    served: Served, openbao: OpenBaoDevServer, agent: Agent, upstream: Upstream
) -> None:
    """A task token allowed a route is refused on its next request once a reload removed the
    grant it relied on; the reload's event names the changed policy."""
    identity = openbao.agent_token(agent)
    async with aiohttp.ClientSession() as http:
        scope = {"other": {"methods": ["GET"], "paths": ["/echo"]}}
        code, answer = await exchange(http, served.base, identity, scope=scope, task="t")
        assert code == 200, answer
        task = answer["access_token"]
        async with http.get(f"{served.base}/r/other/echo", headers=bearer(task)) as response:
            assert response.status == 200
        narrowed = token_config(openbao, agent, upstream.url)
        del narrowed["policies"][0]["allow"]["other"]
        served.path.write_text(yaml.safe_dump(narrowed))
        with capture_logs() as logs:
            answer = await _reload(http, served)
        assert answer["result"] == "ok"
        assert answer["changes"]["policies"]["changed"] == ["agent"]
        (event,) = [e for e in logs if e["event"] == "config.reloaded"]
        assert event["trigger"] == "admin"
        assert event["hash"] == answer["hash"]
        async with http.get(f"{served.base}/r/other/echo", headers=bearer(task)) as response:
            assert response.status == 403


async def test_a_new_route_is_ready_when_it_appears_and_a_removed_one_forgotten(
    served: Served, openbao: OpenBaoDevServer, agent: Agent, upstream: Upstream
) -> None:
    """A route added by a reload has its key loaded before it serves; a removed one answers
    404 and its key leaves the cache once no request runs on the old configuration."""
    token = openbao.agent_token(agent)
    key = new_key()
    openbao.put_key("keyproxy/keys/reload-added", key)
    cfg = token_config(openbao, agent, upstream.url)
    cfg["routes"]["added"] = dict(cfg["routes"]["r"], secret={"path": "keyproxy/keys/reload-added"})
    cfg["policies"][0]["allow"]["added"] = {"methods": ["GET"], "paths": ["/echo"]}
    del cfg["routes"]["other"]
    del cfg["policies"][0]["allow"]["other"]
    served.path.write_text(yaml.safe_dump(cfg))
    async with aiohttp.ClientSession() as http:
        answer = await _reload(http, served)
        assert answer["changes"]["routes"] == {
            "added": ["added"],
            "removed": ["other"],
            "changed": [],
        }
        async with http.get(f"{served.base}/r/added/echo", headers=bearer(token)) as response:
            assert response.status == 200
        assert upstream.requests[-1].headers["Authorization"] == f"Bearer {key}"
        async with http.get(f"{served.base}/r/other/echo", headers=bearer(token)) as response:
            assert response.status == 404
        async with http.get(f"{served.admin}/metrics") as response:
            text = await response.text()
        assert f'keyproxy_config_loaded_timestamp_seconds{{hash="{answer["hash"]}"}} ' in text


async def test_a_reload_adding_an_mcp_route_reads_the_session_key_first(
    served: Served, openbao: OpenBaoDevServer, agent: Agent, upstream: Upstream
) -> None:
    """The first MCP route a reload adds finds the key that binds its sessions read before
    it serves (no 503 while it loads in the background); moving tokens.state_path reads the
    key of the new place, so a session sealed before opens no more."""
    seal = served.app[TASKS].seal
    with pytest.raises(Unavailable):  # no MCP route: no key read
        seal.seal("session-1", b"caller")
    cfg = token_config(openbao, agent, upstream.url)
    cfg["routes"]["tools"] = {**cfg["routes"]["r"], "kind": "mcp"}
    served.path.write_text(yaml.safe_dump(cfg))
    async with aiohttp.ClientSession() as http:
        assert (await _reload(http, served))["result"] == "ok"
        given = seal.seal("session-1", b"caller")
        assert seal.open(given, b"caller") == "session-1"
        cfg["tokens"]["state_path"] = f"keyproxy/state/tokens/moved-{os.urandom(4).hex()}"
        served.path.write_text(yaml.safe_dump(cfg))
        assert (await _reload(http, served))["result"] == "ok"
    with pytest.raises(NotFound):
        seal.open(given, b"caller")


async def test_a_removed_route_drains_before_its_key_is_forgotten(
    served: Served, openbao: OpenBaoDevServer, agent: Agent, upstream: Upstream
) -> None:
    """A stream open on a route that a reload removes runs to its end on the old
    configuration; only then is the route's key forgotten and the old generation retired,
    while new requests to it already get 404."""
    token = openbao.agent_token(agent)
    openbao.put_key("keyproxy/keys/reload-gone", new_key())
    cfg = token_config(openbao, agent, upstream.url)
    cfg["routes"]["gone"] = dict(cfg["routes"]["r"], secret={"path": "keyproxy/keys/reload-gone"})
    cfg["policies"][0]["allow"]["gone"] = {"methods": ["GET"], "paths": ["/trickle/stream"]}
    served.path.write_text(yaml.safe_dump(cfg))
    async with aiohttp.ClientSession() as http:
        assert (await _reload(http, served))["result"] == "ok"
        url = f"{served.base}/r/gone/trickle/stream"
        with capture_logs() as logs:
            async with http.get(url, headers=bearer(token)) as stream:
                assert stream.status == 200
                first = await stream.content.readline()
                served.path.write_text(yaml.safe_dump(token_config(openbao, agent, upstream.url)))
                answer = await _reload(http, served)
                assert answer["changes"]["routes"]["removed"] == ["gone"]
                async with http.get(url, headers=bearer(token)) as response:
                    assert response.status == 404
                assert not [e for e in logs if e["event"] == "key_cache.key_forgotten"]
                rest = await stream.read()
            assert (first + rest).count(b"data: part") == 5
            (reloaded,) = [e for e in logs if e["event"] == "config.reloaded"]
            old = {"event": "config.retired", "hash": reloaded["previous"]}
            await eventually(
                lambda: [e for e in logs if old.items() <= e.items()],
                "the old configuration was not retired",
                within=DEADLINE,
            )
        (forgotten,) = [e for e in logs if e["event"] == "key_cache.key_forgotten"]
        assert forgotten["secret"].endswith("keyproxy/keys/reload-gone")


async def test_a_changed_issuer_has_its_keys_fetched_first_and_old_verdicts_dropped(
    served: Served, openbao: OpenBaoDevServer, agent: Agent, upstream: Upstream
) -> None:
    """A reload that changes an issuer fetches its keys before the swap, and a token verified
    (and remembered) under the old settings is judged again under the new ones."""
    token = openbao.agent_token(agent)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{served.base}/r/r/echo", headers=bearer(token)) as response:
            assert response.status == 200  # verified, and remembered
        cfg = token_config(openbao, agent, upstream.url)
        cfg["identity"]["issuers"][0]["audiences"] = ["someone-else"]
        served.path.write_text(yaml.safe_dump(cfg))
        with capture_logs() as logs:
            answer = await _reload(http, served)
        assert answer["changes"]["issuers"]["changed"] == ["openbao"]
        events = [e["event"] for e in logs]
        assert events.index("jwks_fetched") < events.index("config.reloaded")
        async with http.get(f"{served.base}/r/r/echo", headers=bearer(token)) as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "bad_audience"


async def test_keyproxy_reload_posts_the_admin_listener(
    served: Served,
    openbao: OpenBaoDevServer,
    agent: Agent,
    upstream: Upstream,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`keyproxy reload --admin URL` asks the running server to reload and prints the result."""
    cfg = token_config(openbao, agent, upstream.url)
    cfg["tokens"]["max_ttl"] = "5m"
    served.path.write_text(yaml.safe_dump(cfg))
    code = await asyncio.to_thread(main, ["reload", "--admin", served.admin])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("ok: ")
    assert "~ tokens" in out


# ----------------------------------------------------------------------------- under load

LIVE_RELOADS = 20
TRIGGERS = ("configmap", "sighup", "file")  # in turn: how the i-th new file arrives
CHANGES = ("add", "remove", "narrow", "upstream")  # in turn: what the i-th file changes
DEADLINE = 30.0


def _live_config(
    bao: OpenBaoDevServer, agent: Agent, upstream: str, step: int, upstreams: tuple[str, str]
) -> dict[str, Any]:
    """The file after `step` reloads (0: the first): routes r and other always allow the
    clients' requests; extra routes come and go, r's grant narrows and widens, other's
    upstream moves between the two upstreams."""
    route = {
        "upstream": upstream,
        "secret": {"path": KEY_PATH},
        "inject": [{"header": "Authorization", "format": "Bearer {key}"}],
        "egress": {"allow_cidrs": ["127.0.0.0/8"]},
        "allow_http": True,
    }
    applied = [CHANGES[i % len(CHANGES)] for i in range(step)]
    narrowed = applied.count("narrow") % 2 == 1
    moved = applied.count("upstream") % 2 == 1
    routes = {"r": route, "other": dict(route, upstream=upstreams[moved])}
    allow = {
        "r": {
            "methods": ["GET"],
            "paths": ["/echo", "/trickle/**", *([] if narrowed else ["/v1/**"])],
        },
        "other": {"methods": ["GET"], "paths": ["/echo"]},
    }
    # "add" at step i adds extra{i}; the "remove" after it takes it away again.
    for i, change in enumerate(applied):
        if change == "add" and (i + 1 >= step or applied[i + 1] != "remove"):
            routes[f"extra{i}"] = route
            allow[f"extra{i}"] = {"methods": ["GET"], "paths": ["/echo"]}
    return {
        "vault": bao.vault_yaml(refresh_interval="1s", max_staleness="60s"),
        "identity": {"issuers": [bao.issuer_yaml("openbao")]},
        "routes": routes,
        "policies": [
            {"name": "agent", "issuers": ["openbao"], "subjects": [agent.entity_id], "allow": allow}
        ],
    }


class ConfigMapDir:
    """A directory laid out as Kubernetes mounts a ConfigMap: keyproxy.yaml -> ..data/
    keyproxy.yaml, ..data -> ..<version>; and the three ways a new file arrives in it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "keyproxy.yaml"
        self.versions = 0
        root.mkdir()

    def swap(self, text: str) -> None:
        """Kubernetes' update: a new version directory, ..data renamed over, the file a link."""
        self.versions += 1
        version = self.root / f"..v{self.versions}"
        version.mkdir()
        (version / "keyproxy.yaml").write_text(text)
        (self.root / "..data_tmp").symlink_to(version.name)
        (self.root / "..data_tmp").rename(self.root / "..data")
        (self.root / "link_tmp").symlink_to("..data/keyproxy.yaml")
        (self.root / "link_tmp").rename(self.path)

    def replace(self, text: str) -> None:
        """An editor's save: a new file renamed over the watched name."""
        (self.root / ".keyproxy.yaml.tmp").write_text(text)
        (self.root / ".keyproxy.yaml.tmp").rename(self.path)

    def write_through(self, text: str) -> None:
        """Bytes written in place, behind the link: only a SIGHUP says when to read them."""
        self.path.resolve().write_text(text)


async def test_twenty_reloads_under_steady_traffic_and_open_streams(
    openbao: OpenBaoDevServer,
    agent: Agent,
    upstream: Upstream,
    tmp_path: Path,
    log_dir: Path,
    route_key: None,
) -> None:
    """`keyproxy serve` reloads 20 times (routes added and removed, a policy narrowed, an
    upstream moved) by ConfigMap swap, SIGHUP (`keyproxy reload --pid-file`) and file
    replacement while clients send a
    steady stream of requests and hold SSE streams open: none fails, every stream completes,
    and every request's audit event names a configuration hash that was loaded."""
    import os  # noqa: PLC0415  # only this test signals a process
    import signal  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import time  # noqa: PLC0415

    from tests.helpers.servers import free_port, running_upstream  # noqa: PLC0415

    token = openbao.agent_token(agent)
    CANARIES.add(token)
    async with running_upstream() as second:
        pair = (upstream.url, second.url)
        cm = ConfigMapDir(tmp_path / "configmap")
        cm.swap(yaml.safe_dump(_live_config(openbao, agent, upstream.url, 0, pair)))
        port = free_port()
        out = log_dir / "reload-live.out"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        argv = [str(Path(sys.executable).parent / "keyproxy"), "serve", "-c", str(cm.path)]
        pid_file = tmp_path / "keyproxy.pid"
        argv += ["--port", str(port), "--admin-port", "0", "--pid-file", str(pid_file)]
        with out.open("wb") as stdout:
            proc = subprocess.Popen(  # noqa: ASYNC220  # returns at once; the test polls it
                argv, stdout=stdout, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        base = f"http://127.0.0.1:{port}"
        failures: list[str] = []
        counts = {"requests": 0, "streams": 0}
        done = asyncio.Event()
        try:
            async with aiohttp.ClientSession() as http:
                await cli.ready(http, base, proc, within=DEADLINE)

                async def steady(route: str) -> None:
                    while not done.is_set():
                        url = f"{base}/r/{route}/echo"
                        async with http.get(url, headers=bearer(token)) as response:
                            await response.read()
                            counts["requests"] += 1
                            if response.status != 200:
                                failures.append(f"{route}: {response.status}")

                async def streaming() -> None:
                    while not done.is_set():
                        url = f"{base}/r/r/trickle/stream"
                        async with http.get(url, headers=bearer(token)) as response:
                            body = await response.read()
                            counts["streams"] += 1
                            if response.status != 200 or body.count(b"data: part") != 5:
                                failures.append(f"stream: {response.status} {body[:60]!r}")

                clients = [
                    asyncio.create_task(steady("r")),
                    asyncio.create_task(steady("other")),
                    asyncio.create_task(streaming()),
                    asyncio.create_task(streaming()),
                ]
                try:
                    for step in range(1, LIVE_RELOADS + 1):
                        text = yaml.safe_dump(
                            _live_config(openbao, agent, upstream.url, step, pair)
                        )
                        trigger = TRIGGERS[(step - 1) % len(TRIGGERS)]
                        if trigger == "configmap":
                            cm.swap(text)
                        elif trigger == "file":
                            cm.replace(text)
                        else:
                            cm.write_through(text)
                            reload = ["reload", "--pid-file", str(pid_file)]
                            assert await asyncio.to_thread(main, reload) == 0
                        deadline = time.monotonic() + DEADLINE
                        while (
                            len(
                                [e for e in read_events(out) if e.get("event") == "config.reloaded"]
                            )
                            < step
                        ):
                            assert proc.poll() is None, "keyproxy serve exited"
                            assert time.monotonic() < deadline, f"reload {step} not seen"
                            await asyncio.sleep(0.05)  # polling the log of a bounded wait
                        reloaded = [e for e in read_events(out) if e["event"] == "config.reloaded"]
                        expected = "sighup" if trigger == "sighup" else "file"
                        assert reloaded[-1]["trigger"] == expected, step
                    # Streams opened under the last configurations run to their end too.
                    await asyncio.sleep(2 * 0.3 * 5)  # pacing: one more stream per client
                finally:
                    done.set()
                    await asyncio.wait_for(asyncio.gather(*clients), DEADLINE)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, DEADLINE) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=DEADLINE)
    assert failures == []
    assert counts["streams"] >= 4
    events = read_events(out)
    (started,) = [e for e in events if e["event"] == "started"]
    reloads = [e for e in events if e["event"] == "config.reloaded"]
    assert len(reloads) == LIVE_RELOADS
    loaded = {started["config"]} | {e["hash"] for e in reloads}
    requests = [e for e in events if e["event"] == "request"]
    assert len(requests) == counts["requests"] + counts["streams"]
    assert {e["config"] for e in requests} <= loaded
    assert len({e["config"] for e in requests}) > 1
    assert not [e for e in events if e["event"] == "config.reload_failed"]


async def test_a_reload_adding_limits_to_processes_without_a_shared_store_is_refused(
    openbao: OpenBaoDevServer, agent: Agent, upstream: Upstream, tmp_path: Path, route_key: None
) -> None:
    """With several processes on the port and no state.url, a reload that adds a rate limit
    is refused (each process would count alone, multiplying the limit), as `serve
    --workers` refuses it at start; the running configuration keeps serving."""
    cfg = token_config(openbao, agent, upstream.url)
    path = tmp_path / "keyproxy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    app = build_app(config.load(path), processes=2, source=path)
    runner, port = await server.start(
        app, "127.0.0.1", 0, server.Limits.of(config.load(path).server)
    )
    try:
        running = app[RELOADER].current.digest
        limited = copy.deepcopy(cfg)
        limited["routes"]["r"]["limits"] = {
            "rate": [{"per": "identity", "requests": 3, "window": "60s", "burst": 3}]
        }
        path.write_text(yaml.safe_dump(limited))
        with capture_logs() as logs:
            outcome = await app[RELOADER].reload("test")
        assert outcome.result == "error"
        [failed] = [e for e in logs if e["event"] == "config.reload_failed"]
        assert "shared state store" in failed["error"]
        assert app[RELOADER].current.digest == running
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                f"http://127.0.0.1:{port}/r/r/echo", headers=bearer(openbao.agent_token(agent))
            ) as response,
        ):
            assert response.status == 200
    finally:
        await runner.cleanup()


# ----------------------------------------------------------------------------- refused whole


async def test_an_unreadable_ca_file_refuses_the_reload_before_anything_changes(
    served: Served, openbao: OpenBaoDevServer, agent: Agent, upstream: Upstream, tmp_path: Path
) -> None:
    """A route whose tls.ca_file is missing or not PEM refuses the reload with that YAML path,
    and nothing of the file is half-applied: the issuer it also changed still verifies as
    before."""
    token = openbao.agent_token(agent)
    not_pem = tmp_path / "not-a-ca.pem"
    not_pem.write_text("not a certificate\n")
    async with aiohttp.ClientSession() as http:
        running = served.app[RELOADER].current.digest
        for ca_file in (tmp_path / "missing.pem", not_pem):
            cfg = token_config(openbao, agent, upstream.url)
            cfg["identity"]["issuers"][0]["audiences"] = ["someone-else"]
            cfg["routes"]["other"] = dict(cfg["routes"]["other"], tls={"ca_file": str(ca_file)})
            served.path.write_text(yaml.safe_dump(cfg))
            with capture_logs() as logs:
                answer = await _reload(http, served)
            assert answer["result"] == "error", ca_file
            async with http.get(f"{served.base}/r/r/echo", headers=bearer(token)) as response:
                assert response.status == 200, ca_file
            assert served.app[RELOADER].current.digest == running
            assert answer["error"]["path"] == "routes.other.tls.ca_file"
            assert str(ca_file) in answer["error"]["message"]
            assert not [e for e in logs if e["event"] == "config.reload_crashed"]


def _unblock_readers(fifo: Path) -> None:
    """Open `fifo` for writing and close it, so a reader stuck opening it sees its end."""
    with contextlib.suppress(OSError):  # no reader waiting (ENXIO): nothing to unblock
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


async def test_a_fifo_in_place_of_the_file_is_refused_not_waited_for(
    served: Served, tmp_path: Path
) -> None:
    """A FIFO (or any file that is not a regular one) at the configuration's path is refused
    at once, saying so; the reload does not wait for a writer that never comes."""
    served.path.unlink()
    os.mkfifo(served.path)
    try:
        async with aiohttp.ClientSession() as http:
            answer = await asyncio.wait_for(_reload(http, served), DEADLINE)
    finally:
        _unblock_readers(served.path)
    assert answer["result"] == "error"
    assert "not a regular file" in answer["error"]["message"]


async def test_a_file_written_in_two_parts_is_read_once_whole(
    openbao: OpenBaoDevServer, agent: Agent, upstream: Upstream, tmp_path: Path, route_key: None
) -> None:
    """A watched file rewritten in place by a writer that pauses part-way is reloaded once it
    is whole: the valid prefix, whose policy lacks the source_cidrs written last, never
    serves."""
    cfg = token_config(openbao, agent, upstream.url)
    prefix = yaml.safe_dump(cfg, sort_keys=False)  # the policy, then its restriction, last
    restriction = "  source_cidrs:\n  - 10.0.0.0/8\n"
    path = tmp_path / "keyproxy.yaml"
    path.write_text(prefix + restriction)
    cfg["tokens"]["default_ttl"] = "3m"
    edited = yaml.safe_dump(cfg, sort_keys=False)
    logs: list[MutableMapping[str, Any]] = []
    app = build_app(config.load(path), source=path, watch=True)
    runner, _ = await server.start(app, "127.0.0.1", 0, server.Limits.of(config.load(path).server))

    def save_slowly() -> None:
        with path.open("w") as file:  # truncated, then written in two parts
            file.write(edited)
            file.flush()
            time.sleep(0.3)  # the writer pausing part-way (longer than the watch's quiet time)
            file.write(restriction)

    def reloaded(text: str) -> list[str]:
        digest = short(text_digest(text.encode()))
        return [e["hash"] for e in logs if e["event"] == "config.reloaded" and e["hash"] == digest]

    try:
        with capture_logs() as captured:
            logs = captured
            cfg["tokens"]["default_ttl"] = "4m"  # first a whole file: the watch is running
            first = yaml.safe_dump(cfg, sort_keys=False) + restriction
            (tmp_path / "next.yaml").write_text(first)
            (tmp_path / "next.yaml").rename(path)
            await eventually(lambda: reloaded(first), "the watch never reloaded", within=DEADLINE)
            await asyncio.to_thread(save_slowly)
            await eventually(
                lambda: reloaded(edited + restriction), "not reloaded whole", within=DEADLINE
            )
        assert not reloaded(edited)
    finally:
        await runner.cleanup()


async def test_a_removed_issuer_ends_the_task_tokens_of_its_identities(
    served: Served, openbao: OpenBaoDevServer, agent: Agent, upstream: Upstream, tmp_path: Path
) -> None:
    """A task token issued to an identity of an issuer that a reload removes is refused on its
    next request (and for a delegation), even where a policy without `issuers` still matches
    its subject: the trust it was issued on is gone."""
    identity = openbao.agent_token(agent)
    cfg = token_config(openbao, agent, upstream.url)
    del cfg["policies"][0]["issuers"]  # any issuer's identity with this subject
    served.path.write_text(yaml.safe_dump(cfg))
    async with aiohttp.ClientSession() as http:
        assert (await _reload(http, served))["result"] == "ok"
        scope = {"r": {"methods": ["GET"], "paths": ["/echo"]}}
        code, answer = await exchange(http, served.base, identity, scope=scope, task="t")
        assert code == 200, answer
        task = answer["access_token"]
        async with http.get(f"{served.base}/r/r/echo", headers=bearer(task)) as response:
            assert response.status == 200
        keys = tmp_path / "other-keys.json"
        keys.write_text('{"keys": []}')
        cfg["identity"]["issuers"] = [
            {
                "name": "other",
                "issuer": "https://other.example.com",
                "jwks_file": str(keys),
                "audiences": ["keyproxy"],
                "algorithms": ["ES256"],
            }
        ]
        served.path.write_text(yaml.safe_dump(cfg))
        answer = await _reload(http, served)
        assert answer["changes"]["issuers"] == {
            "added": ["other"],
            "removed": ["openbao"],
            "changed": [],
        }
        async with http.get(f"{served.base}/r/r/echo", headers=bearer(task)) as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "issuer_removed"
        async with http.post(  # a delegation from it
            f"{served.base}/token", json={"scope": scope, "task": "sub"}, headers=bearer(task)
        ) as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "issuer_removed"


async def test_a_removed_issuer_ends_the_tokens_delegated_to_its_sub_agents(
    served: Served, openbao: OpenBaoDevServer, agent: Agent, upstream: Upstream, tmp_path: Path
) -> None:
    """A child delegated to a sub-agent that proved itself through an issuer (actor_token)
    is refused once a reload removes that issuer, while its parent, whose own issuer stays,
    goes on: the sub-agent's proof is no longer trusted."""
    local = Issuer(tmp_path, "https://sub-agents.example.com")
    cfg = token_config(openbao, agent, upstream.url)
    cfg["identity"]["issuers"].append(
        {
            "name": "sub-agents",
            "issuer": local.issuer,
            "jwks_file": str(local.jwks_file),
            "audiences": ["keyproxy"],
            "algorithms": ["RS256"],
        }
    )
    served.path.write_text(yaml.safe_dump(cfg))
    actor = local.token("summariser")
    async with aiohttp.ClientSession() as http:
        assert (await _reload(http, served))["result"] == "ok"
        scope = {"r": {"methods": ["GET"], "paths": ["/echo"]}}
        identity = openbao.agent_token(agent)
        CANARIES.add(identity)
        code, parent = await exchange(http, served.base, identity, scope=scope)
        assert code == 200, parent
        code, child = await delegate(http, served.base, parent["access_token"], actor_token=actor)
        assert code == 200, child

        async def echo(token: dict[str, Any]) -> tuple[int, Any]:
            headers = bearer(token["access_token"])
            async with http.get(f"{served.base}/r/r/echo", headers=headers) as response:
                return response.status, (await response.read())

        assert [(await echo(t))[0] for t in (parent, child)] == [200, 200]
        cfg["identity"]["issuers"].pop()
        served.path.write_text(yaml.safe_dump(cfg))
        assert (await _reload(http, served))["changes"]["issuers"]["removed"] == ["sub-agents"]
        status, body = await echo(child)
        assert (status, json.loads(body)["error"]["code"]) == (401, "issuer_removed")
        assert (await echo(parent))[0] == 200


async def test_reloads_asked_while_one_waits_share_it(served: Served) -> None:
    """Fifty reloads asked at once (a storm of POST /reload) of a file that is refused cost
    at most two readings of it, the running one's and one more that all the others share;
    each caller still gets the refusal."""
    served.path.write_text("routes: [unclosed\n")
    reloader = served.app[RELOADER]
    with capture_logs() as logs:
        outcomes = await asyncio.gather(*(reloader.reload("admin") for _ in range(50)))
    assert {outcome.result for outcome in outcomes} == {"error"}
    assert 1 <= len([e for e in logs if e["event"] == "config.reload_failed"]) <= 2


async def test_a_reload_asked_by_a_web_page_is_refused(
    served: Served, openbao: OpenBaoDevServer, agent: Agent, upstream: Upstream
) -> None:
    """POST /reload from a web page (a browser names its origin) is refused with 403 and
    reloads nothing: a page open on the operator's host must not apply a file early; tools,
    which send no Origin, still reload."""
    cfg = token_config(openbao, agent, upstream.url)
    cfg["tokens"]["max_ttl"] = "5m"
    served.path.write_text(yaml.safe_dump(cfg))
    running = served.app[RELOADER].current.digest
    async with aiohttp.ClientSession() as http:
        for headers in ({"Origin": "https://example.com"}, {"Sec-Fetch-Site": "cross-site"}):
            async with http.post(f"{served.admin}/reload", headers=headers) as response:
                assert response.status == 403, headers
                assert (await response.json())["error"]["code"] == "browser_request"
            assert served.app[RELOADER].current.digest == running
        assert (await _reload(http, served))["result"] == "ok"


async def test_the_admin_listener_answers_no_script_of_a_web_page(
    openbao: OpenBaoDevServer, agent: Agent, upstream: Upstream, tmp_path: Path, route_key: None
) -> None:
    """GET /readyz, /metrics and /healthz asked by a page's script are refused with 403: a
    page whose name was rebound to the loopback address is same-origin to the browser and
    would read the secret paths and key fingerprints. Over plain HTTP the browser sends no
    Sec-Fetch-Site and a same-origin GET no Origin: the page's name in Host tells it.
    Tools, a URL the operator typed (Sec-Fetch-Site: none), an address, localhost and a name
    of server.admin.hosts (a Service Prometheus scrapes) are answered."""
    cfg = token_config(openbao, agent, upstream.url)
    cfg.setdefault("server", {})["admin"] = {"hosts": ["Keyproxy-Admin.test"]}
    path = tmp_path / "keyproxy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    app = build_app(config.load(path), source=path)
    limits = server.Limits.of(config.load(path).server)
    runner, _ = await server.start(app, "127.0.0.1", 0, limits)
    admin, port = await server.start(build_admin_app(app), "127.0.0.1", 0, limits)
    page, base = "http://rebound.example:9090", f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for where in ("/readyz", "/metrics", "/healthz"):
                for headers, code in (
                    ({"Sec-Fetch-Site": "same-origin"}, "browser_request"),
                    ({"Sec-Fetch-Site": "cross-site"}, "browser_request"),
                    ({"Origin": page}, "browser_request"),
                    ({"Host": "rebound.example:9090"}, "unknown_host"),
                    ({"Host": "127.0.0.1.rebound.example"}, "unknown_host"),
                ):
                    async with http.get(f"{base}{where}", headers=headers) as response:
                        assert response.status == 403, (where, headers)
                        assert (await response.json())["error"]["code"] == code
                for headers in (
                    {},
                    {"Sec-Fetch-Site": "none"},
                    {"Host": "localhost:9090"},
                    {"Host": "keyproxy-admin.test:9090"},
                    {"Host": f"[::1]:{port}"},
                ):
                    async with http.get(f"{base}{where}", headers=headers) as response:
                        assert response.status == 200, (where, headers)
        # An HTTP/1.0 tool may name no host (a browser always names the page's): answered.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), 10)
        finally:
            writer.close()
        assert status_line.split()[1] == b"200", status_line
    finally:
        await admin.cleanup()
        await runner.cleanup()


async def test_a_setting_that_needs_a_restart_is_named_by_every_reload_until_then(
    served: Served, openbao: OpenBaoDevServer, agent: Agent, upstream: Upstream
) -> None:
    """A restart-only setting the file changed is named by each later reload too (it still
    runs with its old value), not only by the one that read it first; a file that puts it
    back names it no more."""
    cfg = token_config(openbao, agent, upstream.url)
    original = copy.deepcopy(cfg["vault"])
    cfg["vault"]["max_staleness"] = "90s"
    served.path.write_text(yaml.safe_dump(cfg))
    async with aiohttp.ClientSession() as http:
        first = await _reload(http, served)
        assert first["changes"]["needs_restart"] == ["vault"]
        cfg["tokens"]["max_ttl"] = "5m"
        served.path.write_text(yaml.safe_dump(cfg))
        later = await _reload(http, served)
        assert later["result"] == "ok"
        assert later["changes"]["sections"] == ["tokens"]
        assert later["changes"]["needs_restart"] == ["vault"]
        cfg["vault"] = original
        served.path.write_text(yaml.safe_dump(cfg))
        back = await _reload(http, served)
        assert back["result"] == "ok"
        assert back["changes"]["needs_restart"] == []


async def _status_line(port: int) -> tuple[bytes, asyncio.StreamWriter]:
    """The status line a new connection to `port` gets for GET /healthz; its writer, open."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
    await writer.drain()
    return await asyncio.wait_for(reader.readline(), DEADLINE), writer


async def test_a_proxy_no_longer_trusted_loses_its_connection_exemption(
    openbao: OpenBaoDevServer, agent: Agent, upstream: Upstream, tmp_path: Path, route_key: None
) -> None:
    """A reload that removes an address from server.trusted_proxies also ends its exemption
    from max_connections_per_source: its next connections are counted like anyone's."""
    cfg = token_config(openbao, agent, upstream.url)
    cfg["server"] = {"trusted_proxies": ["127.0.0.0/8"], "max_connections_per_source": 2}
    path = tmp_path / "keyproxy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    app = build_app(config.load(path), source=path)
    runner, port = await server.start(
        app, "127.0.0.1", 0, server.Limits.of(config.load(path).server)
    )
    writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(3):  # trusted: more than the per-source limit
            line, writer = await _status_line(port)
            writers.append(writer)
            assert line.startswith(b"HTTP/1.1 200 "), line
        cfg["server"]["trusted_proxies"] = []
        path.write_text(yaml.safe_dump(cfg))
        assert (await app[RELOADER].reload("test")).result == "ok"
        lines = []
        for _ in range(3):
            line, writer = await _status_line(port)
            writers.append(writer)
            lines.append(line)
        assert [line.split(b" ")[1] for line in lines] == [b"200", b"200", b"503"]
    finally:
        for writer in writers:
            writer.close()
        await runner.cleanup()


@pytest.mark.parametrize("naming", [(), ("/etc/keyproxy/keyproxy.yaml",)])
def test_keyproxy_reload_signals_only_a_keyproxy_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], naming: tuple[str, ...]
) -> None:
    """`keyproxy reload --pid-file` whose file names a process that is not keyproxy (a stale
    file whose process id was reused) refuses, rather than sending SIGHUP, which ends most
    programs; also when its command line merely mentions keyproxy (an editor of its file)."""
    import subprocess  # noqa: PLC0415  # only this test starts a process of its own
    import sys  # noqa: PLC0415

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *naming])
    try:
        pid_file = tmp_path / "keyproxy.pid"
        pid_file.write_text(f"{other.pid}\n")
        assert main(["reload", "--pid-file", str(pid_file)]) == 1
        assert "not keyproxy" in capsys.readouterr().err
        assert other.poll() is None  # not signalled
    finally:
        other.kill()
        other.wait(timeout=DEADLINE)
