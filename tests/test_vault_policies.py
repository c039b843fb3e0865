"""The Vault policies in vault-dev/policies/ and the auth scripts beside them, against a real
OpenBao: each role can do exactly what its job needs (serving, rotation, operating) and is
refused everything else, and k8s-auth.sh / jwt-auth.sh give pods and workloads those roles.

A module-scoped server of its own is used, because the operator test rotates the token
signing key, which other tests' servers must not see.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from keyproxy.config import SecretRef, VaultAuth, VaultConfig
from keyproxy.devserver import OpenBaoDevServer, vault_dev_dir
from keyproxy.vault import KEY_INDEX_PATH, Vault
from tests.helpers.cli import keyproxy
from tests.helpers.servers import new_key

SCRIPTS = vault_dev_dir()


@dataclass(frozen=True)
class Paths:
    """Per-module KV paths and a second Transit key that no keyproxy policy names."""

    key: str
    destroyable: str
    journal: str
    admin: str
    tokens: str
    outside: str
    other_transit_key: str


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBaoDevServer]:
    """An OpenBao of this module's own, set up by setup.sh, with the operator policy loaded."""
    server = OpenBaoDevServer(tmp_path_factory.mktemp("policies"))
    server.start(timeout=30)
    try:
        server.setup()
        policy = SCRIPTS / "policies" / "keyproxy-operator.hcl"
        server.bao("policy", "write", "keyproxy-operator", str(policy))
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def paths(bao: OpenBaoDevServer) -> Paths:
    """Test data written as root: a key with two versions, a journal, an admin credential,
    token state, a secret outside keyproxy/ and a second Transit key."""
    tag = uuid.uuid4().hex[:12]
    p = Paths(
        key=f"keyproxy/keys/policy-{tag}",
        destroyable=f"keyproxy/keys/policy-destroy-{tag}",
        journal=f"keyproxy/state/rotation/policy-{tag}",
        admin=f"keyproxy/admin/policy-{tag}",
        tokens=f"keyproxy/state/tokens/policy-{tag}",
        outside=f"elsewhere/policy-{tag}",
        other_transit_key=f"other-{tag}",
    )
    bao.put_key(p.key, new_key())
    bao.put_key(p.destroyable, new_key())
    bao.put_key(p.destroyable, new_key())
    root = _client(bao, bao.root_token)
    for path in (p.journal, p.admin, p.tokens, p.outside, KEY_INDEX_PATH):
        root.secrets.kv.v2.create_or_update_secret(path, secret={"v": "x"}, mount_point="secret")
    bao.bao("write", "-f", f"transit/keys/{p.other_transit_key}", "type=ed25519")
    return p


def _client(server: OpenBaoDevServer, token: str | None = None) -> Any:
    client = hvac.Client(url=server.addr, timeout=10)
    client.session.trust_env = False  # loopback: never through an environment proxy
    if token is not None:
        client.token = token
    return client


def _approle(server: OpenBaoDevServer, name: str) -> Any:
    creds = server.dev_setup.credentials_dir
    client = _client(server)
    client.auth.approle.login(
        role_id=(creds / f"{name}-role-id").read_text(encoding="utf-8").strip(),
        secret_id=(creds / f"{name}-secret-id").read_text(encoding="utf-8").strip(),
    )
    return client


@pytest.fixture(scope="module")
def clients(bao: OpenBaoDevServer) -> dict[str, Any]:
    """One logged-in client per role: the proxy's and the rotation job's AppRoles from
    setup.sh, and an operator token with the keyproxy-operator policy."""
    created = json.loads(
        bao.bao("token", "create", "-format=json", "-policy=keyproxy-operator", "-ttl=30m")
    )
    return {
        "proxy": _approle(bao, "proxy"),
        "rotation": _approle(bao, "rotation"),
        "operator": _client(bao, created["auth"]["client_token"]),
    }


def _kv(c: Any) -> Any:
    return c.secrets.kv.v2


def _sign(c: Any, key: str) -> None:
    c.secrets.transit.sign_data(key, hash_input=base64.b64encode(b"claims").decode())


Operation = Callable[[Any, Paths], object]

