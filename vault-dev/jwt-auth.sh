#!/usr/bin/env bash
# Let keyproxy log in to Vault or OpenBao with a workload identity JWT from any OIDC issuer
# (a cloud's workload identity, GitHub Actions, a SPIFFE JWT-SVID, a cluster's public issuer).
# Idempotent: safe to run again.
#
# Usage:  jwt-auth.sh ISSUER PROXY_SUBJECT [ROTATION_SUBJECT]
#
# ISSUER is the tokens' exact `iss`; Vault finds the keys through its OpenID discovery
# document, or at KEYPROXY_JWT_JWKS_URL when set. PROXY_SUBJECT is the exact `sub` of the
# proxy's tokens; ROTATION_SUBJECT, if given, that of the rotation job's.
# Needs BAO_ADDR/BAO_TOKEN (or VAULT_*) for an admin token, and setup.sh run first.
#
# Optional environment:
#   KEYPROXY_JWT_JWKS_URL     fetch the issuer's keys here instead of by discovery
#   KEYPROXY_JWT_CA_FILE      PEM CA for the discovery or JWKS URL
#   KEYPROXY_VAULT_AUDIENCE   the `aud` the tokens must carry (default vault)
#   KEYPROXY_JWT_MOUNT        where the auth method is mounted (default jwt)
#
# What it does:
#   - enables the jwt auth method at KEYPROXY_JWT_MOUNT (if absent), trusting ISSUER only;
#   - role keyproxy-proxy: tokens with sub PROXY_SUBJECT, policy keyproxy-proxy, 1h;
#   - role keyproxy-rotation (with ROTATION_SUBJECT): policy keyproxy-rotation, 15m.
# Point keyproxy at it with vault.auth: {method: jwt, role: keyproxy-proxy, jwt_file: ...}.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"
bao="$(find_bao)"

if [[ $# -lt 2 || $# -gt 3 ]]; then
  echo "usage: $0 ISSUER PROXY_SUBJECT [ROTATION_SUBJECT]" >&2
  exit 2
fi
issuer="$1"
proxy_subject="$2"
rotation_subject="${3:-}"
audience="${KEYPROXY_VAULT_AUDIENCE:-vault}"
mount="${KEYPROXY_JWT_MOUNT:-jwt}"
require_url ISSUER "$issuer"

require_policies

ensure_auth "$mount" jwt

config=("bound_issuer=$issuer")
if [[ -n "${KEYPROXY_JWT_JWKS_URL:-}" ]]; then
  config+=("jwks_url=$KEYPROXY_JWT_JWKS_URL")
  if [[ -n "${KEYPROXY_JWT_CA_FILE:-}" ]]; then
    config+=("jwks_ca_pem=@$KEYPROXY_JWT_CA_FILE")
  fi
else
  config+=("oidc_discovery_url=$issuer")
  if [[ -n "${KEYPROXY_JWT_CA_FILE:-}" ]]; then
    config+=("oidc_discovery_ca_pem=@$KEYPROXY_JWT_CA_FILE")
  fi
fi
"$bao" write "auth/$mount/config" "${config[@]}" >/dev/null

# SECURITY: each role binds one exact subject and the audience; a token minted for another
# service (another `aud`) or another workload (another `sub`) cannot log in.
"$bao" write "auth/$mount/role/keyproxy-proxy" \
  role_type=jwt user_claim=sub bound_subject="$proxy_subject" bound_audiences="$audience" \
  token_policies=keyproxy-proxy token_ttl=1h token_max_ttl=24h >/dev/null

if [[ -n "$rotation_subject" ]]; then
  "$bao" write "auth/$mount/role/keyproxy-rotation" \
    role_type=jwt user_claim=sub bound_subject="$rotation_subject" bound_audiences="$audience" \
    token_policies=keyproxy-rotation token_ttl=15m token_max_ttl=1h >/dev/null
fi

echo "auth/$mount: trusting $issuer for roles keyproxy-proxy${rotation_subject:+ and keyproxy-rotation}"
