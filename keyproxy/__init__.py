"""keyproxy: inject Vault-held API keys for callers that prove their workload identity."""