OPERATIONS: dict[str, Operation] = {
    "read key": lambda c, p: _kv(c).read_secret_version(
        p.key, mount_point="secret", raise_on_deleted_version=True
    ),
    "read key metadata": lambda c, p: _kv(c).read_secret_metadata(p.key, mount_point="secret"),
    "write key": lambda c, p: _kv(c).create_or_update_secret(
        p.key, secret={"api_key": new_key()}, mount_point="secret"
    ),
    "destroy old key version": lambda c, p: _kv(c).destroy_secret_versions(
        p.destroyable, [1], mount_point="secret"
    ),
    "delete key history": lambda c, p: _kv(c).delete_metadata_and_all_versions(
        p.destroyable, mount_point="secret"
    ),
    "list keys": lambda c, p: _kv(c).list_secrets("keyproxy/keys", mount_point="secret"),
    "read journal": lambda c, p: _kv(c).read_secret_version(
        p.journal, mount_point="secret", raise_on_deleted_version=True
    ),
    "write journal": lambda c, p: _kv(c).create_or_update_secret(
        p.journal, secret={"v": "y"}, mount_point="secret"
    ),
    "read admin credential": lambda c, p: _kv(c).read_secret_version(
        p.admin, mount_point="secret", raise_on_deleted_version=True
    ),
    "write admin credential": lambda c, p: _kv(c).create_or_update_secret(
        p.admin, secret={"v": "y"}, mount_point="secret"
    ),
    "read token state": lambda c, p: _kv(c).read_secret_version(
        p.tokens, mount_point="secret", raise_on_deleted_version=True
    ),
    "write token state": lambda c, p: _kv(c).create_or_update_secret(
        p.tokens, secret={"v": "y"}, mount_point="secret"
    ),
    "read key index": lambda c, p: (
        _kv(c).read_secret_metadata(KEY_INDEX_PATH, mount_point="secret"),
        _kv(c).read_secret_version(
            KEY_INDEX_PATH, version=1, mount_point="secret", raise_on_deleted_version=True
        ),
    ),
    "write key index": lambda c, p: _kv(c).create_or_update_secret(
        KEY_INDEX_PATH, secret={"secret": f"secret/{p.key}"}, mount_point="secret"
    ),
    "read outside keyproxy": lambda c, p: _kv(c).read_secret_version(
        p.outside, mount_point="secret", raise_on_deleted_version=True
    ),
    "sign a task token": lambda c, p: _sign(c, "keyproxy-tokens"),
    "read signing public keys": lambda c, p: c.secrets.transit.read_key("keyproxy-tokens"),
    "rotate signing key": lambda c, p: c.secrets.transit.rotate_key("keyproxy-tokens"),
    "make signing key exportable": lambda c, p: c.secrets.transit.update_key_configuration(
        "keyproxy-tokens", exportable=True
    ),
    "sign with another transit key": lambda c, p: _sign(c, p.other_transit_key),
    "write a policy": lambda c, p: c.sys.create_or_update_acl_policy(
        "keyproxy-escalate", 'path "*" { capabilities = ["sudo"] }'
    ),
    "enable an auth method": lambda c, p: c.sys.enable_auth_method("userpass", path="escalate"),
    "create a token": lambda c, p: c.auth.token.create(policies=["keyproxy-operator"], ttl="5m"),
    "renew own token": lambda c, p: c.auth.token.renew_self(),
    "look up own token": lambda c, p: c.auth.token.lookup_self(),
}

# What each role's job needs: serving (keyproxy serve), rotation (keyproxy rotate,
# keyproxy keys put) and operating (keys put/status, rotate by hand, token issue/revoke).
ALLOWED: dict[str, set[str]] = {
    "proxy": {
        "read key",
        "read key metadata",
        "read key index",
        "read token state",
        "write token state",
        "sign a task token",
        "read signing public keys",
        "renew own token",
        "look up own token",
    },
    "rotation": {
        "read key",
        "read key metadata",
        "write key",
        "write key index",
        "destroy old key version",
        "read journal",
        "write journal",
        "read admin credential",
        "renew own token",
        "look up own token",
    },
    "operator": {
        "read key",
        "read key metadata",
        "write key",
        "read key index",
        "write key index",
        "destroy old key version",
        "list keys",
        "read journal",
        "write journal",
        "read admin credential",
        "write admin credential",
        "read token state",
        "write token state",
        "sign a task token",
        "read signing public keys",
        "rotate signing key",
        "renew own token",
        "look up own token",
    },
}


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
@pytest.mark.parametrize("role", sorted(ALLOWED))
def test_policy_allows_exactly_what_the_role_needs(
    clients: dict[str, Any], paths: Paths, role: str, operation: str
) -> None:
    """Each role's token (AppRole login for proxy and rotation) can perform the operations
    its job needs, and every other operation is refused by policy (403)."""
    client = clients[role]
    if operation in ALLOWED[role]:
        OPERATIONS[operation](client, paths)
    else:
        with pytest.raises(hvac.exceptions.Forbidden):
            OPERATIONS[operation](client, paths)


