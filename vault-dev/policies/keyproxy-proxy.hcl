# keyproxy-proxy: what a keyproxy replica needs to serve traffic, and nothing more.
# It reads keys (and their version metadata) under secret/keyproxy/ and keeps its own token
# alive. It cannot write keys, list other paths, or touch auth or identity configuration.

path "secret/data/keyproxy/*" {
  capabilities = ["read"]
}

path "secret/metadata/keyproxy/*" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}

path "auth/token/lookup-self" {
  capabilities = ["read"]
}
