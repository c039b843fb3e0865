"""`keyproxy run`: a task token that lives exactly as long as one command.

    read the workload identity (keyproxy.workload) -> POST /token -> the SDK environment
    (keyproxy.sdkenv) -> start COMMAND -> POST /token/heartbeat while it runs (with an
    idle_ttl) -> COMMAND ends -> POST /token/revoke with the end reason -> COMMAND's status

The token reaches COMMAND only through its environment, fixed when it starts, so it is never
renewed: the ttl asked for must cover the task (a --timeout beyond it draws a warning). A
lease (idle_ttl) is kept alive by heartbeats instead, so the token dies soon after the
wrapper itself is killed by SIGKILL and cannot revoke it.

End reasons: `completed` (COMMAND exited 0), `failed` (non-zero, killed by a signal, could not
start, or the wrapper was stopped before it started), `timeout` (--timeout: SIGTERM, then
SIGKILL after --kill-after). SIGTERM, SIGINT and SIGHUP to the wrapper are passed on to
COMMAND, which gets --kill-after to exit. Every wait is bounded; revocation is tried a few
times and never holds up the exit for long. Nothing prints the token or the identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import structlog

from keyproxy import capped, strictjson, text
from keyproxy.errors import RunError
from keyproxy.sdkenv import VAULT_CREDENTIALS, RouteEnv, child_env
from keyproxy.secret import Secret, problem
from keyproxy.workload import Identity

EXCHANGE_TIMEOUT: Final = 30.0  # seconds for the exchange to answer
REVOKE_ATTEMPTS: Final = (0.0, 0.5, 1.5)  # delays before each revocation attempt
REVOKE_TIMEOUT: Final = 3.0  # seconds per attempt: the exit never waits much longer
FORWARDED: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_DUMPABLE: Final = 4  # linux/prctl.h
MAX_ANSWER: Final = 64 * 1024  # bytes of the exchange's answer read at most
MIN_IDLE_TTL: Final = 1.0  # seconds: the broker grants whole seconds, at least 2
MAX_SAID: Final = 256  # characters of a refusal's code and message, or of a token id, shown

log = structlog.get_logger("keyproxy.run")


# ------------------------------------------------------------------- the broker's endpoints


@dataclass(frozen=True)
class Issued:
    token: Secret
    token_id: str
    expires_in: float
    routes: tuple[str, ...]
    idle_ttl: float | None


Exchanged = tuple[Issued, Secret]  # the token issued, and the identity exchanged for it


async def exchange(
    http: aiohttp.ClientSession, proxy: str, identity: Secret, body: Mapping[str, Any]
) -> Issued:
    """POST /token (JSON form) with the identity as the Bearer credential."""
    headers = {"Authorization": f"Bearer {identity.reveal()}"}
    try:
        # SECURITY: no redirect is followed, here or by the heartbeats and the revocation.
        # The broker never redirects; across origins aiohttp drops the credential, and the
        # other origin's 401 to a request without one would pass for a revocation.
        async with http.post(
            f"{proxy}/token", json=body, headers=headers, allow_redirects=False
        ) as answer:
            got = _json(await capped.read_body(answer.content, MAX_ANSWER))
            if answer.status != 200:
                error = got.get("error") if isinstance(got, dict) else None
                said = (
                    f"{error.get('code')}: {error.get('message')}"[:MAX_SAID]
                    if isinstance(error, dict)
                    else ""
                )
                raise RunError(f"the exchange was refused: {answer.status} {said}".rstrip())
            return _issued(got)
    # OverflowError: a number JSON holds but a float cannot (expires_in: 1e400 written out).
    except (
        aiohttp.ClientError,
        TimeoutError,
        ValueError,
        KeyError,
        TypeError,
        OverflowError,
    ) as exc:
        raise RunError(f"the exchange at {proxy}/token failed: {_why(exc)}") from None


def _json(raw: bytes | None) -> Any:
    """An answer no larger than any of the broker's (MAX_ANSWER; None: larger), as JSON;
    ValueError if not."""
    if raw is None:
        raise ValueError(f"an answer over {MAX_ANSWER // 1024} KiB")
    return strictjson.loads(raw)  # nested too deep, a member twice: ValueError


def _issued(got: Any) -> Issued:
    """The broker's answer, each field of the type it must have (TypeError, ValueError,
    OverflowError: the answer is not the broker's)."""
    token, token_id, scope = got["access_token"], got["token_id"], got["scope"]
    if not isinstance(token, str) or problem(token) is not None:
        raise ValueError("the access_token is not a token")
    if not isinstance(token_id, str) or text.hidden(token_id) or len(token_id) > MAX_SAID:
        raise ValueError("the token_id is not an id")
    if not isinstance(scope, dict) or not all(isinstance(r, str) for r in scope):
        raise TypeError("the scope is not routes and their grants")
    idle = got.get("idle_ttl")
    # The heartbeats' pace is a third of it: a lease of no time, or of less than a second,
    # would have them sent as fast as the loop turns for as long as the command runs.
    if idle is not None and (
        isinstance(idle, bool) or not isinstance(idle, int | float) or idle < MIN_IDLE_TTL
    ):
        raise ValueError("the idle_ttl is not a lease of seconds")
    return Issued(
        Secret(token),
        token_id,
        float(got["expires_in"]),
        tuple(scope),
        float(idle) if idle is not None else None,
    )


