#!/usr/bin/env bash
# Let keyproxy's pods (deploy/kubernetes/) log in to Vault or OpenBao with their Kubernetes
# service-account tokens. Idempotent: safe to run again.
#
# Usage:  k8s-auth.sh KUBERNETES_HOST [NAMESPACE]
#
# KUBERNETES_HOST is the cluster's API server as Vault reaches it (https://kubernetes.default.svc
# when Vault runs in the cluster). NAMESPACE is where keyproxy runs (default keyproxy).
# Needs BAO_ADDR/BAO_TOKEN (or VAULT_*) for an admin token, and setup.sh run first (it writes
# the policies keyproxy-proxy and keyproxy-rotation).
#
# Optional environment:
#   KUBERNETES_CA_FILE        PEM of the cluster CA that signs the API server's certificate
#                             (default: Vault's own pod CA when it runs in the cluster)
#   TOKEN_REVIEWER_JWT_FILE   a token of a service account bound to system:auth-delegator,
#                             which Vault uses for TokenReview; required when Vault runs
#                             outside the cluster (the pods' tokens are for audience "vault",
#                             so they cannot review themselves)
#   KEYPROXY_VAULT_AUDIENCE   the audience of the pods' projected tokens (default vault)
#   KEYPROXY_K8S_MOUNT        where the auth method is mounted (default kubernetes)
#
# What it does:
#   - enables the kubernetes auth method at KEYPROXY_K8S_MOUNT (if absent) and points it at
#     KUBERNETES_HOST;
#   - role keyproxy-proxy: service account keyproxy in NAMESPACE, policy keyproxy-proxy,
#     1h tokens (keyproxy renews them and logs in again with a fresh projected token);
#   - role keyproxy-rotation: service account keyproxy-rotate in NAMESPACE, policy
#     keyproxy-rotation, 15m tokens (one `keyproxy rotate --due` run).
# Both roles accept only tokens whose audience is KEYPROXY_VAULT_AUDIENCE.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"
bao="$(find_bao)"

if [[ $# -lt 1 || $# -gt 2 ]]; then
  echo "usage: $0 KUBERNETES_HOST [NAMESPACE]" >&2
  exit 2
fi
host="$1"
namespace="${2:-keyproxy}"
audience="${KEYPROXY_VAULT_AUDIENCE:-vault}"
mount="${KEYPROXY_K8S_MOUNT:-kubernetes}"
require_url KUBERNETES_HOST "$host"

require_policies

ensure_auth "$mount" kubernetes

# SECURITY: the reviewer token and the CA travel as @file references, never in argv.
config=("kubernetes_host=$host")
if [[ -n "${KUBERNETES_CA_FILE:-}" ]]; then
  config+=("kubernetes_ca_cert=@$KUBERNETES_CA_FILE")
fi
if [[ -n "${TOKEN_REVIEWER_JWT_FILE:-}" ]]; then
  config+=("token_reviewer_jwt=@$TOKEN_REVIEWER_JWT_FILE")
fi
"$bao" write "auth/$mount/config" "${config[@]}" >/dev/null

"$bao" write "auth/$mount/role/keyproxy-proxy" \
  bound_service_account_names=keyproxy \
  bound_service_account_namespaces="$namespace" \
  audience="$audience" \
  token_policies=keyproxy-proxy token_ttl=1h token_max_ttl=24h >/dev/null

"$bao" write "auth/$mount/role/keyproxy-rotation" \
  bound_service_account_names=keyproxy-rotate \
  bound_service_account_namespaces="$namespace" \
  audience="$audience" \
  token_policies=keyproxy-rotation token_ttl=15m token_max_ttl=1h >/dev/null

echo "auth/$mount: roles keyproxy-proxy and keyproxy-rotation for namespace $namespace"
