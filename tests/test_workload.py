"""keyproxy.workload: the workload identity `keyproxy run` reads from a file, a variable, a
command or GitHub Actions' OIDC endpoint (here a loopback server speaking its protocol)."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from keyproxy import workload
from keyproxy.errors import RunError
from keyproxy.workload import GITHUB_VARS, Identity
from tests.helpers.polling import eventually, finishes
from tests.helpers.processes import Helpers, running
from tests.helpers.servers import serve


async def test_a_file_is_read_again_at_each_use(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A projected token file is re-read (kubelet rotates it), trimmed of its newline; GitHub's
    request variables, which mint an identity, are hidden from the command whatever the source."""
    path = tmp_path / "token"
    identity = Identity("file", str(path))
    path.write_text("first\n")
    assert (await identity.read(http, {})).reveal() == "first"
    path.write_text("second")
    assert (await identity.read(http, {})).reveal() == "second"
    assert identity.hidden() == GITHUB_VARS


async def test_a_variable_is_read_and_hidden(http: aiohttp.ClientSession) -> None:
    """--identity-env reads the variable, which the command must not see."""
    identity = Identity("env", "ID_TOKEN")
    assert (await identity.read(http, {"ID_TOKEN": "jwt"})).reveal() == "jwt"
    assert identity.hidden() == ("ID_TOKEN", *GITHUB_VARS)


async def test_a_command_prints_it(http: aiohttp.ClientSession) -> None:
    """--identity-command runs the command (no shell) and takes what it printed."""
    command = shlex.join([sys.executable, "-c", "print('from-command')"])
    assert (await Identity("command", command).read(http, {})).reveal() == "from-command"


@pytest.mark.parametrize(
    ("identity", "said"),
    [
        (Identity("file", "/nonexistent/token"), "--identity-file"),
        (Identity("env", "UNSET"), "empty"),
        (Identity("command", shlex.join([sys.executable, "-c", "exit(4)"])), "exited 4"),
        (Identity("command", "/nonexistent/helper"), "cannot start"),
        (Identity("command", shlex.join(["printf", r"\377"])), "its output: not UTF-8"),
        (Identity("github", "keyproxy"), "ACTIONS_ID_TOKEN_REQUEST_URL"),
    ],
)  # fmt: skip
async def test_no_identity_is_one_clear_error(
    identity: Identity, said: str, http: aiohttp.ClientSession
) -> None:
    """A missing file, an unset variable, a failing command (or one printing no text) or a
    job without id-token permission is a RunError saying which."""
    with pytest.raises(RunError, match=said):
        await identity.read(http, {})


