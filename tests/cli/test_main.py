"""`keyproxy check` (keyproxy.cli), run as operators run it: the message on stderr, exit 2,
nothing on stdout."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from keyproxy.cli import main
from keyproxy.devca import DevCA
from tests.helpers.cli import keyproxy
from tests.helpers.configs import BASE, CONFIG_TEXT, with_setting

GOOD = CONFIG_TEXT


ANOTHER_OPENAI = """\
  openai:
    upstream: https://collector.example
    secret: {path: keyproxy/keys/openai}
    inject: [{header: Authorization, format: "Bearer {key}"}]
policies:"""


def _check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "keyproxy.yaml"
    path.write_text(text)
    return keyproxy("check", "-c", str(path), env=None)


def test_a_good_file_is_ok(tmp_path: Path) -> None:
    """The file the mistakes below are made in passes: exit 0, the summary on stdout."""
    done = _check(tmp_path, GOOD)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.endswith(": ok (1 routes, 1 policies, 1 issuers)\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            GOOD.replace("policies:", ANOTHER_OPENAI),
            "routes.openai: duplicate key (first at line 11, again at line 15)",
            id="duplicate-route",
        ),
        pytest.param(
            GOOD.replace("    secret:", "\tsecret:"),
            "not valid YAML at line 13, column 1: while scanning for the next token, found "
            "character '\\t' that cannot start any token; indent with spaces, YAML does not "
            "allow tabs there",
            id="tab",
        ),
        pytest.param(
            GOOD.replace("      openai: {", "      opnai: {"),
            "policies[0] (summarizer).allow.opnai: unknown route 'opnai', did you mean openai?",
            id="policy-route-typo",
        ),
        pytest.param("# to do\n", "the configuration is empty", id="empty"),
    ],
)
def test_a_mistake_is_printed_and_exits_2(tmp_path: Path, text: str, message: str) -> None:
    """`keyproxy check` prints the whole message on stderr, nothing on stdout, and exits 2."""
    done = _check(tmp_path, text)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith(f"keyproxy: configuration error: {message}")
    assert done.stderr.count("\n") == 1  # one line, no traceback


@pytest.mark.parametrize(
    ("upstream", "message"),
    [
        ("http://0177.0.0.1", "routes.openai.upstream: 0177.0.0.1 is not a dotted-decimal IPv4"),
        ("http://127.1:8080", "routes.openai.upstream: 127.1 is not a dotted-decimal IPv4"),
        ("http://169.254.169.254", "routes.openai.upstream: 169.254.169.254 is not a global"),
        ("http://[::1]:8080", "routes.openai.upstream: [::1] is not a global address (loopback)"),
    ],
)
def test_an_upstream_the_fence_refuses_fails_the_check(
    tmp_path: Path, upstream: str, message: str
) -> None:
    """`keyproxy check` refuses an IP-literal upstream every request would be refused for."""
    text = GOOD.replace("https://api.openai.com", f"{upstream}\n    allow_http: true")
    done = _check(tmp_path, text)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith(f"keyproxy: configuration error: {message}")


def test_a_missing_credential_file_is_a_warning(tmp_path: Path) -> None:
    """`keyproxy check` warns about a credential file it cannot find, and still exits 0."""
    auth = f"  auth: {{method: approle, role_id_file: {tmp_path}/r, secret_id_file: {tmp_path}/s}}"
    text = GOOD.replace("  addr: http://127.0.0.1:8200", "  addr: http://127.0.0.1:8200\n" + auth)
    (tmp_path / "s").write_text("s")
    done = _check(tmp_path, text)
    assert done.returncode == 0
    assert done.stderr == (
        f"keyproxy: warning: vault.auth.role_id_file: {tmp_path}/r: No such file or directory"
        ": serve here could not log in\n"
    )


def test_check_command_exits_2_with_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`keyproxy check` prints the YAML path of the mistake and exits 2; a good file exits 0."""
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE))
    assert main(["check", "-c", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_setting("routes.openai.inject.0.header", "Bad Header")))
    assert main(["check", "-c", str(bad)]) == 2
    assert "routes.openai.inject[0].header: " in capsys.readouterr().err
    assert main(["check", "-c", str(tmp_path / "missing.yaml")]) == 2


def test_tls_files_that_would_not_load_are_warnings(tmp_path: Path) -> None:
    """`keyproxy check` warns about each TLS file that is missing, unreadable or unparsable,
    and about a key not matching its certificate, naming the setting and the path and quoting
    nothing of the files; it still exits 0."""
    ca = DevCA("example.org")
    _, key = ca.server_cert().write(tmp_path, "server")
    other_cert, _ = ca.server_cert().write(tmp_path, "other")
    canary = "SECRET-KEY-MATERIAL-" + "x" * 40
    bad_key = tmp_path / "bad.key"
    bad_key.write_text(f"-----BEGIN PRIVATE KEY-----\n{canary}\n-----END PRIVATE KEY-----\n")
    bad_bundle = tmp_path / "bundle.json"
    bad_bundle.write_text('{"keys": "none"}')
    cfg = dict(BASE)
    cfg["server"] = {
        "tls": {
            "certificate": str(tmp_path / "missing.crt"),
            "key": str(bad_key),
            "client_auth": "optional",
            "trust_bundles": {"example.org": str(bad_bundle)},
        },
        "admin": {"tls": {"certificate": str(other_cert), "key": str(key)}},
    }
    done = _check(tmp_path, yaml.safe_dump(cfg))
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        f"keyproxy: warning: server.tls.certificate: cannot read {tmp_path}/missing.crt:"
        " No such file or directory: serve here would not start",
        f"keyproxy: warning: server.tls.key: {bad_key}: not an unencrypted PEM private key"
        ": serve here would not start",
        f"keyproxy: warning: server.tls.trust_bundles.example.org: {bad_bundle}: not a trust"
        " bundle: a SPIFFE bundle is a JWK set with a 'keys' list: serve here would not start",
        "keyproxy: warning: server.admin.tls: cannot load the TLS files:"
        " KEY_VALUES_MISMATCH: serve here would not start",
    ]
    assert canary not in done.stderr + done.stdout
