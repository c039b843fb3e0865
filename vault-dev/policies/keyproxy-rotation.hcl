# keyproxy-rotation: what `keyproxy rotate` and `keyproxy keys put` need, and nothing more.
# They write new versions of the keys under secret/keyproxy/keys/ and destroy retired ones,
# keep the rotation journal and lock under secret/keyproxy/state/rotation/, note each new key
# in the change index secret/keyproxy/state/keys, and read the rotators' admin credentials
# under secret/keyproxy/admin/. They cannot read or write token state, sign tokens, list
# paths, or touch auth, policy or identity configuration.

path "secret/data/keyproxy/keys/*" {
  capabilities = ["create", "read", "update"]
}

path "secret/metadata/keyproxy/keys/*" {
  capabilities = ["read"]
}

path "secret/destroy/keyproxy/keys/*" {
  capabilities = ["update"]
}

# After each new key version, a version of the change index naming it (proxies poll it).
path "secret/data/keyproxy/state/keys" {
  capabilities = ["create", "update"]
}

path "secret/data/keyproxy/state/rotation/*" {
  capabilities = ["create", "read", "update"]
}

path "secret/metadata/keyproxy/state/rotation/*" {
  capabilities = ["read"]
}

# Journal versions that held a new key before its promotion are destroyed after it.
path "secret/destroy/keyproxy/state/rotation/*" {
  capabilities = ["update"]
}

path "secret/data/keyproxy/admin/*" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}

path "auth/token/lookup-self" {
  capabilities = ["read"]
}
