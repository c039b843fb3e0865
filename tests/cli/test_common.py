"""The conventions every `keyproxy` command shares, proved on the real CLI (subprocesses)
against the session OpenBao: data alone on stdout, quiet logs on stderr unless -v, JSON that
parses, the operator's own Vault token, KEYPROXY_CONFIG, --version, shell completion, and
unknown names refused before any Vault call."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from keyproxy import text
from keyproxy.devserver import OpenBaoDevServer
from tests.helpers.cli import KEYPROXY, bash, clean_env, keyproxy
from tests.helpers.logscan import CANARIES
from tests.helpers.servers import free_port, new_key

JWT = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")


def _config(addr: str, tmp_path: Path, path: str, issuer: dict[str, Any]) -> dict[str, Any]:
    """One route with a manual rotation, one with a command rotator, one policy. The AppRole
    files do not exist: only --as-operator can log in."""
    secret = {"path": path}
    return {
        "vault": {
            "addr": addr,
            "auth": {
                "method": "approle",
                "role_id_file": str(tmp_path / "missing-role-id"),
                "secret_id_file": str(tmp_path / "missing-secret-id"),
            },
        },
        "identity": {"issuers": [issuer]},
        "routes": {
            "api": {
                "upstream": "https://api.example.com",
                "secret": secret,
                "inject": [{"header": "X-Api-Key"}],
                "owner": "ops@example.com",
                "rotation": {"every": "1h", "rotator": {"type": "manual"}},
            },
            "auto": {
                "upstream": "https://auto.example.com",
                "secret": {"path": path + "-auto"},
                "inject": [{"header": "X-Api-Key"}],
                "rotation": {
                    "every": "1h",
                    "grace": "10m",
                    "rotator": {"type": "command", "command": ["/bin/false"]},
                },
            },
        },
        "policies": [
            {
                "name": "bots",
                "issuers": [issuer["name"]],
                "subjects": ["bot-*"],
                "allow": {"api": {"methods": ["GET"], "paths": ["/v1/**"]}},
            }
        ],
    }


@pytest.fixture
def cfg_file(openbao: OpenBaoDevServer, tmp_path: Path, kv_path: str) -> Path:
    """A configuration for the session OpenBao whose two keys are stored already."""
    openbao.put_key(kv_path, new_key())
    openbao.put_key(kv_path + "-auto", new_key())
    path = tmp_path / "keyproxy.yaml"
    raw = _config(openbao.addr, tmp_path, kv_path, openbao.issuer_yaml("openbao"))
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


def _issue_args(cfg: Path) -> list[str]:
    return [
        "token",
        "issue",
        "-c",
        str(cfg),
        "--as-operator",
        "--owner",
        "ops@example.com",
        "--reason",
        "cli test",
        "--route",
        "api",
        "--paths",
        "/v1/models",
        "--ttl",
        "5m",
    ]


def test_token_substitution_captures_exactly_the_token(
    openbao: OpenBaoDevServer, cfg_file: Path, home: Path
) -> None:
    """`TOKEN=$(keyproxy token issue ...)` holds one JWT and nothing else; the details and no
    log line at all (vault.login is not news) go to stderr."""
    env = clean_env(home, VAULT_TOKEN=openbao.root_token)
    script = f'TOKEN=$(keyproxy {shlex.join(_issue_args(cfg_file))})\nprintf "%s" "$TOKEN"'
    done = bash(script, env=env)
    assert done.returncode == 0, done.stderr
    CANARIES.add(done.stdout)
    assert JWT.match(done.stdout), "stdout held more than the token"
    assert "exception token" in done.stderr
    assert '"event"' not in done.stderr, "a log line reached stderr without -v"
    assert done.stdout not in done.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["-v", "keys", "status"],
        ["keys", "status", "-v"],
        ["keys", "-v", "status"],
    ],
)
def test_verbose_shows_informational_log_lines_on_stderr(
    openbao: OpenBaoDevServer, cfg_file: Path, home: Path, argv: list[str]
) -> None:
    """-v, before the command or after it, shows info lines such as vault.login, as JSON on
    stderr; stdout stays the command's data."""
    env = clean_env(home, VAULT_TOKEN=openbao.root_token)
    done = keyproxy(*argv, "-c", str(cfg_file), "--as-operator", "-o", "json", env=env)
    assert done.returncode == 0, done.stderr
    assert [e["route"] for e in json.loads(done.stdout)] == ["api", "auto"]
    events = [json.loads(line)["event"] for line in done.stderr.splitlines()]
    assert "vault.login" in events


