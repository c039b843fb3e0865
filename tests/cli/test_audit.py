"""`keyproxy audit` and `keyproxy token list --audit` on hostile logs, run as the real
command (subprocesses): what a log's texts hold never reaches the operator's terminal as
anything but text, and a malformed, foreign or forged line is skipped, never the end of the
answer."""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.cli import KEYPROXY, clean_env, keyproxy

AT = "2026-01-01T00:00:00Z"
REQUEST = {"event": "request", "route": "api", "issuer": "k8s", "key_version": 1, "timestamp": AT}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


def _log(tmp_path: Path, events: list[dict[str, Any]], *raw: str) -> Path:
    """The events as JSON lines, then `raw` lines as they are. Not named .jsonl: the session's
    log scan reads keyproxy's own logs, not the tests' made-up ones."""
    path = tmp_path / "hostile.txt"
    lines = [json.dumps(e) for e in events] + list(raw)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_a_line_end_in_a_logged_text_stays_inside_its_line(tmp_path: Path, home: Path) -> None:
    """A line end in a subject, a tool name or a task prints as `\\u000a` inside its own
    line: no text in the log can add a line of its own making to a table."""
    forged = "x\nk8s victim: 99 requests, key versions 1, tasks -, a .. b"
    log = _log(
        tmp_path,
        [
            REQUEST | {"subject": forged, "token_id": "t1", "task": forged},
            REQUEST | {"event": "mcp.call", "mcp_method": "tools/call", "mcp_tool": forged},
        ],
    )
    for argv, lines in (
        (["--route", "api"], 1),
        (["--route", "api", "--calls"], 2),
        (["--token", "t1"], 1),
    ):
        done = keyproxy("audit", *argv, str(log), env=clean_env(home))
        assert done.returncode == 0, done.stderr
        assert len(done.stdout.splitlines()) == lines, (argv, done.stdout)
        assert "x\\u000ak8s victim" in done.stdout, argv


@pytest.mark.parametrize("encoding", ["utf-8:surrogateescape", "utf-8:strict"])
def test_a_lone_surrogate_is_written_as_an_escape(
    tmp_path: Path, home: Path, encoding: str
) -> None:
    """A JSON escape of a lone surrogate is written as that escape: a stream with
    surrogateescape (Python's in the C and C.UTF-8 locales) would otherwise write the raw
    bytes it stands for (here C2 9B, a terminal's CSI in UTF-8), and a strict one stop the
    command in the middle of its answer."""
    task = "\udcc2\udc9b2J\udc1b]0;owned\udc07"
    log = _log(tmp_path, [REQUEST | {"subject": task, "task": task, "token_id": "t1"}])
    for argv in (["--route", "api"], ["--token", "t1"]):
        done = subprocess.run(
            [KEYPROXY, "audit", *argv, str(log)],
            capture_output=True,
            env=clean_env(home, PYTHONIOENCODING=encoding),
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert b"\\udcc2\\udc9b2J\\udc1b]0;owned\\udc07" in done.stdout, argv
        assert not {0x1B, 0x07, 0x9B, 0xC2} & set(done.stdout), argv


def test_a_tangled_tree_prints_every_token(tmp_path: Path, home: Path) -> None:
    """A delegation chain longer than any keyproxy makes, and a cycle of parents, print in
    table and JSON form (a tree as deep as the chain exhausted Python's stack); a token whose
    parent is not above it names that parent."""
    ids = [f"id{i}" for i in range(3000)]
    used = {"event": "request", "task": "t", "route": "api", "decision": "allow"}
    log = _log(
        tmp_path,
        [
            used | {"token_id": ids[-1], "chain": ",".join(ids), "timestamp": AT},
            used | {"token_id": "a", "chain": "a,b,a", "timestamp": AT},
        ],
    )
    done = keyproxy("audit", "--task", "t", str(log), env=clean_env(home))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3002
    assert any(line.startswith("a ") and "parent b" in line for line in lines)
    assert any(line.startswith("b ") and "parent a" in line for line in lines)
    done = keyproxy("audit", "--task", "t", "-o", "json", str(log), env=clean_env(home))
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["tokens"]) == 3000 - 16 + 2


