"""Workload identity: OIDC issuers, their signing keys, and the token verifier."""

from keyproxy.identity.verifier import MAX_DOCUMENT_BYTES, Identity, IdentityVerifier

__all__ = ["MAX_DOCUMENT_BYTES", "Identity", "IdentityVerifier"]
