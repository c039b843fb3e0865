"""Script calls of one event-loop turn sent together: one write and one read for many requests.

A worker under load starts several requests in each turn of its event loop (one wakeup hands
it many ready sockets), and each request's limit decision is one EVALSHA. Sent one by one
through redis-py's client, each call pays its whole per-command cost: the connection pool and
its lock, every argument encoded in Python, a write, a read under a timeout of its own and a
wakeup, about 90-120 us of CPU. `ScriptBatch` queues the calls made in one turn and sends them
when the turn ends, as one pipeline on one pooled connection: each call packed by hiredis's C
packer when it is queued, one write, and the replies read back in order by the connection's
own reply parser (hiredis), most of them from the buffer the first read filled.

Each call keeps its own semantics. Redis runs each script atomically and the pipelined calls
one after another, as it would run them from separate connections, so a decision stays all
or nothing and `max_uses` stays exact. Each caller gets its own reply, or its own error reply
(returned, not raised: a script error is that call's, not the batch's); a round trip that
fails (refused, reset, timed out) fails every call in it with `StoreUnavailable`, through
the store's own fault handling (`call`: its deadline, connection gate and backoff). A reply
of NOSCRIPT (a restarted or failed-over server lost its scripts; the script did not run)
loads the script and sends the calls that met it again, on the same connection and within
the same deadline. A reply of READONLY (the connection still reaches a primary that became a
replica) closes the connection, so the next round trip connects afresh. A call whose caller
was cancelled before the turn ended is not sent.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import hiredis
import redis.asyncio
import redis.exceptions

# Runs one round trip under the store's fault handling; raises StoreUnavailable.
Call = Callable[[Callable[[], Awaitable[list[Any]]]], Awaitable[list[Any]]]


class ScriptBatch:
    """Calls of one Lua script on `client`, those of each loop turn sent in one pipeline."""

    def __init__(self, client: redis.asyncio.Redis, script: str, call: Call) -> None:
        self._pool = client.connection_pool
        self._script = script
        self._sha = hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest()
        self._call = call
        self._queued: list[tuple[bytes, asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def run(self, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        """The script's reply for `keys` and `args`, or its error reply as a `ResponseError`
        (returned, not raised). Raises `StoreUnavailable` when the round trip failed."""
        loop = asyncio.get_running_loop()
        if not self._queued:
            # Its first step runs once every callback ready in this turn has run: the
            # requests of this turn are all queued by then.
            task = loop.create_task(self._send())
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        future: asyncio.Future[Any] = loop.create_future()
        words = ("EVALSHA", self._sha, len(keys), *keys, *args)
        command = hiredis.pack_command(words)  # type: ignore[arg-type]  # its stub: a 1-tuple
        self._queued.append((command, future))
        return await future

    async def _send(self) -> None:
        # Calls whose caller went away meanwhile (their future was cancelled) are not sent.
        queued = [(command, future) for command, future in self._queued if not future.done()]
        self._queued = []
        if not queued:
            return
        try:
            replies = await self._call(lambda: self._round_trip([c for c, _ in queued]))
        except asyncio.CancelledError:  # the store is closing
            for _, future in queued:
                future.cancel()
            raise
        except Exception as error:  # noqa: BLE001  # StoreUnavailable, or a bug: no caller waits forever
            for _, future in queued:
                if not future.done():
                    future.set_exception(error)
        else:
            for (_, future), reply in zip(queued, replies, strict=True):
                if not future.done():
                    future.set_result(reply)

    async def _round_trip(self, commands: list[bytes]) -> list[Any]:
        connection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            replies = await _exchange(connection, commands)
            lost = [i for i, reply in enumerate(replies) if isinstance(reply, _NOSCRIPT)]
            if lost:
                await connection.send_command("SCRIPT", "LOAD", self._script)
                await connection.read_response()
                again = await _exchange(connection, [commands[i] for i in lost])
                for i, reply in zip(lost, again, strict=True):
                    replies[i] = reply
            if any(isinstance(reply, _READONLY) for reply in replies):
                # It reaches a replica (a failover behind the same address): the next round
                # trip connects to whichever server that is now.
                await connection.disconnect()
        except BaseException:
            # Replies may still be on their way: the connection must not be reused.
            await connection.disconnect(nowait=True)
            raise
        finally:
            await self._pool.release(connection)
        return replies

    async def close(self) -> None:
        """Stop the round trips under way; their callers see a cancellation."""
        for task in list(self._sending):
            task.cancel()
        if self._sending:
            await asyncio.wait(self._sending)


_NOSCRIPT = redis.exceptions.NoScriptError
_READONLY = redis.exceptions.ReadOnlyError


async def _exchange(connection: Any, commands: list[bytes]) -> list[Any]:
    """Send `commands` in one write; their replies in order, error replies as exceptions."""
    await connection.send_packed_command(b"".join(commands))
    replies: list[Any] = []
    for _ in commands:
        try:
            replies.append(await connection.read_response())
        except redis.exceptions.ResponseError as error:  # this call's own error reply
            replies.append(error)
    return replies


__all__ = ["ScriptBatch"]
