#!/usr/bin/env bash
# Store an API key as a new KV v2 version at secret/PATH, reading the value from stdin.
#
# Usage:  put-key.sh PATH [FIELD] < keyfile
#         printf '%s' "$KEY" | put-key.sh keyproxy/keys/openai
#
# PATH is relative to the secret/ mount (a leading "secret/" is dropped), e.g.
# keyproxy/keys/openai. FIELD defaults to api_key. Other fields are kept. Trailing newlines are
# stripped; an empty value is refused. Needs BAO_ADDR/BAO_TOKEN (or VAULT_*) for a token
# allowed to write there and to keyproxy/state/keys (the change index proxies poll). Prints
# the new version number on stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"
bao="$(find_bao)"

if [[ $# -lt 1 || $# -gt 2 ]]; then
  echo "usage: $0 PATH [FIELD] < value" >&2
  exit 2
fi
path="${1#secret/}"
field="${2:-api_key}"

# SECURITY: the key comes from stdin and goes back out on stdin ("field=-"), never in argv.
key="$(cat)"
if [[ -z "$key" ]]; then
  echo "$0: refusing to store an empty key (nothing on stdin)" >&2
  exit 1
fi

if "$bao" kv metadata get -mount=secret "$path" >/dev/null 2>&1; then
  verb="patch"
else
  verb="put"
fi
printf '%s' "$key" | "$bao" kv "$verb" -mount=secret -field=version "$path" "$field=-"
echo
# The change index: proxies poll it and re-read this secret at once rather than at their next
# full refresh (vault.full_refresh_interval).
# The key is stored already: a refused index write is a warning, not a failure.
"$bao" kv put -mount=secret keyproxy/state/keys "secret=secret/$path" >/dev/null ||
  echo "$0: warning: the change index was not written; proxies find the key at their next full refresh" >&2
