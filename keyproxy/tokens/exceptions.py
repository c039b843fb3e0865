"""The exception register: every exception token issued, with its owner and reason, kept in
Vault KV at `tokens.state_path`/exception-register for `keyproxy token list`."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from keyproxy.config import EXCEPTION_ISSUER, Config
from keyproxy.errors import Unavailable
from keyproxy.tokens.format import exception_subject
from keyproxy.tokens.revocation import RevocationStore
from keyproxy.tokens.shared import Batched, SharedSecret
from keyproxy.vault import Vault

# The register's secret under tokens.state_path, and the one an earlier build wrote with a
# field per token (still read by `exceptions`, never written; see listread.REVOCATIONS).
EXCEPTIONS: Final = "exception-register"
LEGACY_EXCEPTIONS: Final = "exceptions"


class ExceptionRegister(RevocationStore):
    """Records exception tokens as they are issued, and lists the active ones."""

    def __init__(
        self, config: Config, vault: Vault, clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__(config, vault, clock)
        self._exception_writes = SharedSecret(
            vault,
            lambda: (self.config.vault.kv_mount, self._exceptions_path),
            self._merged_exceptions,
            _contended,
        )

    def _shared_writes(self) -> list[Batched[Any, Any]]:
        return [*super()._shared_writes(), self._exception_writes]

    @property
    def _exceptions_path(self) -> str:
        return f"{self.cfg.state_path}/{EXCEPTIONS}"

    async def _record_exception(self, token_id: str, claims: Mapping[str, Any]) -> None:
        """Add an exception token to the register, with any others this process issues
        meanwhile (`keyproxy.tokens.shared`)."""
        entry = {
            "owner": claims["exc"]["owner"],
            "reason": claims["exc"]["reason"],
            "issued_at": claims["iat"],
            "expires_at": claims["exp"],
            "scope": claims["scope"],
        }
        await self._exception_writes.change((token_id, entry))

    def _merged_exceptions(
        self, data: dict[str, Any], added: list[tuple[str, dict[str, Any]]]
    ) -> dict[str, Any]:
        """The stored register `data` without expired entries, with those `added`."""
        now = self.clock()
        live = {
            k: v for k, v in data.items() if isinstance(v, dict) and v.get("expires_at", 0) > now
        }
        live.update(added)
        return live

    async def exceptions(self) -> list[dict[str, Any]]:
        """Active exception tokens (not expired, not revoked), soonest expiry first."""
        legacy_path = f"{self.cfg.state_path}/{LEGACY_EXCEPTIONS}"
        legacy, _ = await self._read_state(legacy_path, earlier=True)
        data, _ = await self._read_state(self._exceptions_path)
        data = legacy | data
        revocations = await self.revocation_list()
        now = self.clock()
        active = [
            {"token_id": k, **v}
            for k, v in data.items()
            if isinstance(v, dict)
            and v.get("expires_at", 0) > now
            and not revocations.names(
                k,
                f"{EXCEPTION_ISSUER}|{exception_subject(str(v.get('owner')))}",
                None,
                float(v.get("issued_at", 0)),
            )
        ]
        return sorted(active, key=lambda e: e["expires_at"])


def _contended() -> Unavailable:
    return Unavailable("exception_register_contention", "could not record the token")
