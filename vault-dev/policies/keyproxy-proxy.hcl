# keyproxy-proxy: what a keyproxy replica needs to serve traffic, and nothing more.
# It reads keys (and their version metadata) under secret/keyproxy/keys/ and the change index
# secret/keyproxy/state/keys, signs task tokens with the Transit key keyproxy-tokens (the
# private key stays in Vault), keeps the token revocation list, and keeps its own token alive. It cannot write keys, list other paths, or
# touch auth or identity configuration.

# Only the keys: not the rotators' admin credentials (keyproxy/admin/*) nor the rotation
# journal (keyproxy/state/rotation/*), which holds a new key until it is promoted.
path "secret/data/keyproxy/keys/*" {
  capabilities = ["read"]
}

path "secret/metadata/keyproxy/keys/*" {
  capabilities = ["read"]
}

# The change index that `keyproxy rotate`/`keys put` write after a key: polled for its version.
path "secret/data/keyproxy/state/keys" {
  capabilities = ["read"]
}

path "secret/metadata/keyproxy/state/keys" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}

path "auth/token/lookup-self" {
  capabilities = ["read"]
}

# Task tokens: sign with, and read the public keys of, the token signing key.
path "transit/sign/keyproxy-tokens" {
  capabilities = ["update"]
}

path "transit/keys/keyproxy-tokens" {
  capabilities = ["read"]
}

# The token revocation list, the register of exception tokens, and the key that binds MCP
# sessions to their callers (mcp-session-key).
path "secret/data/keyproxy/state/tokens/*" {
  capabilities = ["create", "read", "update"]
}

path "secret/metadata/keyproxy/state/tokens/*" {
  capabilities = ["read"]
}
