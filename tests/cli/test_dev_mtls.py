"""`keyproxy dev --mtls`: the README's mutual-TLS blocks run as written against the real
command, and what it writes (the CA, the server's and the demo agent's certificates)."""

from __future__ import annotations

import os
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from keyproxy.devserver import vault_dev_dir
from tests.helpers.cli import BIN, first_line_json, started
from tests.helpers.logscan import CANARIES
from tests.test_readme import Checkout, readme_blocks, run_blocks


def mtls_blocks() -> list[str]:
    return [body for info, body in readme_blocks() if info == "sh mtls"]


@pytest.fixture(scope="module")
def mtls_stack(
    tmp_path_factory: pytest.TempPathFactory, log_dir: Path
) -> Iterator[tuple[Checkout, dict[str, Any]]]:
    """`keyproxy dev --mtls --json --port 0` in a directory laid out like a checkout (its env
    file where the README says); yields the checkout and the handshake line."""
    work = tmp_path_factory.mktemp("mtls-checkout")
    (work / "vault-dev").symlink_to(vault_dev_dir())
    home = tmp_path_factory.mktemp("mtls-home")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}
    dev_env = {**env, "PATH": f"{BIN}{os.pathsep}{env['PATH']}"}
    out = log_dir / "dev-mtls.out"
    with started(
        "dev", "--mtls", "--json", "--port", "0",
        out=out, err=log_dir / "dev-mtls.err", cwd=work, env=dev_env,
    ) as proc:  # fmt: skip
        info = first_line_json(proc, out, "keyproxy dev", within=90)
        CANARIES.add(info["token"])
        yield Checkout(work, env), info
    assert proc.returncode == 0
    assert not Path(info["tls_dir"]).exists(), "the agent's key outlived keyproxy dev"


def test_the_mtls_walkthrough_runs_as_written(
    mtls_stack: tuple[Checkout, dict[str, Any]], tmp_path: Path
) -> None:
    """The README's `sh mtls` blocks, literally, with curl: a certificate-only chat completion
    is answered by the demo upstream, a call with neither certificate nor token is 401, and a
    token requested over mTLS works with its certificate (200) and is 401 without it."""
    checkout, _ = mtls_stack
    blocks = mtls_blocks()
    assert len(blocks) == 2
    run = run_blocks(blocks, checkout, tmp_path / "run")
    assert run.completed == len(blocks), f"block {run.completed} failed: {run.errors}"
    certificate_only, bound = (o.splitlines() for o in run.outputs)
    assert "The key I received has fingerprint" in certificate_only[0]
    assert certificate_only[1:] == ["401"]
    assert bound == ["200", "401"]


def test_dev_mtls_writes_its_tls_files_private(mtls_stack: tuple[Checkout, dict[str, Any]]) -> None:
    """The keys are mode 0600 in a 0700 directory, and an httpx client trusting ca.pem and
    presenting agent.crt is the SPIFFE ID the handshake line names (a policy allows it)."""
    _, info = mtls_stack
    tls_dir = Path(info["tls_dir"])
    assert stat.S_IMODE(tls_dir.stat().st_mode) == 0o700
    for key in ("agent.key", "server.key"):
        assert stat.S_IMODE((tls_dir / key).stat().st_mode) == 0o600
    assert info["spiffe_id"] == "spiffe://dev.keyproxy.test/agent/demo"
    context = ssl.create_default_context(cafile=info["ca"])
    context.load_cert_chain(info["agent_cert"], info["agent_key"])
    with httpx.Client(verify=context, trust_env=False, timeout=30) as client:
        assert client.get(f"{info['proxy_url']}/models").status_code == 200
    with httpx.Client(verify=ssl.create_default_context(cafile=info["ca"]), trust_env=False) as c:
        assert c.get(f"{info['proxy_url']}/models").status_code == 401
