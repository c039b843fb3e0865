"""docs/operations.md "First deployment, step by step", followed literally against a fresh
OpenBao: the shell blocks marked `<!-- walkthrough: NAME -->` are run as written, in a
directory where `vault-dev/` is this checkout's and the operator's key file lies.

The test departs from the page in exactly these places, each because a test cannot do
otherwise: the `env` block points at the test's OpenBao and a temporary KEYPROXY_ETC; after
the `config` block, the route's upstream (https://api.openai.com) is pointed at a loopback
upstream (with the `allow_http` and egress exception such an upstream needs) and the port
8080 at a free one, and the same port is used in the `request` block.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from keyproxy.devserver import OpenBaoDevServer, vault_dev_dir
from tests.helpers.cli import BIN
from tests.helpers.polling import eventually
from tests.helpers.servers import free_port, new_key

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "operations.md"
BLOCK = re.compile(r"<!-- walkthrough: (\w+) -->\n```sh\n(.*?)```", re.S)
STEPS = ("env", "setup", "key", "agent", "config", "serve", "request")


def walkthrough() -> dict[str, str]:
    blocks = dict(BLOCK.findall(DOC.read_text(encoding="utf-8")))
    assert tuple(blocks) == STEPS, f"docs/operations.md walkthrough blocks: {list(blocks)}"
    return blocks


def test_walkthrough_env_block_sets_what_the_later_blocks_use() -> None:
    """The `env` block (which the test replaces) exports exactly the variables the other
    blocks rely on: BAO_ADDR, BAO_TOKEN and KEYPROXY_ETC."""
    exported = re.findall(r"^export (\w+)=", walkthrough()["env"], re.M)
    assert exported == ["BAO_ADDR", "BAO_TOKEN", "KEYPROXY_ETC"]


async def run_bash(script: str, cwd: Path, env: dict[str, str], log: Path) -> str:
    """Run `script` with bash -euo pipefail; fail the test (with the scrubbed log) on error."""
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-euo",
        "pipefail",
        "-c",
        script,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    with log.open("ab") as f:
        f.write(out + err)
    assert proc.returncode == 0, f"exit {proc.returncode}; see {log}"
    return out.decode()


async def wait_ready(url: str, proc: asyncio.subprocess.Process, within: float) -> None:
    async with aiohttp.ClientSession() as session:

        async def answered() -> bool:
            assert proc.returncode is None, "keyproxy serve exited"
            try:
                async with session.get(url) as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(answered, f"{url} not ready", within=within, interval=0.1)


async def stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the process group started for `proc` (its own session), then wait."""
    if proc.returncode is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=30)
        except TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), timeout=10)


async def test_operator_walkthrough_from_nothing_to_a_proxied_request(
    tmp_path: Path, log_dir: Path
) -> None:
    """Following docs/operations.md on a fresh OpenBao (setup.sh, put-key.sh, add-agent.sh,
    the config it shows, keyproxy check, keyproxy serve) gives a proxy that becomes ready and
    forwards the agent's request with the stored key injected, and refuses a caller without
    a token."""
    blocks = walkthrough()
    seen: list[str] = []

    async def models(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({"object": "list", "data": [{"id": "walkthrough-model"}]})

    upstream_app = web.Application()
    upstream_app.router.add_get("/v1/models", models)
    runner = web.AppRunner(upstream_app)
    await runner.setup()
    upstream_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", upstream_port).start()

    server = OpenBaoDevServer(tmp_path / "openbao")  # started, but not set up: setup.sh does it
    await asyncio.to_thread(server.start, 30)
    serve: asyncio.subprocess.Process | None = None
    try:
        work = tmp_path / "operator"
        work.mkdir()
        (work / "vault-dev").symlink_to(vault_dev_dir())
        key = new_key()
        (work / "openai-key.txt").write_text(key + "\n", encoding="utf-8")
        etc = tmp_path / "etc-keyproxy"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env = {
            **base,
            "PATH": f"{BIN}{os.pathsep}{Path(server.bao_bin).parent}{os.pathsep}{base['PATH']}",
            "HOME": str(work),
            "BAO_ADDR": server.addr,
            "BAO_TOKEN": server.root_token,
            "KEYPROXY_ETC": str(etc),
        }
        log = log_dir / "walkthrough.log"

        # Run everything up to and including `keyproxy check`, but with the config's upstream
        # and port changed before the check: split the config block at its check line.
        config_block, check_line = blocks["config"].rsplit("keyproxy check", 1)
        script = "\n".join([blocks["setup"], blocks["key"], blocks["agent"], config_block])
        await run_bash(script, work, env, log)
        assert not (work / "openai-key.txt").exists(), "the key file was not shredded"

        config_file = etc / "keyproxy.yaml"
        cfg = yaml.safe_load(config_file.read_text(encoding="utf-8"))
        route = cfg["routes"]["openai"]
        assert route["upstream"] == "https://api.openai.com"
        route["upstream"] = f"http://127.0.0.1:{upstream_port}"
        route["allow_http"] = True
        route["egress"] = {"allow_cidrs": ["127.0.0.0/8"]}
        assert cfg["server"]["port"] == 8080
        port = free_port()
        cfg["server"]["port"] = port
        cfg["server"]["admin"] = {"port": free_port()}  # beside other servers of the suite
        config_file.write_text(yaml.safe_dump(cfg), encoding="utf-8")

        checked = await run_bash("keyproxy check" + check_line, work, env, log)
        assert "ok (1 routes, 1 policies, 1 issuers)" in checked

        with (log_dir / "walkthrough-serve.log").open("wb") as out:
            serve = await asyncio.create_subprocess_exec(
                "bash",
                "-c",
                blocks["serve"],
                cwd=work,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own group, stopped by its id in `stop`
            )
        await wait_ready(f"http://127.0.0.1:{port}/readyz", serve, within=30)

        request = blocks["request"].replace("127.0.0.1:8080", f"127.0.0.1:{port}")
        answer = await run_bash(request, work, env, log)
        ready_line, body = answer.split("\n", 1)
        assert ready_line == "ready"
        assert json.loads(body)["data"] == [{"id": "walkthrough-model"}]
        assert seen == [f"Bearer {key}"]

        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/r/openai/v1/models") as denied,
        ):
            assert denied.status == 401
        assert len(seen) == 1, "a request without a token reached the upstream"
    finally:
        if serve is not None:
            await stop(serve)
        await asyncio.to_thread(server.stop)
        await runner.cleanup()


@pytest.mark.parametrize("step", ["setup", "key", "agent"])
def test_walkthrough_steps_use_the_shipped_scripts(step: str) -> None:
    """Each set-up step calls a script that exists in vault-dev/ and is executable."""
    for script in re.findall(r"vault-dev/([\w.-]+\.sh)", walkthrough()[step]):
        path = vault_dev_dir() / script
        assert path.is_file(), path
        assert os.access(path, os.X_OK), path
