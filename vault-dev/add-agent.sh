#!/usr/bin/env bash
# Register an agent: an identity entity NAME that logs in with its own AppRole role.
# Idempotent for the entity and role; each run issues a fresh secret_id.
#
# Usage:  add-agent.sh NAME CREDENTIALS_DIR
#
# Needs BAO_ADDR/BAO_TOKEN (or VAULT_*) for an admin token, and setup.sh run first.
# Creates entity NAME, AppRole role agent-NAME (policy keyproxy-agent) and an entity alias
# tying the role's role_id to the entity, so identity tokens minted after an AppRole login
# carry sub = the entity id. Writes CREDENTIALS_DIR/agent-NAME-role-id and
# CREDENTIALS_DIR/agent-NAME-secret-id (mode 600). Prints the entity id on stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"
bao="$(find_bao)"

if [[ $# -ne 2 ]]; then
  echo "usage: $0 NAME CREDENTIALS_DIR" >&2
  exit 2
fi
name="$1"
creds="$2"
if [[ ! "$name" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]]; then
  echo "$0: NAME must be letters, digits, '.', '_' or '-'" >&2
  exit 2
fi

umask 077
mkdir -p "$creds"

"$bao" write identity/entity/name/"$name" metadata=created_by=keyproxy-add-agent >/dev/null
entity_id="$("$bao" read -field=id identity/entity/name/"$name")"

"$bao" write auth/approle/role/agent-"$name" \
  token_policies=keyproxy-agent token_ttl=10m token_max_ttl=1h >/dev/null
role_id="$("$bao" read -field=role_id auth/approle/role/agent-"$name"/role-id)"
accessor="$("$bao" read -field=accessor sys/auth/approle)"
# AppRole names its alias after the role_id; this links logins with that role to the entity.
"$bao" write identity/entity-alias \
  name="$role_id" canonical_id="$entity_id" mount_accessor="$accessor" >/dev/null

printf '%s' "$role_id" >"$creds/agent-$name-role-id"
"$bao" write -f -field=secret_id auth/approle/role/agent-"$name"/secret-id \
  >"$creds/agent-$name-secret-id"
chmod 600 "$creds/agent-$name-role-id" "$creds/agent-$name-secret-id"

printf '%s\n' "$entity_id"
