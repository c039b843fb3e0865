# shellcheck shell=bash
# Helpers shared by the vault-dev auth scripts. Source it after setting $bao (the CLI);
# messages name the calling script ($0).

# require_url NAME VALUE: exit 2 unless VALUE is an http(s) URL.
require_url() {
  if [[ "$2" != https://* && "$2" != http://* ]]; then
    echo "$0: $1 must be an http(s) URL" >&2
    exit 2
  fi
}

# require_policies: the policies setup.sh writes must exist before roles can name them.
require_policies() {
  local policy
  for policy in keyproxy-proxy keyproxy-rotation; do
    if ! "${bao:?}" policy read "$policy" >/dev/null 2>&1; then
      echo "$0: policy $policy is missing: run setup.sh first" >&2
      exit 1
    fi
  done
}

# ensure_auth MOUNT TYPE: enable the auth method TYPE at MOUNT unless something is there.
ensure_auth() {
  if ! "${bao:?}" read "sys/auth/$1" >/dev/null 2>&1; then
    "${bao:?}" auth enable -path="$1" "$2" >/dev/null
  fi
}
