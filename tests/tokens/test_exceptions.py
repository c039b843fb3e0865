"""Exception tokens need an owner and a reason, and an owner not named as a subject is."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from keyproxy.cli import main
from keyproxy.devserver import Agent, OpenBaoDevServer
from keyproxy.identity import Identity
from keyproxy.tokens import (
    EXCEPTION_ISSUER,
    exception_problem,
    exception_subject,
    exception_subject_named,
)
from tests.helpers.logscan import CANARIES
from tests.helpers.servers import (
    token_config,
)
from tests.helpers.tokens import SCOPE, replicas_of_own_list


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


@pytest.mark.parametrize(
    ("owner", "reason", "refused"),
    [
        ("alice@example.com", "legacy batch job", None),
        ("", "legacy batch job", "needs an owner and a reason"),
        ("  ", "legacy batch job", "needs an owner and a reason"),
        ("alice@example.com", " ", "needs an owner and a reason"),
        ("exception:bob", "legacy batch job", "cannot begin with 'exception:'"),
        ("exception:", "legacy batch job", "cannot begin with 'exception:'"),
    ],
)
def test_the_exception_rule_is_the_one_every_issuer_meets(
    owner: str, reason: str, refused: str | None
) -> None:
    """One rule, asked by the CLI before it connects and by the token service itself: an
    owner whose name begins as a subject does would read as another owner's."""
    problem = exception_problem(owner, reason)
    assert (problem is None) if refused is None else (refused in (problem or ""))


@pytest.mark.parametrize(
    ("name", "subject"),
    [("bob", "exception:bob"), ("exception:bob", "exception:bob"), ("", "exception:")],
)
def test_a_subject_is_named_by_its_owner_or_as_itself(name: str, subject: str) -> None:
    assert exception_subject_named(name) == subject


async def test_the_token_service_refuses_an_owner_named_as_a_subject(
    openbao: OpenBaoDevServer,
) -> None:
    """Not only the CLI: `TaskTokens.issue` itself refuses, before it reads or signs."""
    async with replicas_of_own_list(openbao, "exception-owner", count=1) as ((tasks,), _):
        with pytest.raises(ValueError, match="cannot begin with"):
            await tasks.issue(
                Identity(EXCEPTION_ISSUER, exception_subject("exception:bob"), {}),
                SCOPE,
                ttl=60,
                exception=("exception:bob", "legacy batch job"),
            )
