"""Task tokens: keyproxy's own short-lived, scoped, revocable credentials.

`TaskTokens` issues (`signing`), verifies (`verify`) and revokes (`revocation`) them, keeps
the exception register (`exceptions`), and runs the background work: the revocation poll and
the key refresh. The token's format is in `format`.
"""

from __future__ import annotations

import asyncio

import structlog

from keyproxy.config import Config
from keyproxy.errors import VaultError
from keyproxy.tokens.verify import Verifier

log = structlog.get_logger("keyproxy.tokens")


class TaskTokens(Verifier):
    """Issue, verify and revoke task tokens for one configuration."""

    def reconfigure(self, config: Config) -> None:
        """Follow `config` (a reload): its token settings apply to tokens issued from now on,
        and tokens are verified against its routes. Signing keys, revocations and use
        counts carry over."""
        self.config, self.cfg = config, config.tokens
        self._policy_claims = sorted({name for p in config.policies for name, _ in p.claims})
        self._verified.clear()  # their scopes were read against the old routes

    async def run(self) -> None:
        """Background work until cancelled: poll revocations, and re-read the public keys
        every key_refresh_interval."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._poll_revocations(), name="token-revocations")
            group.create_task(self._refresh_keys_regularly(), name="token-keys")

    async def _poll_revocations(self) -> None:
        while True:
            try:
                await self.refresh_revocations()
            except VaultError as exc:
                log.warning("revocations_refresh_failed", error=str(exc))
            await asyncio.sleep(self.cfg.revocation_poll_interval)
