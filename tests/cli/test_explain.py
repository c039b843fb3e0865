"""`keyproxy explain`: the decision for a described identity, and with `--token` for real
tokens, verified as the proxy verifies them.

Workload tokens are OpenBao identity tokens of real agents (vault-dev/add-agent.sh and
agent-token.sh); task tokens are issued by keyproxy's own TaskTokens with the session
OpenBao's Transit key, and `explain` verifies them with the proxy's AppRole from the file.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from keyproxy import config
from keyproxy import scope as scopes
from keyproxy.cli import main
from keyproxy.devserver import OpenBaoDevServer
from keyproxy.identity import Identity
from keyproxy.tokens import TaskTokens
from keyproxy.vault import Vault
from tests.helpers.cli import clean_env, keyproxy
from tests.helpers.configs import api_route_config
from tests.helpers.logscan import CANARIES


@dataclass(frozen=True)
class Setup:
    cfg: Path
    raw: dict[str, Any]
    subject: str
    token: str  # the allowed agent's identity token
    stranger: str  # an identity token of an agent no policy names
    env: dict[str, str]


@pytest.fixture(scope="module")
def setup(openbao: OpenBaoDevServer, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    tmp = tmp_path_factory.mktemp("explain")
    agent = openbao.add_agent(f"explain-{uuid.uuid4().hex[:8]}")
    stranger = openbao.add_agent(f"stranger-{uuid.uuid4().hex[:8]}")
    raw = {
        "vault": openbao.vault_yaml(),  # the proxy's AppRole: enough to verify task tokens
        "identity": {"issuers": [openbao.issuer_yaml("openbao")]},
        "routes": {
            "api": {
                "upstream": "https://api.example.com",
                "secret": {"path": "keyproxy/keys/explain"},
                "inject": [{"header": "X-Api-Key"}],
            }
        },
        "policies": [
            {
                "name": "agents",
                "issuers": ["openbao"],
                "subjects": [agent.entity_id],
                "allow": {
                    "api": {"methods": ["GET", "POST"], "paths": ["/v1/models", "/v1/chat/**"]}
                },
            }
        ],
    }
    path = tmp / "keyproxy.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    token, other = openbao.agent_token(agent), openbao.agent_token(stranger)
    CANARIES.update({token, other})
    home = tmp / "home"
    home.mkdir()
    return Setup(path, raw, agent.entity_id, token, other, clean_env(home))


def explain(s: Setup, token: str, method: str, path: str, *extra: str) -> Any:
    return keyproxy(
        "explain",
        "-c",
        str(s.cfg),
        "--token",
        token,
        "--route",
        "api",
        "--method",
        method,
        "--path",
        path,
        *extra,
        env=s.env,
    )


def test_an_allowed_workload_token_names_the_policy_and_its_rule(setup: Setup) -> None:
    """A real agent token for a granted request: exit 0, the policy, and the rule (route,
    methods, the path pattern that matched)."""
    done = explain(setup, setup.token, "POST", "/v1/chat/completions")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"token: workload identity token of openbao {setup.subject}")
    assert lines[1] == "  agents: allowed, by api: GET, POST on /v1/chat/**"
    assert lines[-1] == "allowed by agents"
    answer = json.loads(explain(setup, setup.token, "POST", "/v1/chat/x", "-o", "json").stdout)
    assert answer["allowed"] is True
    assert answer["policy"] == "agents"
    assert answer["rule"] == {"route": "api", "methods": ["GET", "POST"], "path": "/v1/chat/**"}
    assert answer["identity"] == {"issuer": "openbao", "subject": setup.subject}
    assert answer["token"]["kind"] == "workload"
    assert setup.token not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("method", "path", "reason"),
    [
        ("DELETE", "/v1/models", "method_not_allowed"),
        ("GET", "/v1/files", "path_not_allowed"),
    ],
)
def test_a_denied_workload_token_says_what_the_policy_grants(
    setup: Setup, method: str, path: str, reason: str
) -> None:
    """A real agent token for a request its policy does not grant: exit 1, the reason, and
    what the policy does grant on the route."""
    done = explain(setup, setup.token, method, path)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[1] == f"  agents: {reason} (api: GET, POST on /v1/models, /v1/chat/**)"
    assert lines[-1] == f"denied: {reason}"
    answer = json.loads(explain(setup, setup.token, method, path, "--json").stdout)
    assert (answer["allowed"], answer["status"], answer["reason"]) == (False, 403, reason)
    assert answer["policies"][0]["grants"]["paths"] == ["/v1/models", "/v1/chat/**"]


def test_a_token_no_policy_names_is_denied_with_what_the_policy_needs(setup: Setup) -> None:
    """Another agent's real token: no_policy_for_identity, naming the subjects required."""
    done = explain(setup, setup.stranger, "GET", "/v1/models")
    assert done.returncode == 1
    assert f"no_policy_for_identity (issuers openbao; subjects {setup.subject})" in done.stdout
    assert done.stdout.endswith("denied: no_policy_for_identity\n")


def test_a_token_that_does_not_verify_is_a_401(setup: Setup) -> None:
    """A tampered signature, or a token of no configured issuer, is refused as the proxy
    refuses it (401, with its reason), and no policy is consulted."""
    head, body, sig = setup.token.split(".")
    tampered = f"{head}.{body}.{sig[:-4]}AAAA"
    CANARIES.add(tampered)
    done = explain(setup, tampered, "GET", "/v1/models", "-o", "json")
    answer = json.loads(done.stdout)
    assert done.returncode == 1
    assert (answer["status"], answer["reason"], answer["policies"]) == (401, "bad_signature", [])
    text = explain(setup, "not.a.jwt", "GET", "/v1/models")
    assert text.stdout.splitlines()[-1] == "denied: malformed (401)"