API_MODELS = ["--route", "api", "--path", "/v1/models"]


def _json_outputs(cfg: Path, log: Path) -> list[tuple[str, list[str], str]]:
    """(name, argv, stdin) of every command that prints data, each with -o json (or --json)."""
    c = ["-c", str(cfg)]
    return [
        ("check", ["check", *c, "-o", "json"], ""),
        ("check --json", ["check", *c, "--json"], ""),
        (
            "explain",
            ["explain", *c, "--issuer", "openbao", "--subject", "bot-1", *API_MODELS, "--json"],
            "",
        ),
        ("keys put", ["keys", "put", *c, "api", "--as-operator", "-o", "json"], new_key()),
        ("keys status", ["keys", "status", *c, "--as-operator", "-o", "json"], ""),
        ("token issue", [*_issue_args(cfg), "-o", "json"], ""),
        ("token list", ["token", "list", *c, "--as-operator", "-o", "json"], ""),
        (
            "token revoke",
            ["token", "revoke", *c, "--as-operator", "--task", "t-1", "-o", "json"],
            "",
        ),
        ("audit", ["audit", *c, "--route", "api", "-o", "json", str(log)], ""),
        ("rotate", ["rotate", *c, "--due", "--as-operator", "-o", "json"], ""),
    ]


def test_every_json_output_parses(
    openbao: OpenBaoDevServer, cfg_file: Path, home: Path, tmp_path: Path
) -> None:
    """Every command's -o json output parses as JSON (rotate: one object per line), with
    nothing else on stdout, even though every command logs in to Vault."""
    log = tmp_path / "audit.jsonl"
    log.write_text(
        '{"event":"request","route":"api","key_version":1,"subject":"bot-1",'
        '"issuer":"openbao","timestamp":"2026-01-01T00:00:00Z"}\nnot json\n'
    )
    env = clean_env(home, BAO_TOKEN=openbao.root_token)
    for name, argv, stdin in _json_outputs(cfg_file, log):
        done = keyproxy(*argv, env=env, stdin=stdin)
        assert done.returncode == 0, f"{name}: {done.stderr}"
        parsed: Any
        if name == "rotate":
            parsed = [json.loads(line) for line in done.stdout.splitlines()]
            assert [o["route"] for o in parsed] == ["api", "auto"]
        else:
            parsed = json.loads(done.stdout)
        if name == "token issue":
            CANARIES.add(parsed["token"])
            assert JWT.match(parsed["token"])
        assert parsed, name


def test_rotate_due_says_why_nothing_was_done(
    openbao: OpenBaoDevServer, cfg_file: Path, home: Path
) -> None:
    """`rotate --due` with nothing due names, per route, when it will be due."""
    env = clean_env(home, VAULT_TOKEN=openbao.root_token)
    done = keyproxy("rotate", "-c", str(cfg_file), "--due", "--as-operator", env=env)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert re.fullmatch(r"manual: next key due \S+ \(store it with keys put\)", lines["api"])
    assert re.fullmatch(r"not_due: key not due until \S+", lines["auto"])
    as_json = keyproxy("rotate", "-c", str(cfg_file), "--due", "--as-operator", "--json", env=env)
    outcomes = {o["route"]: o for o in map(json.loads, as_json.stdout.splitlines())}
    assert outcomes["auto"]["result"] == "not_due"
    assert outcomes["auto"]["next_due"] is not None
    assert outcomes["auto"]["detail"].startswith("key not due until")


