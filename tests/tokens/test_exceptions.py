"""keyproxy.tokens.exceptions: exception tokens need an owner and a reason."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from keyproxy.cli import main
from keyproxy.devserver import Agent, OpenBaoDevServer
from tests.helpers.logscan import CANARIES
from tests.helpers.servers import (
    token_config,
)


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
