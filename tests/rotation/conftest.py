"""Fixtures shared by the tests of keyproxy.rotation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from keyproxy.devserver import OpenBaoDevServer
from tests.conftest import LegacyApiProcess
from tests.helpers.issuer import Issuer
from tests.helpers.rotation import ISSUER, Env, http_rotator, route_config, uid


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    """A local workload-identity issuer: the tests mint each agent's token."""
    return Issuer(tmp_path_factory.mktemp("rot-issuer"), ISSUER, kid="rot-1", lifetime=900)


@pytest.fixture
def make_env(
    openbao: OpenBaoDevServer,
    legacy_api: LegacyApiProcess,
    issuer: Issuer,
    tmp_path: Path,
    log_dir: Path,
) -> Callable[..., Env]:
    """Routes named by the caller (each gets its own key path); the admin secret stored."""
    admin_path = f"keyproxy/admin/{uid()}"
    openbao.put_key(admin_path, legacy_api.admin_token, field="token")

    def build(routes: dict[str, Any] | None = None, auth: Any = None, **kw: Any) -> Env:
        if routes is None:
            routes = {f"r-{uid()}": route_config(legacy_api, http_rotator(legacy_api, admin_path))}
        raw = {
            "vault": {
                "addr": openbao.addr,
                "auth": auth or {"method": "token"},
                "refresh_interval": "250ms",
                "max_staleness": "30s",
            },
            "identity": {
                "issuers": [
                    {
                        "name": "local",
                        "issuer": ISSUER,
                        "jwks_file": str(issuer.jwks_file),
                        "audiences": ["keyproxy"],
                        "algorithms": ["RS256"],
                    }
                ]
            },
            "routes": routes,
            "policies": [
                {
                    "name": "agents",
                    "issuers": ["local"],
                    "subjects": ["*"],
                    "allow": {r: {"methods": ["GET"], "paths": ["/v1/**"]} for r in routes},
                }
            ],
        }
        path = tmp_path / f"keyproxy-{uid()}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return Env(openbao, legacy_api, path, raw, log_dir)

    build.admin_path = admin_path  # type: ignore[attr-defined]  # handed to tests that need it
    return build