def test_serving_and_rotation_policies_keep_the_critical_lines() -> None:
    """The lines the issue names hold by table: serving never writes keys or the journal,
    rotation never signs tokens (guards against the table drifting from the policies)."""
    assert not {"write key", "write journal", "read journal", "write key index"} & ALLOWED["proxy"]
    assert "sign a task token" not in ALLOWED["rotation"]
    assert {"read key", "sign a task token", "write token state"} <= ALLOWED["proxy"]
    assert {"write key", "write journal", "read admin credential"} <= ALLOWED["rotation"]


# ---------------------------------------------------------------------------- real commands


def _keyproxy_config(tmp: Path, server: OpenBaoDevServer, role: str, key_path: str) -> Path:
    creds = server.dev_setup.credentials_dir
    cfg = {
        "vault": {
            "addr": server.addr,
            "auth": {
                "method": "approle",
                "role_id_file": str(creds / f"{role}-role-id"),
                "secret_id_file": str(creds / f"{role}-secret-id"),
            },
        },
        "identity": {
            "issuers": [
                {
                    "name": "openbao",
                    "issuer": server.dev_setup.issuer,
                    "jwks_uri": server.dev_setup.jwks_uri,
                    "audiences": ["keyproxy"],
                    "algorithms": ["RS256"],
                }
            ]
        },
        "routes": {
            "legacy": {
                "upstream": "https://api.example.com",
                "secret": {"path": key_path},
                "inject": [{"header": "Authorization", "format": "Bearer {key}"}],
                "rotation": {"every": "90d", "rotator": {"type": "manual"}},
            }
        },
    }
    path = tmp / f"{role}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _keyproxy(log: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    return keyproxy(*args, env=env, stdin=stdin, log=log)


def test_keyproxy_commands_work_with_the_rotation_role_and_not_the_proxy_role(
    bao: OpenBaoDevServer, tmp_path: Path, log_dir: Path
) -> None:
    """`keyproxy keys put` and `keys status` succeed with the rotation AppRole; with the
    proxy's AppRole `keys put` is refused by Vault and nothing is written."""
    key_path = f"keyproxy/keys/cmd-{uuid.uuid4().hex[:12]}"
    log = log_dir / "policy-commands.log"
    rotation_cfg = _keyproxy_config(tmp_path, bao, "rotation", key_path)
    proxy_cfg = _keyproxy_config(tmp_path, bao, "proxy", key_path)

    put = _keyproxy(log, "keys", "put", "-c", str(rotation_cfg), "legacy", stdin=new_key())
    assert put.returncode == 0, put.stderr[-2000:]
    status = _keyproxy(log, "keys", "status", "-c", str(rotation_cfg), "--json")
    assert status.returncode == 0, status.stderr[-2000:]
    assert '"version": 1' in status.stdout

    refused = _keyproxy(log, "keys", "put", "-c", str(proxy_cfg), "legacy", stdin=new_key())
    assert refused.returncode == 1
    assert "permission denied" in refused.stderr
    versions = json.loads(bao.bao("kv", "metadata", "get", "-format=json", f"secret/{key_path}"))
    assert versions["data"]["current_version"] == 1


# ---------------------------------------------------------------------------- auth scripts


