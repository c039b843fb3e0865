"""Configurations for tests of parsing: a whole valid file as YAML text, and the vault and
identity sections of one as data. Neither has a Vault behind it."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from keyproxy import config

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


def api_route_config(vault_addr: str, issuer: str, jwks: str) -> dict[str, Any]:
    """A file with one token-auth Vault, one issuer "ci", route "api" and policy "evals"."""
    return {
        "vault": {"addr": vault_addr, "auth": {"method": "token"}},
        "identity": {
            "issuers": [
                {
                    "name": "ci",
                    "issuer": issuer,
                    "jwks_uri": jwks,
                    "audiences": ["keyproxy"],
                    "algorithms": ["RS256"],
                }
            ]
        },
        "routes": {
            "api": {
                "upstream": "https://api.example.com",
                "secret": {"path": "keyproxy/keys/cli-test"},
                "inject": [{"header": "X-Api-Key"}],
            }
        },
        "policies": [
            {
                "name": "evals",
                "issuers": ["ci"],
                "subjects": ["repo:acme/*"],
                "claims": {"repository": "acme/evals"},
                "allow": {"api": {"methods": ["POST"], "paths": ["/v1/**"]}},
            }
        ],
    }


# The base document of keyproxy.config's tests, and how they change and parse it.
BASE: dict[str, Any] = {
    **CONFIG_SECTIONS,
    "routes": {
        "openai": {
            "upstream": "https://api.openai.com/v1",
            "secret": {"path": "keyproxy/keys/openai"},
            "inject": [{"header": "Authorization", "format": "Bearer {key}"}],
        }
    },
    "policies": [
        {
            "name": "summarizer",
            "subjects": ["system:serviceaccount:agents:summarizer"],
            "claims": {"repository": "acme/app", "ref_protected": True},
            "source_cidrs": ["10.0.0.0/8"],
            "allow": {"openai": {"methods": ["POST"], "paths": ["/chat/completions", "/x/**"]}},
        }
    ],
}


def with_setting(path: str, value: Any) -> dict[str, Any]:
    """BASE with the value at a dotted path (list indexes as numbers) replaced or deleted."""
    doc = copy.deepcopy(BASE)
    parts = path.split(".")
    node: Any = doc
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last: Any = int(parts[-1]) if isinstance(node, list) else parts[-1]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


DELETE = object()


POLICY = "policies[0] (summarizer)"  # a policy is named in error paths by its name


def parse_doc(doc: dict[str, Any], env: dict[str, str] | None = None) -> config.Config:
    return config.parse(yaml.safe_dump(doc), env or {})


# The line numbers in the config tests' messages are this text's; `edited` changes one place in it.
TEXT = edited(CONFIG_TEXT, 2, "  auth: {method: token}")


MCP_ROUTE = {
    "kind": "mcp",
    "upstream": "https://mcp.example.com/mcp",
    "secret": {"path": "keyproxy/keys/mcp"},
    "inject": [{"header": "Authorization", "format": "Bearer {key}"}],
    "mcp": {"server_requests": ["elicitation/create"]},
}
