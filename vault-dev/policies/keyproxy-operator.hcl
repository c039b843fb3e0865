# keyproxy-operator: what a person running keyproxy day to day needs, and nothing more.
# They store keys (`keyproxy keys put`, vault-dev/put-key.sh), inspect them (`keys status`,
# which reads the journal), run a rotation by hand (`keyproxy rotate ROUTE [--emergency]`,
# which reads the rotators' admin credentials and retires old versions), issue, list and
# revoke exception tokens (`keyproxy token ...`: sign with Transit, keep the token state), and
# rotate the token signing key. They cannot change policies, auth methods, mounts or the
# identity store, read anything outside secret/keyproxy/, delete a key's history
# (metadata), make the signing key exportable or deletable, or mint Vault tokens.
# Setting up Vault (vault-dev/setup.sh, k8s-auth.sh, jwt-auth.sh) takes an admin token.

path "secret/data/keyproxy/keys/*" {
  capabilities = ["create", "read", "update"]
}

path "secret/destroy/keyproxy/keys/*" {
  capabilities = ["update"]
}

path "secret/data/keyproxy/state/rotation/*" {
  capabilities = ["create", "read", "update"]
}

path "secret/data/keyproxy/state/tokens/*" {
  capabilities = ["create", "read", "update"]
}

# The change index proxies poll, written after each key stored (keys put, put-key.sh).
path "secret/data/keyproxy/state/keys" {
  capabilities = ["create", "read", "update"]
}

# Rotators' admin credentials: an operator stores and replaces them.
path "secret/data/keyproxy/admin/*" {
  capabilities = ["create", "read", "update"]
}

# Versions and metadata of everything keyproxy keeps, and listing it; never deleting it.
path "secret/metadata/keyproxy/*" {
  capabilities = ["read", "list"]
}

path "secret/metadata/keyproxy" {
  capabilities = ["list"]
}

# Task and exception tokens: sign with the Transit key, read its public keys, rotate it.
path "transit/sign/keyproxy-tokens" {
  capabilities = ["update"]
}

path "transit/keys/keyproxy-tokens" {
  capabilities = ["read"]
}

path "transit/keys/keyproxy-tokens/rotate" {
  capabilities = ["update"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}

path "auth/token/lookup-self" {
  capabilities = ["read"]
}
