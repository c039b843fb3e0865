"""`keyproxy dev --json` runs the whole stack, and the README walkthrough works as written."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keyproxy.devserver import OpenBaoDevServer
from tests.helpers.cli import BIN, first_line_json, started
from tests.helpers.logscan import CANARIES
from tests.helpers.polling import eventually_blocking

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dev_stack(log_dir: Path) -> Iterator[dict[str, Any]]:
    """A `keyproxy dev --json --port 0` subprocess; yields its handshake line."""
    out = log_dir / "dev.out"
    env_file = log_dir / "dev.env"
    args = ("dev", "--json", "--port", "0", "--env-file", str(env_file))
    with started(*args, out=out, err=log_dir / "dev.err", cwd=REPO) as proc:
        info = first_line_json(proc, out, "keyproxy dev", within=60)
        CANARIES.add(info["token"])
        yield info
    assert proc.returncode == 0
    # Everything it started is gone: OpenBao no longer answers, its credentials are deleted.
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(info["vault_addr"] + "/v1/sys/health", timeout=5)  # noqa: S310
    assert not Path(info["workdir"]).exists()
    assert not env_file.exists()


WALKTHROUGH = """
import openai
client = openai.OpenAI()
print(client.chat.completions.create(
    model="keyproxy-demo", messages=[{"role": "user", "content": "hi"}],
).choices[0].message.content)
for chunk in client.chat.completions.create(
    model="keyproxy-demo", messages=[{"role": "user", "content": "stream it"}], stream=True,
):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
"""


def _agent(dev_stack: dict[str, Any], code: str, **extra: str) -> str:
    env = {
        **os.environ,
        "OPENAI_BASE_URL": dev_stack["proxy_url"],
        "OPENAI_API_KEY": dev_stack["token"],
        **extra,
    }
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_start_up_says_what_it_is_doing(dev_stack: dict[str, Any], log_dir: Path) -> None:
    """While it starts, keyproxy dev says on stderr what it is waiting for."""
    err = (log_dir / "dev.err").read_text()
    for step in ("starting an OpenBao dev server", "configuring it with vault-dev/setup.sh"):
        assert f"keyproxy dev: {step}" in err


def test_setup_script_reports_progress_on_stderr(openbao: OpenBaoDevServer, tmp_path: Path) -> None:
    """vault-dev/setup.sh (run again: it is idempotent) prints one line per step on stderr
    and the OIDC issuer alone on stdout."""
    env = {**os.environ, **openbao.env(), "HOME": str(tmp_path)}
    done = subprocess.run(
        [str(REPO / "vault-dev" / "setup.sh"), str(tmp_path / "credentials")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == openbao.dev_setup.issuer
    steps = [line for line in done.stderr.splitlines() if line.startswith("setup.sh: ")]
    assert len(steps) == 6, done.stderr
    assert any("KV v2 at secret/" in step for step in steps)
    assert openbao.root_token not in done.stderr


def test_handshake_has_the_documented_fields(dev_stack: dict[str, Any]) -> None:
    """The --json line names proxy_url, route, token, vault_addr and the env file."""
    assert dev_stack["proxy_url"].startswith("http://127.0.0.1:")
    assert dev_stack["route"] == "demo"
    assert dev_stack["vault_addr"].startswith("http://127.0.0.1:")
    assert dev_stack["token"].count(".") == 2
    assert Path(dev_stack["env_file"]).name == "dev.env"


MCP_AGENT = """
import asyncio, os, httpx
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import McpError