def test_rotated_logs_and_stdin_are_read_whatever_their_bytes(tmp_path: Path, home: Path) -> None:
    """A log rotated and compressed with gzip is read decompressed (its events counted, not
    skipped as lines of noise); stdin is read as UTF-8 with a stray byte replaced, whatever
    the locale's strictness (a traceback under en_US.UTF-8); a compressed log cut short, a
    file or stdin, ends the command naming it, not with a traceback."""
    line = json.dumps(REQUEST | {"subject": "a"}).encode()
    rotated = tmp_path / "audit.log.1.gz"
    rotated.write_bytes(gzip.compress(line + b"\n"))
    plain = _log(tmp_path, [REQUEST | {"subject": "b"}])
    done = keyproxy("audit", "--route", "api", "-o", "json", str(rotated), str(plain),
                    env=clean_env(home))  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert [u["subject"] for u in answer["identities"]] == ["a", "b"]
    assert answer["skipped_lines"] == 0
    piped = subprocess.run(
        [KEYPROXY, "audit", "--route", "api"],
        input=b"\xff\xfe not a log\n" + line + b"\n",
        capture_output=True,
        env=clean_env(home, PYTHONIOENCODING="utf-8:strict"),
        timeout=60,
        check=False,
    )
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.startswith(b"k8s a: 1 requests")
    cut = tmp_path / "audit.log.2.gz"
    cut.write_bytes(gzip.compress(line + b"\n" * 1000)[:-12])
    done = keyproxy("audit", "--route", "api", str(cut), env=clean_env(home))
    assert done.returncode == 1
    assert done.stderr.startswith(f"keyproxy: cannot read {cut}: ")
    assert "Traceback" not in done.stderr
    piped = subprocess.run(  # the same log cut short, piped
        [KEYPROXY, "audit", "--route", "api"],
        input=cut.read_bytes(),
        capture_output=True,
        env=clean_env(home),
        timeout=60,
        check=False,
    )
    assert piped.returncode == 1
    assert piped.stderr.startswith(b"keyproxy: cannot read stdin: ")
    assert b"Traceback" not in piped.stderr


def test_the_table_says_how_many_lines_were_no_event(tmp_path: Path, home: Path) -> None:
    """A table has no place for the lines that were no audit event, so stderr counts them:
    an answer read from the wrong file (or one compressed in a form not read) does not look
    like an answer with nobody in it."""
    log = _log(tmp_path, [REQUEST | {"subject": "a", "token_id": "t1"}], "zstd noise", "{}")
    for argv in (["--route", "api"], ["--token", "t1"]):
        done = keyproxy("audit", *argv, str(log), env=clean_env(home))
        assert done.returncode == 0, done.stderr
        assert "2 lines skipped" in done.stderr, argv
        quiet = keyproxy("audit", *argv, "-o", "json", str(log), env=clean_env(home))
        assert quiet.stderr == "", argv


def _routes_config(tmp_path: Path) -> Path:
    """Routes a and b inject one key (the same field of one secret); c has a key of its own
    in another field of that secret."""
    (tmp_path / "jwks.json").write_text('{"keys": []}', encoding="utf-8")
    secret = {"path": "keyproxy/keys/shared"}
    route = {"upstream": "https://api.example.com", "inject": [{"header": "X-Api-Key"}]}
    raw = {
        "vault": {"addr": "http://127.0.0.1:1", "auth": {"method": "token"}},
        "identity": {
            "issuers": [
                {"name": "k8s", "issuer": "https://k8s.example", "audiences": ["keyproxy"],
                 "algorithms": ["RS256"], "jwks_file": str(tmp_path / "jwks.json")}
            ]
        },
        "routes": {
            "a": route | {"secret": secret},
            "b": route | {"secret": secret},
            "c": route | {"secret": secret | {"field": "other"}},
        },
        "policies": [],
    }  # fmt: skip
    path = tmp_path / "keyproxy.yaml"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


def test_the_blast_radius_of_a_key_covers_every_route_that_sends_it(
    tmp_path: Path, home: Path
) -> None:
    """With the configuration, `--route a --key-version 3` counts the requests of every
    route injecting the same key (b too, and says so on stderr): version 3 of it leaked
    whichever route sent it. A route with another key (c) is not counted."""
    log = _log(
        tmp_path,
        [
            REQUEST | {"route": route, "subject": route, "key_version": 3}
            for route in ("a", "b", "c")
        ],
    )
    cfg = _routes_config(tmp_path)
    done = keyproxy("audit", "-c", str(cfg), "--route", "a", "--key-version", "3", "-o",
                    "json", str(log), env=clean_env(home))  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["routes"] == ["a", "b"]
    assert [(u["subject"], u["routes"]) for u in answer["identities"]] == [
        ("a", ["a"]),
        ("b", ["b"]),
    ]
    assert "routes a, b inject the same key" in done.stderr