def _script(server: OpenBaoDevServer, name: str, *args: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    done = subprocess.run(
        [str(SCRIPTS / name), *args],
        capture_output=True,
        text=True,
        env={**base, **server.env(), "BAO": server.bao_bin, "HOME": str(server.workdir), **env},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"{name} failed: {done.stderr[-2000:]}"
    return done.stdout


def test_jwt_auth_script_gives_a_workload_the_proxy_role(
    bao: OpenBaoDevServer, paths: Paths, tmp_path: Path
) -> None:
    """jwt-auth.sh trusts one issuer (by OIDC discovery) and binds each role to one subject
    and audience: keyproxy logs in with that workload's JWT and reads keys, and a JWT of
    another subject is refused."""
    issuer = bao.dev_setup.issuer
    proxy_agent = bao.add_agent("jwt-proxy-workload")
    other = bao.add_agent("jwt-stranger")
    rotation_subject = "spiffe://example.org/keyproxy-rotate"
    env = {"KEYPROXY_VAULT_AUDIENCE": "keyproxy"}  # the audience OpenBao's agent tokens carry
    _script(bao, "jwt-auth.sh", issuer, proxy_agent.entity_id, rotation_subject, **env)

    role = json.loads(bao.bao("read", "-format=json", "auth/jwt/role/keyproxy-rotation"))["data"]
    assert role["bound_subject"] == rotation_subject
    assert role["token_policies"] == ["keyproxy-rotation"]

    jwt_file = tmp_path / "workload.jwt"
    jwt_file.write_text(bao.agent_token(proxy_agent), encoding="utf-8")
    auth = VaultAuth("jwt", mount="jwt", role="keyproxy-proxy", jwt_file=jwt_file)
    login = hvac.Client(url=bao.addr, timeout=10)
    login.session.trust_env = False
    answer = login.auth.jwt.jwt_login("keyproxy-proxy", jwt_file.read_text(encoding="utf-8"))
    assert answer["auth"]["token_policies"] == ["default", "keyproxy-proxy"]
    _read_with_keyproxy(VaultConfig(addr=bao.addr, auth=auth), paths.key)

    stranger = hvac.Client(url=bao.addr, timeout=10)
    stranger.session.trust_env = False
    with pytest.raises(hvac.exceptions.InvalidRequest, match="sub"):
        stranger.auth.jwt.jwt_login("keyproxy-proxy", bao.agent_token(other))


def _read_with_keyproxy(cfg: VaultConfig, key_path: str) -> None:
    import asyncio  # noqa: PLC0415  # only this helper runs an event loop

    async def read() -> int:
        vault = Vault(cfg)
        try:
            await vault.login()
            return (await vault.read_key(SecretRef("secret", key_path, "api_key"))).version
        finally:
            vault.close()

    assert asyncio.run(read()) >= 1


def _self_signed_ca(path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test cluster CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_k8s_auth_script_binds_each_role_to_its_service_account(
    bao: OpenBaoDevServer, tmp_path: Path
) -> None:
    """k8s-auth.sh configures Kubernetes auth (API server, its CA, a reviewer token, all
    from files) and binds role keyproxy-proxy to service account keyproxy and role
    keyproxy-rotation to keyproxy-rotate (the names deploy/kubernetes uses), in the given
    namespace, for the audience "vault" the pods' projected tokens carry."""
    ca = tmp_path / "cluster-ca.pem"
    _self_signed_ca(ca)
    reviewer = tmp_path / "reviewer.jwt"
    reviewer.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJyZXZpZXdlciJ9.c2ln", encoding="utf-8")
    env = {"KUBERNETES_CA_FILE": str(ca), "TOKEN_REVIEWER_JWT_FILE": str(reviewer)}
    for _ in range(2):
        out = _script(
            bao, "k8s-auth.sh", "https://kubernetes.example.internal:6443", "team-a", **env
        )
    assert "keyproxy-proxy" in out
    config = json.loads(bao.bao("read", "-format=json", "auth/kubernetes/config"))["data"]
    assert config["kubernetes_host"] == "https://kubernetes.example.internal:6443"
    assert config["kubernetes_ca_cert"] == ca.read_text(encoding="utf-8")
    expected = {"keyproxy-proxy": "keyproxy", "keyproxy-rotation": "keyproxy-rotate"}
    for role, account in expected.items():
        data = json.loads(bao.bao("read", "-format=json", f"auth/kubernetes/role/{role}"))["data"]
        assert data["bound_service_account_names"] == [account]
        assert data["bound_service_account_namespaces"] == ["team-a"]
        assert data["audience"] == "vault"
        assert data["token_policies"] == [role]