def test_rotate_due_without_rotated_routes_says_so(
    openbao: OpenBaoDevServer, cfg_file: Path, home: Path
) -> None:
    """`rotate --due` on a file where no route rotates prints nothing on stdout and says on
    stderr that there was nothing to do."""
    raw = yaml.safe_load(cfg_file.read_text())
    for route in raw["routes"].values():
        del route["rotation"]
    cfg_file.write_text(yaml.safe_dump(raw))
    env = clean_env(home, VAULT_TOKEN=openbao.root_token)
    done = keyproxy("rotate", "-c", str(cfg_file), "--due", "--as-operator", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "no route in" in done.stderr
    assert "nothing to do" in done.stderr


@pytest.mark.parametrize("source", ["VAULT_TOKEN", "BAO_TOKEN", "~/.vault-token"])
def test_operator_token_sources(
    openbao: OpenBaoDevServer, cfg_file: Path, home: Path, source: str
) -> None:
    """--as-operator logs in with VAULT_TOKEN, BAO_TOKEN or ~/.vault-token alone, although the
    configuration's own AppRole cannot log in; without the flag the AppRole is used (and
    fails), so the operator's token is never picked up implicitly."""
    if source == "~/.vault-token":
        (home / ".vault-token").write_text(openbao.root_token + "\n")
        env = clean_env(home)
    else:
        env = clean_env(home, **{source: openbao.root_token})
    done = keyproxy("keys", "status", "-c", str(cfg_file), "--as-operator", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert {e["route"]: e["version"] for e in json.loads(done.stdout)} == {"api": 1, "auto": 1}
    without = keyproxy("keys", "status", "-c", str(cfg_file), "--json", env=env)
    assert without.returncode == 1
    assert "role_id_file" in without.stderr


def test_operator_flag_without_any_token_is_an_error(cfg_file: Path, home: Path) -> None:
    """--as-operator with no token anywhere says where it looked, and does nothing."""
    done = keyproxy("keys", "status", "-c", str(cfg_file), "--as-operator", env=clean_env(home))
    assert done.returncode == 1
    assert "BAO_TOKEN or VAULT_TOKEN" in done.stderr
    assert "~/.vault-token" in done.stderr
    assert done.stdout == ""


def test_operator_commands_run_with_vault_token_alone(
    openbao: OpenBaoDevServer, cfg_file: Path, home: Path
) -> None:
    """keys put/status, token issue/list/revoke and rotate all work with only VAULT_TOKEN set
    and the configuration file, whose own AppRole cannot log in."""
    env = clean_env(home, VAULT_TOKEN=openbao.root_token)
    c = ["-c", str(cfg_file), "--as-operator"]
    key = new_key()
    put = keyproxy("keys", "put", "api", *c, env=env, stdin=key + "\n")
    assert put.returncode == 0, put.stderr
    assert put.stdout == "api: stored version 2\n"
    assert key not in put.stdout + put.stderr
    status = keyproxy("keys", "status", *c, "-o", "json", env=env)
    assert json.loads(status.stdout)[0]["version"] == 2
    issued = keyproxy(*_issue_args(cfg_file), env=env)
    assert issued.returncode == 0, issued.stderr
    CANARIES.add(issued.stdout.strip())
    owner = f"owner-{uuid.uuid4().hex[:8]}@example.com"
    args = _issue_args(cfg_file)
    args[args.index("ops@example.com")] = f"exception:{owner}"  # would read as owner's
    refused = keyproxy(*args, env=env)
    assert (refused.returncode, refused.stdout) == (2, ""), refused.stderr
    args[args.index(f"exception:{owner}")] = owner
    issued_twice = [keyproxy(*args, env=env) for _ in range(2)]
    assert [i.returncode for i in issued_twice] == [0, 0]
    CANARIES.update(i.stdout.strip() for i in issued_twice)

    def owners() -> list[str]:
        listed = keyproxy("token", "list", *c, "-o", "json", env=env)
        return [e["owner"] for e in json.loads(listed.stdout)]

    assert owners().count(owner) == 2
    # By the owner as `token list` shows it, or by the subject the audit log shows.
    for subject in (owner, f"exception:{owner}"):
        revoke = ["token", "revoke", *c, "--issuer", "exception", "--subject", subject]
        assert keyproxy(*revoke, env=env).returncode == 0
        assert owner not in owners()
    rotate = keyproxy("rotate", "--due", *c, env=env)
    assert rotate.returncode == 0, rotate.stderr


def test_config_comes_from_keyproxy_config(cfg_file: Path, home: Path) -> None:
    """Without -c, KEYPROXY_CONFIG names the file; with neither, a usage error (exit 2)."""
    done = keyproxy("check", env=clean_env(home, KEYPROXY_CONFIG=str(cfg_file)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{cfg_file}: ok (2 routes")
    other = keyproxy(
        "check", "-c", "/nonexistent.yaml", env=clean_env(home, KEYPROXY_CONFIG=str(cfg_file))
    )
    assert other.returncode == 2, "-c must win over KEYPROXY_CONFIG"
    for argv in (["check"], ["keys", "status"], ["serve"], ["token", "list"]):
        missing = keyproxy(*argv, env=clean_env(home))
        assert missing.returncode == 2, argv
        assert "give -c FILE or set KEYPROXY_CONFIG" in missing.stderr


def test_version(home: Path) -> None:
    """`keyproxy --version` prints the installed version."""
    done = keyproxy("--version", env=clean_env(home))
    assert done.returncode == 0
    assert re.fullmatch(r"keyproxy \d+\.\d+\.\d+\S*\n", done.stdout)


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_script_completes_commands(home: Path, shell: str, tmp_path: Path) -> None:
    """`keyproxy completion bash|zsh` prints a script registering keyproxy, and keyproxy
    answers the completion protocol that script speaks with its own commands and options."""
    script = keyproxy("completion", shell, env=clean_env(home))
    assert script.returncode == 0
    marker = "#compdef keyproxy" if shell == "zsh" else "complete "
    assert marker in script.stdout
    assert "keyproxy" in script.stdout
    answers = tmp_path / "answers"
    for line, expected in (("keyproxy ro", {"rotate"}), ("keyproxy keys ", {"put", "status"})):
        env = clean_env(
            home,
            _ARGCOMPLETE="1",
            _ARGCOMPLETE_SHELL=shell,
            COMP_LINE=line,
            COMP_POINT=str(len(line)),
            _ARGCOMPLETE_STDOUT_FILENAME=str(answers),
        )
        done = keyproxy(env=env)
        assert done.returncode == 0, done.stderr
        found = {
            re.split(r"[:\s]", w, maxsplit=1)[0]
            for w in re.split(r"[\v\n]", answers.read_text())
            if w
        }
        assert expected <= found, found


def _dead_config(tmp_path: Path) -> Path:
    """A configuration whose Vault address has nothing listening."""
    issuer = {
        "name": "ci",
        "issuer": "https://ci.example.com",
        "jwks_uri": "https://ci.example.com/jwks",
        "audiences": ["keyproxy"],
        "algorithms": ["RS256"],
    }
    raw = _config(f"http://127.0.0.1:{free_port()}", tmp_path, "keyproxy/keys/dead", issuer)
    raw["vault"]["auth"] = {"method": "token"}
    path = tmp_path / "dead.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


EXPLAIN = ["--subject", "bot-1", "--path", "/v1/models"]


@pytest.mark.parametrize("empty", ["--id=", "--task=", "--subject="])
def test_a_revocation_naming_nothing_is_refused(tmp_path: Path, home: Path, empty: str) -> None:
    """`--task=` (an unset shell variable) names no token: a usage error, never "revoked"."""
    cfg = _dead_config(tmp_path)
    done = keyproxy("token", "revoke", empty, "--issuer", "ci", "-c", str(cfg), env=clean_env(home))
    assert done.returncode == 2, done.stderr
    assert "need a value" in done.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["explain", "--issuer", "ci", "--route", "apii", *EXPLAIN], "unknown route 'apii'"),
        (["explain", "--issuer", "cii", "--route", "api", *EXPLAIN], "unknown issuer 'cii'"),
        (["audit", "--route", "nope"], "unknown route 'nope'"),
        (["keys", "put", "antropic"], "unknown route 'antropic'"),
        (["rotate", "aip"], "unknown route 'aip'"),
        (["token", "issue", "--owner", "o", "--reason", "r", "--route", "ap"], "unknown route"),
        (["token", "revoke", "--issuer", "k8s", "--subject", "s"], "unknown issuer 'k8s'"),
    ],
)
def test_unknown_names_are_refused_before_any_vault_call(
    tmp_path: Path, home: Path, argv: list[str], message: str
) -> None:
    """A mistyped route or issuer is a usage error (exit 2) naming the name, never a Vault
    connection error: the check comes first (the file's Vault address has nothing behind it)."""
    cfg = _dead_config(tmp_path)
    env = clean_env(home, VAULT_TOKEN="unused")
    done = keyproxy(*argv, "-c", str(cfg), env=env, stdin="sk-typed-key\n")
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "configured" in done.stderr
    assert "reach" not in done.stderr
    assert done.stdout == ""


def test_a_known_name_does_reach_for_vault(tmp_path: Path, home: Path) -> None:
    """The control for the test above: with the route spelt right, `keys put` gets as far
    as Vault and fails there, so the address really has nothing behind it."""
    cfg = _dead_config(tmp_path)
    done = keyproxy(
        "keys",
        "put",
        "api",
        "-c",
        str(cfg),
        env=clean_env(home, VAULT_TOKEN="unused"),
        stdin="sk-typed-key\n",
    )
    assert done.returncode == 1
    assert "cannot reach Vault" in done.stderr


def test_a_key_that_is_not_utf8_text_is_refused_before_any_vault_call(
    tmp_path: Path, home: Path
) -> None:
    """`keys put` reads the key as bytes: one that is not UTF-8 text is a usage error naming
    that, not a traceback (a strict stdin) or a key of replacement characters, and it never
    reaches for Vault."""
    cfg = _dead_config(tmp_path)
    for encoding in ("utf-8:strict", "utf-8:surrogateescape"):
        done = subprocess.run(
            [KEYPROXY, "keys", "put", "api", "-c", str(cfg)],
            input=b"\xff\xfesk-not-utf8-0123456789\n",
            capture_output=True,
            env=clean_env(home, VAULT_TOKEN="unused", PYTHONIOENCODING=encoding),
            timeout=60,
            check=False,
        )
        assert done.returncode == 2, done.stderr
        assert b"the key on stdin is not UTF-8 text" in done.stderr
        assert b"Traceback" not in done.stderr
        assert b"reach" not in done.stderr


def test_a_close_name_is_suggested(tmp_path: Path, home: Path) -> None:
    """The error names the closest configured route."""
    done = keyproxy("keys", "put", "aip", "-c", str(_dead_config(tmp_path)), env=clean_env(home))
    assert "did you mean 'api'?" in done.stderr


def test_audit_without_a_configuration_warns_about_an_unseen_route(
    tmp_path: Path, home: Path
) -> None:
    """Without -c or KEYPROXY_CONFIG, `audit` cannot check the name, so it says on stderr
    which routes the logs do name when the one asked for is not among them."""
    log = tmp_path / "audit.jsonl"
    log.write_text(
        '{"event":"request","route":"api","key_version":1,"timestamp":"2026-01-01T00:00:00Z"}\n'
    )
    done = keyproxy("audit", "--route", "nope", str(log), env=clean_env(home))
    assert done.returncode == 0
    assert done.stdout == ""
    assert "routes seen: api" in done.stderr
    seen = keyproxy("audit", "--route", "api", str(log), env=clean_env(home))
    assert seen.stderr == ""
    assert seen.stdout.startswith("None None: 1 requests")


def test_audit_output_shows_controls_and_skips_what_is_no_event(tmp_path: Path, home: Path) -> None:
    """What agents name (a task, a subject) reaches the operator's terminal with its control
    characters (an escape sequence, C1, a right-to-left override) written as escapes, never
    obeyed; a line nested deeper than any event, or longer than a megabyte, is skipped, not
    the end of the query."""
    hostile = "t\x1b]0;OWNED\x07\u009b2J\u202eevil"
    event = {"event": "request", "route": "api", "key_version": 1, "token_id": "tok1"}
    lines = [
        json.dumps(event | {"timestamp": "2026-01-01T00:00:00Z", "task": hostile}),
        "[" * 100_000,
        "x" * (1024 * 1024 + 10),
        json.dumps(event | {"timestamp": "2026-01-01T00:00:01Z", "task": "ok", "token_id": "t2"}),
    ]
    log = tmp_path / "hostile.txt"  # not a log of the run's own, for the session's log scan
    log.write_text("\n".join(lines) + "\n")
    for argv in (["--route", "api"], ["--token", "tok1"]):
        done = keyproxy("audit", *argv, str(log), env=clean_env(home))
        assert done.returncode == 0, done.stderr
        assert "t\\u001b]0;OWNED\\u0007\\u009b2J\\u202eevil" in done.stdout, argv
        assert not text.hidden(done.stdout.replace("\n", "")), argv
    done = keyproxy("audit", "--route", "api", str(log), env=clean_env(home))
    assert "tasks ok" in done.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["audit"], "give --route"),
        (["audit", "--calls"], "give --route"),
        (["audit", "--route", "api", "--token", "t1"], "--token gives a tree"),
        (["audit", "--route", "api", "--task", "x"], "goes with --calls"),
    ],
)
def test_audit_refuses_options_it_would_not_use(
    tmp_path: Path, home: Path, argv: list[str], message: str
) -> None:
    """`audit` with no query, or with an option its query would not use (--token, or --task
    without --calls, beside --route), is a usage error (exit 2), never an answer that
    silently left the option out."""
    log = tmp_path / "audit.jsonl"
    log.write_text('{"event":"request","route":"api","key_version":1}\n', encoding="utf-8")
    done = keyproxy(*argv, str(log), env=clean_env(home))
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert done.stdout == ""