async def test_an_identity_file_that_is_no_regular_file_is_refused_at_once(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A FIFO (whose writer could keep the read, and the wrapper's exit, waiting for ever) or
    a directory is refused at once, saying so; a symlink to a regular file (a projected
    token's) is read."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (fifo, tmp_path):
        with pytest.raises(RunError, match=r"not a regular file|Is a directory"):
            await asyncio.wait_for(Identity("file", str(path)).read(http, {}), 5)
    (tmp_path / "token").write_text("jwt\n")
    (tmp_path / "link").symlink_to(tmp_path / "token")
    assert (await Identity("file", str(tmp_path / "link")).read(http, {})).reveal() == "jwt"


async def test_github_actions_flow(http: aiohttp.ClientSession) -> None:
    """GET ACTIONS_ID_TOKEN_REQUEST_URL plus the audience with the request token as bearer
    answers {"value": token}; both variables are hidden from the command."""
    asked: list[tuple[str, str, str]] = []

    async def token(request: web.Request) -> web.Response:
        asked.append(
            (
                request.query.get("api-version", ""),
                request.query.get("audience", ""),
                request.headers.get("Authorization", ""),
            )
        )
        return web.json_response({"count": 1, "value": "gh-oidc-jwt"})

    app = web.Application()
    app.router.add_get("/token", token)
    runner, port = await serve(app)
    try:
        environ = dict(
            zip(GITHUB_VARS, [f"http://127.0.0.1:{port}/token?api-version=2.0", "req"], strict=True)
        )
        identity = Identity("github", "keyproxy")
        assert (await identity.read(http, environ)).reveal() == "gh-oidc-jwt"
    finally:
        await runner.cleanup()
    assert asked == [("2.0", "keyproxy", "bearer req")]
    assert identity.hidden() == GITHUB_VARS


async def test_a_command_leaving_a_helper_on_its_output_ends_at_the_timeout(
    helpers: Helpers, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--identity-command that exits leaving a helper holding its stdout is a RunError at the
    timeout, not a hang, and the helper is killed with it."""
    # Long enough for the shell to start its helper and record it first, on a loaded machine.
    monkeypatch.setattr(workload, "TIMEOUT", 2.0)
    identity = Identity("command", shlex.join(helpers.command(then="echo partial")))
    with pytest.raises(RunError, match=r"no answer within 2 s"):
        await finishes(identity.read(http, {}), "the read ends at its timeout")
    _, helper = await helpers.started()
    await eventually(lambda: not running(helper), "the helper is killed")


async def test_a_cancelled_read_ends_the_command_and_its_helper(
    helpers: Helpers, http: aiohttp.ClientSession
) -> None:
    """`keyproxy run` interrupted while its identity command runs leaves nothing running."""
    identity = Identity("command", shlex.join(helpers.command(then="wait")))
    read = asyncio.ensure_future(identity.read(http, {}))
    shell, helper = await helpers.started()
    read.cancel()
    with pytest.raises(asyncio.CancelledError):
        await finishes(read, "the cancelled read ends")
    await eventually(lambda: not running(shell), "the command is killed")
    await eventually(lambda: not running(helper), "the helper is killed")


async def test_a_command_printing_too_much_is_refused_not_cut(
    http: aiohttp.ClientSession,
) -> None:
    """Output past MAX_SIZE is a RunError quoting none of it, not a token cut short."""
    printing = f"print('canary' * {workload.MAX_SIZE // 6 + 1})"
    identity = Identity("command", shlex.join([sys.executable, "-c", printing]))
    with pytest.raises(RunError, match=f"more than {workload.MAX_SIZE} bytes") as caught:
        await finishes(identity.read(http, {}), "the read ends")
    assert "canary" not in str(caught.value)


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b"eyJ\xff\xfe-canary", "not UTF-8 text"),
        (b"canary" * (workload.MAX_SIZE // 6 + 1), f"larger than {workload.MAX_SIZE} bytes"),
    ],
)  # fmt: skip
async def test_an_unusable_token_file_is_one_clear_error(
    content: bytes, said: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A token file that is not UTF-8, or larger than MAX_SIZE (never sent cut short), is a
    RunError naming the file and quoting none of it."""
    path = tmp_path / "token"
    path.write_bytes(content)
    with pytest.raises(RunError, match=said) as caught:
        await Identity("file", str(path)).read(http, {})
    assert str(path) in str(caught.value)
    assert "canary" not in str(caught.value)


@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (json.dumps({"value": "canary" * (workload.MAX_SIZE // 6)}).encode(), "larger than"),
        (b"<html>canary</html>", "unreadable"),
        (b'{"value": "canary-1", "value": "canary-2"}', "unreadable"),
        (b'{"value": ["canary"]}', 'no "value" string'),
    ],
)  # fmt: skip
async def test_an_unusable_github_answer_is_one_clear_error(
    answer: bytes, said: str, http: aiohttp.ClientSession
) -> None:
    """GitHub's answer is read up to MAX_SIZE and as strict JSON: a larger one, one that is
    not JSON, that gives `value` twice or as no string is a RunError quoting none of it."""

    async def token(request: web.Request) -> web.Response:
        return web.Response(body=answer, content_type="application/json")

    app = web.Application()
    app.router.add_get("/token", token)
    runner, port = await serve(app)
    try:
        environ = dict(zip(GITHUB_VARS, [f"http://127.0.0.1:{port}/token", "req"], strict=True))
        with pytest.raises(RunError, match=said) as caught:
            await finishes(Identity("github", "keyproxy").read(http, environ), "the read ends")
    finally:
        await runner.cleanup()
    assert "canary" not in str(caught.value)
