"""Workload identity: OIDC issuers and their keys (`issuers`, `keys`: JWKS fetching with
stale-while-revalidate) and the token verifier (`verifier`)."""

from keyproxy.identity.keys import MAX_DOCUMENT_BYTES
from keyproxy.identity.verifier import Identity, IdentityVerifier

__all__ = ["MAX_DOCUMENT_BYTES", "Identity", "IdentityVerifier"]