def test_token_revoke_records_without_a_store_it_cannot_set_up(
    openbao: OpenBaoDevServer, cfg_file: Path, home: Path
) -> None:
    """`token revoke` with a state store configured whose password file is not on this
    machine still records the revocation in Vault, and says it left the store alone."""
    raw = yaml.safe_load(cfg_file.read_text(encoding="utf-8"))
    raw["state"] = {"url": "redis://127.0.0.1:9", "password_file": str(home / "absent")}
    cfg_file.write_text(yaml.safe_dump(raw), encoding="utf-8")
    env = clean_env(home, VAULT_TOKEN=openbao.root_token)
    token_id = f"no-store-{uuid.uuid4().hex[:8]}"
    c = ["-c", str(cfg_file), "--as-operator"]
    done = keyproxy("token", "revoke", *c, "--id", token_id, "-o", "json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"revoked": {"id": token_id, "subject": None, "task": None}}
    assert "not using the state store (FileNotFoundError)" in done.stderr


def test_token_list_prints_one_line_a_token_whatever_its_owner(
    openbao: OpenBaoDevServer, cfg_file: Path, home: Path
) -> None:
    """An owner's name holding a line end prints as `\\u000a` inside its token's line: no
    owner can add a line of its own to the list of active exception tokens."""
    env = clean_env(home, VAULT_TOKEN=openbao.root_token)
    owner = f"ops-{uuid.uuid4().hex[:8]}"
    args = _issue_args(cfg_file)
    args[args.index("ops@example.com")] = f"{owner}\nforged-token  owner=root"
    issued = keyproxy(*args, env=env)
    assert issued.returncode == 0, issued.stderr
    CANARIES.add(issued.stdout.strip())
    listed = keyproxy("token", "list", "-c", str(cfg_file), "--as-operator", env=env)
    assert listed.returncode == 0, listed.stderr
    assert f"owner={owner}\\u000aforged-token  owner=root" in listed.stdout
    assert not any(line.startswith("forged") for line in listed.stdout.splitlines())