async def heartbeats(
    http: aiohttp.ClientSession, proxy: str, issued: Issued, interval: float
) -> None:
    """POST /token/heartbeat every `interval` until cancelled or the token is refused."""
    headers = {"Authorization": f"Bearer {issued.token.reveal()}"}
    timeout = aiohttp.ClientTimeout(total=interval)
    while True:
        await asyncio.sleep(interval)  # the lease's pace, not a wait for state
        try:
            async with http.post(
                f"{proxy}/token/heartbeat", headers=headers, timeout=timeout, allow_redirects=False
            ) as answer:
                status = answer.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            # A stderr that cannot take the line must not end the heartbeats (as in _say).
            with contextlib.suppress(OSError, ValueError):
                log.warning("run.heartbeat_failed", token_id=issued.token_id, error=_why(exc))
            continue  # the next beat may reach it before the lease lapses
        if status in (401, 404, 405):
            why = "the token lapsed or was revoked" if status == 401 else "not supported"
            _say(f"the proxy refused the heartbeat ({status}: {why}); no more heartbeats")
            return


async def revoke(http: aiohttp.ClientSession, proxy: str, issued: Issued, reason: str) -> bool:
    """POST /token/revoke with the end reason, tried a few times, each bounded; True once
    the token is revoked (or already refused)."""
    headers = {"Authorization": f"Bearer {issued.token.reveal()}"}
    timeout = aiohttp.ClientTimeout(total=REVOKE_TIMEOUT)
    problem = ""
    for delay in REVOKE_ATTEMPTS:
        await asyncio.sleep(delay)  # back-off between attempts
        try:
            async with http.post(
                f"{proxy}/token/revoke",
                json={"reason": reason},
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            ) as answer:
                if answer.status in (200, 401):
                    return True
                problem = f"answered {answer.status}"
                if answer.status < 500:
                    break
        except (aiohttp.ClientError, TimeoutError) as exc:
            problem = _why(exc)
    _say(f"could not revoke token {issued.token_id} ({problem}); it lives until its expiry")
    return False


# ------------------------------------------------------------------- the whole run


