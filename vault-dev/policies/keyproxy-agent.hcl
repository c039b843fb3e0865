# keyproxy-agent: an agent may only mint its own OpenBao/Vault identity token (a JWT whose
# `sub` is its entity id and whose `aud` is "keyproxy"), which it then presents to keyproxy.
# It can read no secrets at all: the API keys stay with the proxy.

path "identity/oidc/token/agent" {
  capabilities = ["read"]
}
