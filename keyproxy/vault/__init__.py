"""Vault/OpenBao: the client (`client`: login and token upkeep in `auth`, KV v2 in `kv`,
Transit in `transit`, hvac and its errors in `transport`) and the in-memory key cache with its
change index (`keycache`)."""

from keyproxy.vault.auth import operator_config
from keyproxy.vault.client import Vault
from keyproxy.vault.keycache import (
    AWAIT_READS,
    INDEX_WINDOW,
    KEY_INDEX_PATH,
    KeyCache,
    announce_key_change,
)
from keyproxy.vault.kv import KeyVersion
from keyproxy.vault.transport import CasConflict, SecretNotFound

__all__ = [
    "AWAIT_READS",
    "INDEX_WINDOW",
    "KEY_INDEX_PATH",
    "CasConflict",
    "KeyCache",
    "KeyVersion",
    "SecretNotFound",
    "Vault",
    "announce_key_change",
    "operator_config",
]
