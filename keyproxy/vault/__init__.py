"""Vault/OpenBao: the only package that talks to hvac, and the in-memory key cache."""

from keyproxy.vault.client import (
    AWAIT_READS,
    INDEX_WINDOW,
    KEY_INDEX_PATH,
    CasConflict,
    KeyCache,
    KeyVersion,
    SecretNotFound,
    Vault,
    announce_key_change,
    operator_config,
)

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