def test_the_token_can_come_from_stdin(setup: Setup) -> None:
    """`--token -` reads the token from stdin, keeping it out of the process list."""
    done = keyproxy(
        "explain",
        "-c",
        str(setup.cfg),
        "--token",
        "-",
        "--route",
        "api",
        "--path",
        "/v1/models",
        env=setup.env,
        stdin=setup.token + "\n",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("allowed by agents\n")


@pytest.fixture
def task_tokens(setup: Setup, root_vault: Vault) -> TaskTokens:
    """keyproxy's TaskTokens on the session OpenBao, for the configuration of `setup`."""
    return TaskTokens(config.parse(json.dumps(setup.raw), {}), root_vault)


async def test_task_tokens_in_scope_outside_it_and_revoked(
    setup: Setup, task_tokens: TaskTokens
) -> None:
    """A task token for GET /v1/models: allowed there by the policy, outside_token_scope for
    a request the policy allows but the token does not, and a 401 once revoked."""
    scope = scopes.parse({"api": {"methods": ["GET"], "paths": ["/v1/models"]}}, ["api"])
    identity = Identity("openbao", setup.subject, {})
    issued = await task_tokens.issue(identity, scope, ttl=300, task="explain-test")
    CANARIES.add(issued.token)
    allowed = explain(setup, issued.token, "GET", "/v1/models")
    assert allowed.returncode == 0, allowed.stderr
    first = allowed.stdout.splitlines()[0]
    assert first.startswith(f"token: task token {issued.token_id} of openbao {setup.subject}")
    assert "task explain-test, scope api:GET:/v1/models" in first
    assert allowed.stdout.endswith("allowed by agents\n")
    outside = explain(setup, issued.token, "POST", "/v1/chat/completions", "-o", "json")
    answer = json.loads(outside.stdout)
    assert outside.returncode == 1
    assert (answer["status"], answer["reason"]) == (403, "outside_token_scope")
    await task_tokens.revoke(token_id=issued.token_id, expires_at=issued.expires_at)
    revoked = explain(setup, issued.token, "GET", "/v1/models")
    assert revoked.returncode == 1
    assert revoked.stdout.splitlines()[-1] == "denied: revoked (401)"
    assert issued.token not in allowed.stdout + outside.stdout + revoked.stdout


async def test_an_exception_token_is_allowed_by_its_own_scope(
    setup: Setup, task_tokens: TaskTokens
) -> None:
    """An exception token stands for no identity: its scope is its grant, named as the rule."""
    scope = scopes.parse({"api": {"methods": ["GET"], "paths": ["/v1/**"]}}, ["api"])
    identity = Identity("exception", "exception:ops@example.com", {})
    issued = await task_tokens.issue(
        identity, scope, ttl=300, exception=("ops@example.com", "explain test")
    )
    CANARIES.add(issued.token)
    done = explain(setup, issued.token, "GET", "/v1/files", "-o", "json")
    answer = json.loads(done.stdout)
    assert done.returncode == 0, done.stderr
    assert (answer["reason"], answer["policy"]) == ("exception_token", None)
    assert answer["rule"] == {"route": "api", "methods": ["GET"], "path": "/v1/**"}
    assert answer["token"]["exception_owner"] == "ops@example.com"


def test_described_identities_still_work_and_names_are_checked(setup: Setup) -> None:
    """Without --token the caller is described; --token with --subject is a usage error."""
    base = ["explain", "-c", str(setup.cfg), "--route", "api", "--path", "/v1/models"]
    described = keyproxy(*base, "--issuer", "openbao", "--subject", setup.subject, env=setup.env)
    assert described.returncode == 0
    assert described.stdout.endswith("allowed by agents\n")
    both = keyproxy(*base, "--token", setup.token, "--subject", "x", env=setup.env)
    assert both.returncode == 2
    assert "--token brings its own identity" in both.stderr


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
    path.write_text(
        yaml.safe_dump(api_route_config("http://127.0.0.1:1", "https://ci", "https://ci/jwks"))
    )
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


@pytest.mark.parametrize(
    ("path", "code", "verdict"),
    [("/mcp", 0, "allowed by evals"), ("/admin/keys", 1, "denied: not_mcp_endpoint")],
)
def test_an_mcp_route_is_explained_on_its_endpoint_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], path: str, code: int, verdict: str
) -> None:
    """Off an MCP route's endpoint (`/mcp` unless set) the proxy answers 404 whatever the
    grant: `keyproxy explain` says so rather than allowed."""
    doc = api_route_config("http://127.0.0.1:1", "https://ci", "https://ci/jwks")
    doc["routes"]["tools"] = {**doc["routes"]["api"], "kind": "mcp"}
    doc["policies"][0]["allow"]["tools"] = {"tools": ["search"]}
    cfg = tmp_path / "k.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    argv = ["explain", "-c", str(cfg), "--issuer", "ci", "--subject", "repo:acme/evals"]
    argv += ["--claim", "repository=acme/evals", "--route", "tools", "--method", "POST"]
    assert main([*argv, "--path", path]) == code
    assert capsys.readouterr().out.strip().splitlines()[-1] == verdict