async def main():
    headers = {"Authorization": "Bearer " + os.environ["OPENAI_API_KEY"]}
    async with (
        httpx.AsyncClient(headers=headers, timeout=30) as http,
        streamable_http_client(os.environ["MCP_URL"], http_client=http) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        print([t.name for t in (await session.list_tools()).tools])
        print((await session.call_tool("search_issues", {"query": "login"})).structuredContent)
        try:
            await session.call_tool("close_issue", {"number": 1})
        except McpError as e:
            print("refused", e.error.code)

asyncio.run(main())
"""


def test_the_demo_mcp_route_grants_one_of_two_tools(dev_stack: dict[str, Any]) -> None:
    """Through `keyproxy dev` an MCP SDK client lists and calls search_issues, and is refused
    close_issue with a JSON-RPC error."""
    lines = _agent(dev_stack, MCP_AGENT, MCP_URL=dev_stack["mcp_url"]).strip().splitlines()
    assert lines == [
        "['search_issues']",
        "{'result': ['Login fails on Safari', 'Login page is slow']}",
        "refused -32602",
    ]


def test_readme_walkthrough_with_the_openai_sdk(dev_stack: dict[str, Any]) -> None:
    """The README's agent snippet gets a plain and a streamed answer with a key fingerprint."""
    lines = _agent(dev_stack, WALKTHROUGH).strip().splitlines()
    assert len(lines) == 2
    fingerprints = {m for line in lines for m in re.findall(r"fingerprint ([0-9a-f]{12})", line)}
    assert len(fingerprints) == 1
    assert dev_stack["token"] not in "".join(lines)


def test_walkthrough_rotation_and_denials(dev_stack: dict[str, Any]) -> None:
    """A new key stored with vault-dev/put-key.sh changes the fingerprint within 5 s, and the
    README's curl denials answer 401 and 403."""
    fingerprint = re.compile(r"fingerprint ([0-9a-f]{12})")
    snippet = (
        "import openai; print(openai.OpenAI().chat.completions.create(model='m', "
        "messages=[{'role': 'user', 'content': 'x'}]).choices[0].message.content)"
    )
    before = fingerprint.findall(_agent(dev_stack, snippet))
    workdir = Path(dev_stack["workdir"])
    env = {
        **os.environ,
        "BAO_ADDR": dev_stack["vault_addr"],
        "BAO_TOKEN": (workdir / "root-token").read_text(),
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }
    new_key = "sk-rotated-" + os.urandom(12).hex()
    CANARIES.add(new_key)
    subprocess.run(
        [str(REPO / "vault-dev" / "put-key.sh"), "keyproxy/keys/demo"],
        input=new_key,
        env=env,
        text=True,
        capture_output=True,
        timeout=30,
        check=True,
    )
    eventually_blocking(
        lambda: fingerprint.findall(_agent(dev_stack, snippet)) != before,
        "the new key was not used",
        within=5,
        interval=0,
    )
    denied = (
        "import urllib.request, urllib.error, os\n"
        "def status(req):\n"
        "    try: return urllib.request.urlopen(req).status\n"
        "    except urllib.error.HTTPError as e: return e.code\n"
        "base = os.environ['OPENAI_BASE_URL']\n"
        "print(status(base + '/models'))\n"
        "print(status(urllib.request.Request(base + '/models', method='DELETE',"
        " headers={'Authorization': 'Bearer ' + os.environ['OPENAI_API_KEY']})))\n"
    )
    assert _agent(dev_stack, denied).split() == ["401", "403"]


def test_walkthrough_task_token(dev_stack: dict[str, Any]) -> None:
    """The README's task-token step: exchange, use through the SDK, revoke, refused after."""
    code = """
import json, os, urllib.request, urllib.error, openai
base = os.environ["OPENAI_BASE_URL"].split("/r/")[0]
def post(path, token, body=None):
    req = urllib.request.Request(base + path, method="POST", data=json.dumps(body or {}).encode(),
        headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req) as r: return r.status, json.load(r)
    except urllib.error.HTTPError as e: return e.code, json.load(e)
status, answer = post("/token", os.environ["OPENAI_API_KEY"], {
    "scope": {"demo": {"methods": ["POST"], "paths": ["/v1/chat/completions"]}},
    "task": "walkthrough", "intent": "try task tokens", "ttl": "5m"})
print(status)
task = answer["access_token"]
client = openai.OpenAI(api_key=task, max_retries=0)
print("fingerprint" in client.chat.completions.create(model="m",
      messages=[{"role": "user", "content": "x"}]).choices[0].message.content)
print(post("/token/revoke", task)[0])
try:
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    print("still works")
except openai.AuthenticationError:
    print(401)
"""
    assert _agent(dev_stack, code).split() == ["200", "True", "200", "401"]


def _bao_children(parent: int) -> list[int]:
    """PIDs of `bao server` processes whose parent is `parent` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"server\0-dev" in cmdline:
            found.append(int(entry.name))
    return found


def test_stop_during_start_up_leaves_no_openbao_behind(log_dir: Path) -> None:
    """SIGTERM while `keyproxy dev` is still starting stops its OpenBao too."""
    err = log_dir / "dev-early-stop.err"
    with started("dev", "--json", "--port", "0", out=Path(os.devnull), err=err, cwd=REPO) as proc:

        def openbao_children() -> list[int]:
            assert proc.poll() is None
            return _bao_children(proc.pid)

        children = eventually_blocking(
            openbao_children, "OpenBao never started", within=30, interval=0.05
        )
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    eventually_blocking(
        lambda: not any(Path(f"/proc/{pid}").exists() for pid in children),
        "OpenBao outlived keyproxy dev",
        interval=0.05,
    )
