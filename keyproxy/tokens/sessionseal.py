"""MCP session ids bound to the caller that opened them (docs/mcp.md, "Sessions").

Every caller of an MCP route reaches its server with the same key, so the server cannot tell
them apart: the session id is all that names a session. keyproxy seals the id the server
gives (its answer's `Mcp-Session-Id`) with a MAC of the route, the caller and the id, and
opens it on the way in. A caller presenting a session id another caller was given, or one it
made up, gets the 404 a server gives for a session it does not know, and its request never
reaches the server. The caller is the workload identity (a task token exchanged for it is
the same caller); a delegated token and an exception token are each a caller of their own.

    SessionSeal(vault, config)              the MAC key, in Vault KV beside the revocation list
    await seal.prepare(config)              follow a configuration, the key loaded if needed
    await seal.run()                        until cancelled: load it whenever it is missing
    seal.held() -> None                     Unavailable (503) until the key is read
    seal.seal(server_id, bound) -> str      the id the caller is given
    seal.open(presented, bound) -> str      the server's id, or NotFound / Unavailable
    binding(route, identity, task) -> bytes what a session is bound to
    sealed(key, server_id, bound) -> str    the seal itself, given the key

The key is 32 random bytes under `tokens.state_path`/mcp-session-key, created by whichever
replica needs it first (a write with cas=0; a replica that loses the race reads the winner's),
so every replica opens what any of them sealed. It is read once, never per request, and
registered with the log scrubber as it is read.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
from typing import Final

import structlog

from keyproxy import secret
from keyproxy.caller import Identity
from keyproxy.config import Config
from keyproxy.errors import NotFound, Unavailable, VaultError
from keyproxy.tokens.format import TaskToken
from keyproxy.tokens.shared import encoded, read_state
from keyproxy.vault import CasConflict, Vault

log = structlog.get_logger("keyproxy.tokens")

KEY_PATH: Final = "mcp-session-key"  # under tokens.state_path
PREFIX: Final = "kp1."  # a sealed id: PREFIX, the MAC, ".", the server's id
_MAC_CHARS: Final = 22  # of the MAC's base64url text: 132 of its 256 bits
_KEY_BYTES: Final = 32
_FIRST_RETRY: Final = 1.0  # seconds before loading a missing key again, doubling
_LAST_RETRY: Final = 30.0
_RETRY_AFTER: Final = 5  # seconds a 503 for a missing key tells the caller to wait


def binding(route: str, identity: Identity, task: TaskToken | None = None) -> bytes:
    """What a session is bound to: the route and the caller (its identity's issuer and
    subject; and a delegated or exception token's own id), encoded so that no two different
    callers give the same bytes. SECURITY: a delegated token keeps its root's identity, yet
    is another agent, and every exception token of an owner has the same one."""
    own = task.token_id if task is not None and (task.ancestors or task.exception_owner) else None
    return json.dumps([route, identity.issuer, identity.subject, own]).encode()


class SessionSeal:
    """Seals and opens MCP session ids with a key every replica shares."""

    def __init__(self, vault: Vault, config: Config) -> None:
        self._vault = vault
        self._key: bytes | None = None
        self._place: tuple[str, str] = ("", "")  # (KV mount, path) the key is read from
        self._loaded_from: tuple[str, str] | None = None
        self._needed = False
        self._wake = asyncio.Event()
        self.follow(config)

    def follow(self, config: Config) -> None:
        """Take the key's place from `config`, and whether any route needs it (an MCP route).
        A key from another place keeps sealing until the new place's is loaded (`run`)."""
        self._place = (config.vault.kv_mount, f"{config.tokens.state_path}/{KEY_PATH}")
        self._needed = any(route.kind == "mcp" for route in config.routes.values())
        if self.missing:
            self._wake.set()

    @property
    def missing(self) -> bool:
        """Whether a route needs the key and the one held is not from the current place."""
        return self._needed and self._loaded_from != self._place

    async def prepare(self, config: Config) -> None:
        """Follow `config`, and load the key now if it needs one it lacks (at a start, and
        at a reload before the swap, so a new MCP route serves at once). A failure is
        logged, and `run` tries again."""
        self.follow(config)
        if self.missing:
            await self._try_load()

    async def _try_load(self) -> bool:
        """`load`, a failure logged: whether the key is now the current place's."""
        try:
            await self.load()
        except Exception as exc:  # noqa: BLE001  # whatever it was, MCP routes answer 503
            log.warning("mcp_session_key_unavailable", error=str(exc))
        return not self.missing

    async def load(self) -> None:
        """Read the key, creating it first if there is none (VaultError: not read)."""
        place = self._place
        mount, path = place
        for _ in range(3):  # a lost race to create it is read on the next turn
            data, version = await read_state(self._vault, mount, path)
            text = data.get("key")
            if version and isinstance(text, str):
                secret.register(text)  # SECURITY: never in a log line, whoever logs it
                key = base64.b64decode(text.encode(), validate=True)
                if len(key) < _KEY_BYTES:
                    raise VaultError(f"read {mount}/{path}: the key is too short")
                if place != self._place:  # a reload moved it while this read ran
                    self._wake.set()
                    return
                self._key, self._loaded_from = key, place
                log.info("mcp_session_key_loaded", path=path)
                return
            if version:
                raise VaultError(f"read {mount}/{path}: no key in it")
            created = base64.b64encode(secrets.token_bytes(_KEY_BYTES)).decode()
            secret.register(created)
            try:
                await self._vault.write_kv(mount, path, encoded({"key": created}, path), cas=0)
            except CasConflict:
                continue
        raise VaultError(f"write {mount}/{path}: created and replaced again and again")

    async def run(self) -> None:
        """Until cancelled: load the key whenever a route needs it and it is missing, again
        after a growing pause while Vault cannot give it."""
        pause = _FIRST_RETRY
        while True:
            await self._wake.wait()
            self._wake.clear()
            # SECURITY: nothing raised here may end the task group it runs in, with the
            # revocation poll beside it (`_try_load` logs whatever it was).
            while self.missing and not await self._try_load():
                await asyncio.sleep(pause)
                pause = min(_LAST_RETRY, pause * 2)
            pause = _FIRST_RETRY

    def status(self) -> dict[str, bool]:
        """For /readyz: whether an MCP route needs the key, and whether it is read."""
        return {"needed": self._needed, "read": self._needed and not self.missing}

    def held(self) -> None:
        """Unavailable (503 mcp_session_key_unavailable) while the key is not read: an MCP
        request goes nowhere before then (the server would open a session that could not be
        given to its caller)."""
        self._held()

    def seal(self, server_id: str, bound: bytes) -> str:
        """The session id the caller is given for the server's `server_id`."""
        return sealed(self._held(), server_id, bound)

    def open(self, presented: str, bound: bytes) -> str:
        """The server's id within a sealed `presented` id, if it was sealed for `bound`;
        else NotFound (mcp_session_unknown), as a server answers for a session it ended."""
        server_id = presented.removeprefix(PREFIX).partition(".")[2]
        expected = sealed(self._held(), server_id, bound)
        if not hmac.compare_digest(_bytes(presented), _bytes(expected)):
            raise NotFound("mcp_session_unknown", "no such MCP session for this caller")
        return server_id

    def _held(self) -> bytes:
        if self._key is None:
            raise Unavailable(
                "mcp_session_key_unavailable",
                "MCP sessions cannot be opened yet",
                retry_after=_RETRY_AFTER,
            )
        return self._key


def sealed(key: bytes, server_id: str, bound: bytes) -> str:
    """`server_id` sealed with `key` for `bound`: PREFIX, the MAC, ".", the id."""
    digest = hmac.new(key, bound + b"\0" + _bytes(server_id), hashlib.sha256).digest()
    return f"{PREFIX}{base64.urlsafe_b64encode(digest).decode()[:_MAC_CHARS]}.{server_id}"


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a header may hold any code point
