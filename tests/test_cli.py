"""The command line: `serve` runs the real proxy from a file; `explain` reports decisions."""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from keyproxy.cli import main
from keyproxy.devserver import OpenBaoDevServer
from tests.helpers.cli import started
from tests.helpers.polling import eventually_blocking
from tests.helpers.servers import free_port


def _config(vault_addr: str, issuer: str, jwks: str) -> dict[str, Any]:
    return {
        "vault": {"addr": vault_addr, "auth": {"method": "token"}},
        "identity": {
            "issuers": [
                {
                    "name": "ci",
                    "issuer": issuer,
                    "jwks_uri": jwks,
                    "audiences": ["keyproxy"],
                    "algorithms": ["RS256"],
                }
            ]
        },
        "routes": {
            "api": {
                "upstream": "https://api.example.com",
                "secret": {"path": "keyproxy/keys/cli-test"},
                "inject": [{"header": "X-Api-Key"}],
            }
        },
        "policies": [
            {
                "name": "evals",
                "issuers": ["ci"],
                "subjects": ["repo:acme/*"],
                "claims": {"repository": "acme/evals"},
                "allow": {"api": {"methods": ["POST"], "paths": ["/v1/**"]}},
            }
        ],
    }


@pytest.mark.parametrize(
    ("extra", "code", "verdict"),
    [
        (["--claim", "repository=acme/evals", "--method", "POST"], 0, "allowed by evals"),
        (
            ["--claim", "repository=acme/other", "--method", "POST"],
            1,
            "denied: no_policy_for_identity",
        ),
        (["--claim", "repository=acme/evals", "--method", "GET"], 1, "denied: method_not_allowed"),
    ],
)
def test_explain_reports_the_decision(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], code: int, verdict: str
) -> None:
    """`keyproxy explain` prints each policy's verdict and exits 0 only when allowed."""
    path = tmp_path / "k.yaml"
    path.write_text(yaml.safe_dump(_config("http://127.0.0.1:1", "https://ci", "https://ci/jwks")))
    argv = [
        "explain",
        "-c",
        str(path),
        "--issuer",
        "ci",
        "--subject",
        "repo:acme/evals",
        "--route",
        "api",
        "--path",
        "/v1/chat/completions",
        *extra,
    ]
    assert main(argv) == code
    assert capsys.readouterr().out.strip().splitlines()[-1] == verdict


def test_serve_runs_from_a_file_and_stops_on_sigterm(
    openbao: OpenBaoDevServer, tmp_path: Path, log_dir: Path
) -> None:
    """`keyproxy serve` logs in with BAO_TOKEN, loads the key, turns ready, logs JSON to
    stdout, and exits cleanly on SIGTERM."""
    setup = openbao.dev_setup
    openbao.put_key("keyproxy/keys/cli-test", "sk-cli-test-" + os.urandom(8).hex())
    path = tmp_path / "k.yaml"
    path.write_text(yaml.safe_dump(_config(openbao.addr, setup.issuer, setup.jwks_uri)))
    port, admin_port = free_port(), free_port()
    env = {**os.environ, "BAO_TOKEN": openbao.root_token}
    out = log_dir / "serve.out"
    args = ("serve", "-c", str(path), "--port", str(port), "--admin-port", str(admin_port))
    with started(*args, out=out, env=env) as proc:

        def readiness() -> dict[str, Any]:
            try:
                admin = f"http://127.0.0.1:{admin_port}/readyz"  # the detailed readiness
                with urllib.request.urlopen(admin, timeout=5) as r:
                    body: dict[str, Any] = json.load(r)
                    return body
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, out.read_text()
                return {}

        body = eventually_blocking(readiness, "not ready", within=30)
        assert body["keys"]["api"]["version"] >= 1
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0
    events = [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]
    assert any(e["event"] == "started" for e in events)