@dataclass
class Run:
    """One `keyproxy run`: what to ask for and what to start."""

    proxy: str
    identity: Identity
    command: Sequence[str]
    body: dict[str, Any]  # the exchange's JSON: scope, task, intent, ttl, idle_ttl
    overrides: Mapping[str, RouteEnv] = field(default_factory=dict)
    timeout: float | None = None
    kill_after: float = 10.0
    # repr=False: it may hold the workload identity (--identity-env).
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ), repr=False)
    _proc: asyncio.subprocess.Process | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _signalled: int | None = None

    async def __call__(self) -> int:
        """COMMAND's exit status (128+N when signal N ended it); RunError before it starts."""
        loop = asyncio.get_running_loop()
        for sig in FORWARDED:
            loop.add_signal_handler(sig, self._forward, sig)
        try:
            async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=EXCHANGE_TIMEOUT)
            ) as http:
                return await self._run(http)
        finally:
            for sig in FORWARDED:
                loop.remove_signal_handler(sig)

    async def _run(self, http: aiohttp.ClientSession) -> int:
        proxy = self.proxy.rstrip("/")
        exchanged = await self._until_stopped(self._exchange(http, proxy))
        if self._signalled is not None:  # told to stop before COMMAND started
            if exchanged is not None:
                await revoke(http, proxy, exchanged[0], "failed")
            return 128 + self._signalled
        assert exchanged is not None
        issued, identity = exchanged
        status, timed_out = 1, False
        beats: asyncio.Task[None] | None = None
        # From here on the token is revoked however the run ends, an error too (a log line
        # that cannot be written: its stderr a pipe nobody reads any more).
        try:
            log.info("run.exchanged", token_id=issued.token_id, expires_in=issued.expires_in)
            env = child_env(
                self.environ,
                proxy,
                issued.token,
                token_id=issued.token_id,
                routes=issued.routes,
                overrides=self.overrides,
                hidden=(*self.identity.hidden(), *VAULT_CREDENTIALS),
                identity=identity,
                refused=sorted(set(self.body.get("scope", {})) - set(issued.routes)),
            )
            if issued.idle_ttl is not None:
                beats = asyncio.create_task(heartbeats(http, proxy, issued, issued.idle_ttl / 3))
            status, timed_out = await self._supervise(env)
        finally:
            if beats is not None:
                beats.cancel()
                # Whatever ended the heartbeats, the token is revoked below.
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await beats
            reason = "timeout" if timed_out else "completed" if status == 0 else "failed"
            await revoke(http, proxy, issued, reason)
        return status

    async def _exchange(self, http: aiohttp.ClientSession, proxy: str) -> Exchanged:
        """The token issued, and the identity it was issued for (kept from COMMAND)."""
        identity = await self.identity.read(http, self.environ)
        issued = await exchange(http, proxy, identity, self.body)
        asked = set(self.body.get("scope", {}))
        if missing := sorted(asked - set(issued.routes)):
            _say(f"warning: policy granted nothing on {', '.join(missing)}")
        if self.timeout is not None and self.timeout > issued.expires_in:
            _say(f"warning: the token expires in {issued.expires_in:g} s, before --timeout")
        if "idle_ttl" in self.body and issued.idle_ttl is None:
            _say("warning: the proxy granted no idle_ttl; the token lives its whole ttl")
        return issued, identity

    async def _until_stopped(self, work: Awaitable[Exchanged]) -> Exchanged | None:
        """`work`'s result, or None if a stop signal came first and `work` did not end within
        REVOKE_TIMEOUT more (it is then cancelled) or failed."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not task.done():
            # The broker may have signed the token already: a moment more for its answer, so
            # the token is revoked on the way out rather than left alive until its expiry.
            await asyncio.wait({task}, timeout=REVOKE_TIMEOUT)
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return None
            if task.exception() is not None:
                return None  # stopped anyway: nothing was issued to revoke
        result: Exchanged = task.result()
        return result

    async def _supervise(self, env: dict[str, str]) -> tuple[int, bool]:
        """Start COMMAND and wait for it: (exit status, whether --timeout ended it)."""
        try:
            self._proc = proc = await asyncio.create_subprocess_exec(*self.command, env=env)
        except FileNotFoundError:
            _say(f"{self.command[0]}: command not found")
            return 127, False
        except OSError as exc:
            _say(f"{self.command[0]}: {exc.strerror}")
            return 126, False
        if self._signalled is not None:  # arrived while it was being started
            proc.send_signal(self._signalled)
        waiter = asyncio.ensure_future(proc.wait())
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            done, _ = await asyncio.wait(
                {waiter, stop}, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED
            )
            timed_out = not done
            if timed_out:
                _say(f"{self.command[0]} ran past --timeout; sending SIGTERM")
                proc.terminate()
            if not waiter.done():
                try:
                    await asyncio.wait_for(asyncio.shield(waiter), self.kill_after)
                except TimeoutError:
                    _say(f"{self.command[0]} still runs {self.kill_after:g} s later; SIGKILL")
                    proc.kill()
                    await waiter
        finally:
            stop.cancel()
        code = waiter.result()
        return (128 - code if code < 0 else code), timed_out

    def _forward(self, sig: int) -> None:
        """A stop signal: passed on to COMMAND, which then has --kill-after to exit. Ctrl-C
        on the terminal reached COMMAND too (the same foreground process group): it is not
        sent twice, and COMMAND decides what it means (jupyter asks first)."""
        proc = self._proc
        if proc is not None and sig == signal.SIGINT and _terminal_sent_it():
            return
        self._signalled = sig
        self._stop.set()
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)


def undumpable() -> None:
    """SECURITY: COMMAND runs as this process's user, and a process of the same user may read
    this one's memory and the environment it started with (/proc/PID/environ still holds the
    identity variable COMMAND's own copy lacks) unless this process is not dumpable, as
    ssh-agent and gpg-agent make themselves (Linux's prctl PR_SET_DUMPABLE; elsewhere
    nothing). A user with CAP_SYS_PTRACE (root) can still read it."""
    if sys.platform != "linux":
        return
    import ctypes  # noqa: PLC0415  # here: a Python without _ctypes still runs every other command

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        error = os.strerror(ctypes.get_errno())
        raise RunError(f"cannot keep the identity from the command ({error})")


def _terminal_sent_it() -> bool:
    """Whether this process is in its terminal's foreground (stdin's) process group, where a
    SIGINT comes from Ctrl-C. Started without a stdin (`<&-`), Python has no sys.stdin: then
    no terminal, and the SIGINT is passed on (raised here, it was lost with the handler)."""
    if sys.stdin is None:
        return False
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError):
        return False


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _say(message: str) -> None:
    """One line for a person, on stderr. A stream that cannot take it (a pipe whose reader is
    gone, a log shipper that died) changes nothing the wrapper does: raised here, the error
    would skip what follows the line, the SIGTERM at --timeout or the start of a command
    whose token is then never revoked."""
    with contextlib.suppress(OSError, ValueError):  # ValueError: a closed stream
        print(f"keyproxy run: {message}", file=sys.stderr)  # noqa: T201  # a person reads it
