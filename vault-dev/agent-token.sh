#!/usr/bin/env bash
# Mint a fresh identity token (a JWT for audience "keyproxy") for an agent added with
# add-agent.sh, the way the agent itself would: log in with its AppRole, read
# identity/oidc/token/agent, then revoke the short-lived login token.
#
# Usage:  agent-token.sh NAME CREDENTIALS_DIR
#
# Needs BAO_ADDR (or VAULT_ADDR); no admin token is used. Prints only the JWT on stdout.
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
role_id_file="$creds/agent-$name-role-id"
secret_id_file="$creds/agent-$name-secret-id"
for f in "$role_id_file" "$secret_id_file"; do
  if [[ ! -r "$f" ]]; then
    echo "$0: cannot read $f (run add-agent.sh $name first)" >&2
    exit 1
  fi
done

# SECURITY: credentials travel as @file references and environment, never as argv.
unset BAO_TOKEN VAULT_TOKEN
login_token="$(
  "$bao" write -field=token auth/approle/login \
    role_id=@"$role_id_file" secret_id=@"$secret_id_file"
)"
export BAO_TOKEN="$login_token" VAULT_TOKEN="$login_token"
jwt="$("$bao" read -field=token identity/oidc/token/agent)"
"$bao" token revoke -self >/dev/null 2>&1 || true

printf '%s\n' "$jwt"
