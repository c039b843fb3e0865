"""The exception register: every exception token issued, with its owner and reason, kept in
Vault KV at `tokens.state_path`/exceptions for `keyproxy token list`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from keyproxy.errors import Unavailable
from keyproxy.tokens.format import EXCEPTION_ISSUER, exception_subject
from keyproxy.tokens.revocation import Revocations, RevocationStore
from keyproxy.vault import CasConflict


class ExceptionRegister(RevocationStore):
    """Records exception tokens as they are issued, and lists the active ones."""

    @property
    def _exceptions_path(self) -> str:
        return f"{self.cfg.state_path}/exceptions"

    async def _record_exception(self, token_id: str, claims: Mapping[str, Any]) -> None:
        for _ in range(8):
            data, version = await self._read_state(self._exceptions_path)
            now = self.clock()
            live = {
                k: v
                for k, v in data.items()
                if isinstance(v, dict) and v.get("expires_at", 0) > now
            }
            live[token_id] = {
                "owner": claims["exc"]["owner"],
                "reason": claims["exc"]["reason"],
                "issued_at": claims["iat"],
                "expires_at": claims["exp"],
                "scope": claims["scope"],
            }
            try:
                await self.vault.write_kv(
                    self.config.vault.kv_mount, self._exceptions_path, live, cas=version
                )
            except CasConflict:
                continue
            return
        raise Unavailable("exception_register_contention", "could not record the token")

    async def revocation_list(self) -> Revocations:
        """The revocation list as Vault holds it now."""
        data, _ = await self._read_state(self._revocations_path)
        return Revocations.from_data(data)

    async def exceptions(self) -> list[dict[str, Any]]:
        """Active exception tokens (not expired, not revoked), soonest expiry first."""
        data, _ = await self._read_state(self._exceptions_path)
        revs, _ = await self._read_state(self._revocations_path)
        revocations = Revocations.from_data(revs)
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
