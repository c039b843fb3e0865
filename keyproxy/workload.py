"""Reading the workload identity an agent presents to keyproxy (for `keyproxy run`).

    Identity("file", PATH)          a projected Kubernetes token, a SPIFFE JWT-SVID file...;
                                    re-read at each use (kubelet and SPIRE rotate it)
    Identity("env", VAR)            a variable of this process
    Identity("command", CMD)        what CMD prints (split like a shell, no shell run)
    Identity("github", AUDIENCE)    GitHub Actions' OIDC token for AUDIENCE

`Identity.hidden()` names the variables that hold or can mint the identity, which the
wrapped command must not see. Failures are `RunError`s that never quote the token.
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import aiohttp
import yarl

from keyproxy import capped, command, strictjson
from keyproxy.errors import RunError
from keyproxy.secret import Secret

TIMEOUT: Final = 30.0  # seconds for a command or GitHub to answer
MAX_SIZE: Final = 64 * 1024  # a JWT is a few KiB
GITHUB_VARS: Final = ("ACTIONS_ID_TOKEN_REQUEST_URL", "ACTIONS_ID_TOKEN_REQUEST_TOKEN")
KINDS: Final = ("file", "env", "command", "github")


@dataclass(frozen=True)
class Identity:
    """Where the workload identity comes from: its kind and argument (a path, a variable
    name, a command line, an audience; "" for GitHub's default audience)."""

    kind: str
    value: str

    def hidden(self) -> tuple[str, ...]:
        """The variables the wrapped command must not see: they hold, or mint, the identity."""
        # GitHub's request variables mint an identity whichever source this run reads.
        return (self.value, *GITHUB_VARS) if self.kind == "env" else GITHUB_VARS

    async def read(self, http: aiohttp.ClientSession, environ: Mapping[str, str]) -> Secret:
        """The identity token, read now."""
        if self.kind == "file":
            try:
                text = await asyncio.to_thread(_read_file, self.value)
            except OSError as exc:
                raise RunError(f"--identity-file {self.value}: {exc.strerror}") from None
        elif self.kind == "env":
            text = environ.get(self.value, "")
        elif self.kind == "command":
            text = await _command_output(self.value)
        else:
            text = await _github_token(http, environ, self.value)
        if not text.strip():
            raise RunError(f"the workload identity ({self.kind}) is empty")
        return Secret(text.strip())


def _read_file(path: str) -> str:
    """A regular file's text. Opened without waiting (a FIFO's writer could keep the read, and
    the wrapper's exit, waiting for ever) and refused unless it is a regular file (a projected
    token's symlink leads to one). A file longer than MAX_SIZE is refused, not cut short."""
    data = capped.read_file(path, MAX_SIZE)
    if data is None:
        raise RunError(f"--identity-file {path}: larger than {MAX_SIZE} bytes")
    return _text(data, f"--identity-file {path}")


async def _command_output(line: str) -> str:
    try:
        async with asyncio.timeout(TIMEOUT):
            done = await command.run(shlex.split(line), limit=MAX_SIZE)
    except TimeoutError:  # an OSError too: caught first
        raise RunError(f"--identity-command: no answer within {TIMEOUT:g} s") from None
    except (OSError, ValueError) as exc:
        raise RunError(f"--identity-command: cannot start it: {exc}") from None
    except command.CommandError as exc:
        raise RunError(f"--identity-command {exc}") from None
    if done.status != 0:
        raise RunError(f"--identity-command exited {done.status}")
    return _text(done.output, "--identity-command: its output")


def _text(data: bytes, what: str) -> str:
    """The token's text: UTF-8, or a RunError saying `what` is not (never quoting it)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise RunError(f"{what}: not UTF-8 text") from None


async def _github_token(
    http: aiohttp.ClientSession, environ: Mapping[str, str], audience: str
) -> str:
    """GitHub Actions' OIDC flow: GET the request URL (plus the audience) with the request
    token. The two variables exist only in a job with `permissions: id-token: write`."""
    url, token = (environ.get(name, "") for name in GITHUB_VARS)
    if not url or not token:
        raise RunError(f"--github-actions: {' and '.join(GITHUB_VARS)} are not set")
    try:
        target = yarl.URL(url).update_query(audience=audience) if audience else yarl.URL(url)
        timeout = aiohttp.ClientTimeout(total=TIMEOUT)
        headers = {"Authorization": f"bearer {token}"}
        async with http.get(target, headers=headers, timeout=timeout) as answer:
            if answer.status != 200:
                raise RunError(f"--github-actions: the token request answered {answer.status}")
            body = await capped.read_body(answer.content, MAX_SIZE)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise RunError(f"--github-actions: the token request failed: {exc!s:.200}") from None
    if body is None:
        raise RunError(f"--github-actions: the answer is larger than {MAX_SIZE} bytes")
    try:
        document = strictjson.loads(body)
    except ValueError as exc:  # strictjson's messages quote nothing
        raise RunError(f"--github-actions: the answer is unreadable ({exc})") from None
    value = document.get("value") if isinstance(document, dict) else None
    if not isinstance(value, str):
        raise RunError('--github-actions: the answer holds no "value" string')
    return value