def test_a_terminal_without_the_characters_gets_escapes(tmp_path: Path, home: Path) -> None:
    """A subject in a script the terminal's encoding lacks is written as escapes, not the
    end of the command partway through its answer (the identities after it unprinted)."""
    names = ("\u4e2d\u6587", "\u00e9", "z")
    log = _log(tmp_path, [REQUEST | {"subject": name} for name in names])
    done = keyproxy("audit", "--route", "api", str(log),
                    env=clean_env(home, PYTHONIOENCODING="ascii"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [line.split(":")[0] for line in done.stdout.splitlines()] == [
        "k8s z",
        "k8s \\xe9",
        "k8s \\u4e2d\\u6587",
    ]


def test_two_tasks_that_differ_never_print_alike(tmp_path: Path, home: Path) -> None:
    """A task named as another with a character that shows nothing (a zero-width space, a
    line separator, a tag character) prints with that character as an escape: a look-alike
    of a task cannot pass for it in a table."""
    lookalikes = ["t-1", "t-1\u200b", "t-1\u2028", "t-1\U000e0041"]
    log = _log(
        tmp_path,
        [REQUEST | {"token_id": f"tok{i}", "task": t} for i, t in enumerate(lookalikes)],
    )
    done = keyproxy("audit", "--route", "api", str(log), env=clean_env(home))
    assert done.returncode == 0, done.stderr
    assert "tasks t-1, t-1\\u200b, t-1\\u2028, t-1\\U000e0041," in done.stdout
    for i, shown in enumerate(["t-1 ", "t-1\\u200b ", "t-1\\u2028 ", "t-1\\U000e0041 "]):
        tree = keyproxy("audit", "--token", f"tok{i}", str(log), env=clean_env(home))
        assert f"task {shown}" in tree.stdout, tree.stdout


def test_a_key_is_asked_for_by_version_or_fingerprint_with_a_route_alone(
    tmp_path: Path, home: Path
) -> None:
    """`--key-fingerprint` counts one key's requests whatever version served them, and the
    JSON names it; a fingerprint keyproxy would not write, both ways of naming the key, or
    either without `--route` (a tree) or with `--calls` is a usage error (2), never an
    option quietly dropped."""
    log = _log(
        tmp_path,
        [
            REQUEST | {"subject": "a", "key_fingerprint": "c0ffee5e1f2a"},
            REQUEST | {"subject": "b", "key_version": 2, "key_fingerprint": "d15ea5e0b7a1"},
            REQUEST | {"subject": "c", "key_version": 3, "key_fingerprint": "c0ffee5e1f2a"},
        ],
    )
    done = keyproxy(
        "audit", "--route", "api", "--key-fingerprint", "C0FFEE5E1F2A", "--json", str(log),
        env=clean_env(home),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert [u["subject"] for u in answer["identities"]] == ["a", "c"]
    assert (answer["key_fingerprint"], answer["key_fingerprints"]) == (
        "c0ffee5e1f2a",
        ["c0ffee5e1f2a"],
    )
    by_version = keyproxy(
        "audit", "--route", "api", "--key-version", "3", str(log), env=clean_env(home)
    )
    assert by_version.returncode == 0, by_version.stderr
    assert [line.split(":")[0] for line in by_version.stdout.splitlines()] == ["k8s a", "k8s c"]
    assert "key version 3 holds key c0ffee5e1f2a" in by_version.stderr
    unknown = keyproxy(
        "audit", "--route", "api", "--key-version", "9", str(log), env=clean_env(home)
    )
    assert unknown.returncode == 0, unknown.stderr
    assert "no event of the input names the key of version 9" in unknown.stderr
    digits, alone = "a key fingerprint is 12 hexadecimal digits", "go with --route alone"
    for argv, why in (
        (["--route", "api", "--key-fingerprint", "c0ffee5e1f2"], digits),
        (["--route", "api", "--key-fingerprint", "c0ffee5e1f2g"], digits),
        (
            ["--route", "api", "--key-fingerprint", "c0ffee5e1f2a", "--key-version", "1"],
            "not allowed with argument",
        ),
        (["--route", "api", "--calls", "--key-version", "1"], alone),
        (["--task", "t", "--key-fingerprint", "c0ffee5e1f2a"], alone),
        (["--token", "t", "--key-version", "1"], alone),
    ):
        refused = keyproxy("audit", *argv, str(log), env=clean_env(home))
        assert refused.returncode == 2, (argv, refused.stdout)
        assert why in refused.stderr, argv
