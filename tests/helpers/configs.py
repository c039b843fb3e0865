"""Configurations for tests of parsing: a whole valid file as YAML text, and the vault and
identity sections of one as data. Neither has a Vault behind it."""

from __future__ import annotations

from typing import Any

# A small valid file: one issuer, one route, one policy. Tests make their mistakes in it by
# replacing text, so its line numbers are the ones their messages name.
CONFIG_TEXT = """\
vault:
  addr: http://127.0.0.1:8200
identity:
  issuers:
    - name: k8s
      issuer: https://kubernetes.default.svc
      jwks_uri: https://kubernetes.default.svc/openid/v1/jwks
      audiences: [keyproxy]
      algorithms: [RS256]
routes:
  openai:
    upstream: https://api.openai.com
    secret: {path: keyproxy/keys/openai}
    inject: [{header: Authorization, format: "Bearer {key}"}]
policies:
  - name: summarizer
    subjects: ["system:serviceaccount:agents:summarizer"]
    allow:
      openai: {methods: [POST], paths: [/v1/chat/completions]}
"""


def edited(text: str, line: int, new: str, *, replace: bool = False) -> str:
    """`text` with `new` put after line `line` (1-based), or in place of it."""
    lines = text.splitlines()
    lines[line - 1 if replace else line : line] = new.splitlines()
    return "\n".join(lines) + "\n"


# The vault and identity sections of a small valid configuration (no Vault behind it), for
# tests of configuration parsing: add routes and policies. Never mutated: copy before changing.
CONFIG_SECTIONS: dict[str, Any] = {
    "vault": {"addr": "http://127.0.0.1:8200", "auth": {"method": "token"}},
    "identity": {
        "issuers": [
            {
                "name": "k8s",
                "issuer": "https://kubernetes.default.svc",
                "jwks_uri": "https://kubernetes.default.svc/openid/v1/jwks",
                "audiences": ["keyproxy"],
                "algorithms": ["RS256"],
            }
        ]
    },
}
