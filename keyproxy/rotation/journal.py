"""A route's rotation journal in Vault, held under its lock, and the test-only crash injection.

The journal lives at KV v2 `<kv_mount>/keyproxy/state/rotation/<route>`. It holds the lock
(owner, expiry) and the step; every write is a check-and-set on the version this runner last
wrote, so a runner that lost its lock to a takeover fails its next write and stops.

KEYPROXY_FAILPOINT=after:<step> (test-only) SIGKILLs the process right after that step:
lock, create, record, verify, promote, grace, revoke, revoked, retire.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import replace

from keyproxy import secret
from keyproxy.errors import KeyproxyError
from keyproxy.rotation.rotators import UpstreamKey
from keyproxy.rotation.state import JournalError, JournalState, Lock, Previous, Step
from keyproxy.vault import CasConflict, SecretNotFound, Vault

STATE_PATH = "keyproxy/state/rotation"
FAILPOINT_ENV = "KEYPROXY_FAILPOINT"


class RotationError(KeyproxyError):
    """A rotation could not proceed (lost lock, key changed underneath, wrong route)."""


def failpoint(step: str) -> None:
    """Test-only crash injection: die by SIGKILL right after `step` if asked to."""
    if os.environ.get(FAILPOINT_ENV) == f"after:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


class Journal:
    """One route's journal, held under its lock by this runner: `state` as last read or
    written, and `version`, the KV version of that write (the next write's check-and-set)."""

    def __init__(
        self,
        vault: Vault,
        mount: str,
        path: str,
        *,
        owner: str,
        lease: float,
        clock: Callable[[], float],
    ) -> None:
        self._vault, self._mount, self._path = vault, mount, path
        self._owner, self._lease, self._clock = owner, lease, clock
        self.state = JournalState()
        self.version = 0

    async def load(self) -> None:
        try:
            data, self.version = await self._vault.read_kv(self._mount, self._path)
        except SecretNotFound:
            data, self.version = {}, 0
        self.state = JournalState.from_data(data)
        if self.state.pending is not None:
            secret.register(self.state.pending.key.reveal())

    @property
    def step(self) -> Step:
        return self.state.step

    def held_by_other(self) -> str | None:
        lock = self.state.lock
        if lock is None or lock.owner == self._owner:
            return None
        return str(lock.owner) if lock.expires_at > self._clock() else None

    async def save(self, state: JournalState | None = None, *, release: bool = False) -> None:
        """Write `state` (by default the state as it stands) with check-and-set, renewing
        or releasing the lock. `state` becomes the journal's only once it is written."""
        lock = None if release else Lock(self._owner, self._clock() + self._lease)
        new = replace(self.state if state is None else state, lock=lock)
        try:
            self.version = await self._vault.write_kv(
                self._mount, self._path, new.to_data(), cas=self.version
            )
        except CasConflict:
            raise RotationError("lost the rotation lock to another runner") from None
        self.state = new

    def new_key(self) -> UpstreamKey:
        """The new key the journal holds (from `created` until promotion or abandon)."""
        if (pending := self.state.pending) is None:
            raise JournalError(f"the journal has no new key at step {self.step}")
        return UpstreamKey(pending.key, pending.key_id)

    def previous(self) -> Previous:
        """The replaced key version (from `grace` until it is destroyed)."""
        if (previous := self.state.previous) is None:
            raise JournalError(f"the journal has no previous key version at step {self.step}")
        return previous


def journal_path(route: str) -> str:
    return f"{STATE_PATH}/{route}"
