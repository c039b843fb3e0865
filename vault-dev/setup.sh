#!/usr/bin/env bash
# Configure a Vault or OpenBao server for keyproxy. Idempotent: safe to run again.
#
# Usage:  setup.sh CREDENTIALS_DIR
#
# Needs BAO_ADDR and BAO_TOKEN (or VAULT_ADDR and VAULT_TOKEN) for a token allowed to manage
# mounts, auth methods, policies and the identity store (a root token on a dev server).
# Set BAO=vault to use the vault CLI instead of bao.
#
# What it does:
#   - KV v2 at secret/ (enabled if absent; refuses a KV v1 mount there);
#   - policy keyproxy-proxy (policies/keyproxy-proxy.hcl) and AppRole role keyproxy-proxy at
#     approle/ with that policy and a 1h token TTL;
#   - writes CREDENTIALS_DIR/proxy-role-id and CREDENTIALS_DIR/proxy-secret-id (mode 600);
#     every run issues a fresh secret_id (earlier ones stay valid until revoked);
#   - policy keyproxy-operator (policies/keyproxy-operator.hcl) for people operating keyproxy;
#   - policy keyproxy-rotation (policies/keyproxy-rotation.hcl) and AppRole role
#     keyproxy-rotation, writing CREDENTIALS_DIR/rotation-role-id and rotation-secret-id;
#   - Transit at transit/ with the Ed25519 key keyproxy-tokens that signs task tokens;
#   - the OIDC identity provider agents use: key keyproxy-agents (RS256), role "agent" with
#     client_id "keyproxy" (the token audience), 15m TTL and an entity_name claim, and the
#     policy keyproxy-agent (policies/keyproxy-agent.hcl) allowing identity/oidc/token/agent;
#   - makes the OIDC issuer $BAO_ADDR/v1/identity/oidc when none is configured and the
#     server's default (its api_addr) differs; set KEYPROXY_OIDC_ISSUER to choose another
#     base URL (tokens then carry iss = $KEYPROXY_OIDC_ISSUER/v1/identity/oidc).
#
# Prints the OIDC issuer on stdout and one progress line per step on stderr. Secrets are
# written only to files, never printed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"
bao="$(find_bao)"

if [[ $# -ne 1 ]]; then
  echo "usage: $0 CREDENTIALS_DIR" >&2
  exit 2
fi
creds="$1"
addr="${BAO_ADDR:-${VAULT_ADDR:-}}"
if [[ -z "$addr" ]]; then
  echo "$0: set BAO_ADDR (or VAULT_ADDR)" >&2
  exit 2
fi

umask 077
mkdir -p "$creds"

# KV v2 at secret/
progress "KV v2 at secret/"
if "$bao" read sys/mounts/secret >/dev/null 2>&1; then
  options="$("$bao" read -field=options sys/mounts/secret)"
  if [[ "$("$bao" read -field=type sys/mounts/secret)" != "kv" || "$options" != *"version:2"* ]]; then
    echo "$0: secret/ is mounted but is not KV version 2; refusing to change it" >&2
    exit 1
  fi
else
  "$bao" secrets enable -path=secret -version=2 kv >/dev/null
fi

progress "Transit key keyproxy-tokens (signs task tokens)"
# Transit: the Ed25519 key that signs keyproxy's task tokens. Its private half never leaves
# Vault; keyproxy verifies tokens locally with the public keys.
if ! "$bao" read sys/mounts/transit >/dev/null 2>&1; then
  "$bao" secrets enable -path=transit transit >/dev/null
fi
if ! "$bao" read transit/keys/keyproxy-tokens >/dev/null 2>&1; then
  "$bao" write -f transit/keys/keyproxy-tokens type=ed25519 >/dev/null
fi

# The proxy: read-only access to keys, through AppRole.
progress "policy and AppRole keyproxy-proxy -> $creds/proxy-role-id, proxy-secret-id"
"$bao" policy write keyproxy-proxy "$here/policies/keyproxy-proxy.hcl" >/dev/null
if ! "$bao" read sys/auth/approle >/dev/null 2>&1; then
  "$bao" auth enable approle >/dev/null
fi
"$bao" write auth/approle/role/keyproxy-proxy \
  token_policies=keyproxy-proxy token_ttl=1h token_max_ttl=24h >/dev/null
"$bao" read -field=role_id auth/approle/role/keyproxy-proxy/role-id >"$creds/proxy-role-id"
"$bao" write -f -field=secret_id auth/approle/role/keyproxy-proxy/secret-id \
  >"$creds/proxy-secret-id"
chmod 600 "$creds/proxy-role-id" "$creds/proxy-secret-id"

progress "policy and AppRole keyproxy-rotation -> $creds/rotation-role-id, rotation-secret-id"
# Rotation jobs (`keyproxy rotate`, `keyproxy keys put`): write keys and the rotation
# journal, read the rotators' admin credentials, through their own AppRole.
"$bao" policy write keyproxy-rotation "$here/policies/keyproxy-rotation.hcl" >/dev/null
"$bao" write auth/approle/role/keyproxy-rotation \
  token_policies=keyproxy-rotation token_ttl=1h token_max_ttl=24h >/dev/null
"$bao" read -field=role_id auth/approle/role/keyproxy-rotation/role-id >"$creds/rotation-role-id"
"$bao" write -f -field=secret_id auth/approle/role/keyproxy-rotation/secret-id \
  >"$creds/rotation-secret-id"
chmod 600 "$creds/rotation-role-id" "$creds/rotation-secret-id"

progress "policy keyproxy-operator"
# People operating keyproxy: keys put/status, rotate --emergency, token issue/revoke.
"$bao" policy write keyproxy-operator "$here/policies/keyproxy-operator.hcl" >/dev/null

# The agents' identity provider.
progress "OIDC identity provider for agents (role agent, audience keyproxy)"
discovery=identity/oidc/.well-known/openid-configuration
if [[ -n "${KEYPROXY_OIDC_ISSUER:-}" ]]; then
  "$bao" write identity/oidc/config issuer="$KEYPROXY_OIDC_ISSUER" >/dev/null
elif [[ "$("$bao" read -field=issuer "$discovery")" != "${addr%/}/v1/identity/oidc" &&
  -z "$("$bao" read -field=issuer identity/oidc/config)" ]]; then
  # The default issuer is the server's api_addr, which may not be the address clients use.
  "$bao" write identity/oidc/config issuer="${addr%/}" >/dev/null
fi
"$bao" write identity/oidc/key/keyproxy-agents \
  algorithm=RS256 allowed_client_ids='*' >/dev/null
# SECURITY: the client_id is the token's `aud`; keyproxy accepts only tokens minted for it.
"$bao" write identity/oidc/role/agent \
  key=keyproxy-agents client_id=keyproxy ttl=15m \
  template='{"entity_name": {{identity.entity.name}}}' >/dev/null
"$bao" policy write keyproxy-agent "$here/policies/keyproxy-agent.hcl" >/dev/null

"$bao" read -field=issuer "$discovery"
echo
