"""The Vault/OpenBao client: one authenticated `Session` with the KV v2 and Transit calls."""

from __future__ import annotations

from keyproxy.vault.kv import Kv
from keyproxy.vault.transit import Transit


class Vault(Kv, Transit):
    """An authenticated Vault/OpenBao client whose every method is a coroutine: login and
    token upkeep (`auth`), KV v2 (`kv`), Transit (`transit`)."""
