"""Route `rotation` and `max_age` settings compile into typed objects; mistakes name their path."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from keyproxy import config
from keyproxy.config.model import CommandRotator, HttpRotator, ManualRotator, SecretRef
from keyproxy.errors import ConfigError
from tests.helpers.configs import CONFIG_SECTIONS

ADMIN = "https://admin.example.com"
HTTP: dict[str, Any] = {
    "type": "http",
    "admin_secret": {"path": "keyproxy/admin/legacy"},
    "create": {
        "url": f"{ADMIN}/keys",
        "headers": {"Authorization": "Bearer {admin}", "Idempotency-Key": "{attempt}"},
        "body": {"name": "keyproxy-{route}", "scopes": ["read"], "ttl": 3600},
    },
    "verify": {"method": "GET", "url": f"{ADMIN}/me", "headers": {"X-Key": "{key}"}},
    "revoke": {"method": "DELETE", "url": ADMIN + "/keys/{key_id}"},
    "key_pointer": "/data/secret",
}
BASE: dict[str, Any] = {
    **CONFIG_SECTIONS,
    "routes": {
        "legacy": {
            "upstream": "https://api.example.com",
            "secret": {"path": "keyproxy/keys/legacy"},
            "inject": [{"header": "Authorization", "format": "Bearer {key}"}],
            "max_age": "48h",
            "rotation": {"every": "24h", "grace": "10m", "rotator": HTTP},
        }
    },
}


def _route(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    route = doc["routes"]["legacy"]
    for key, value in changes.items():
        if value is None:
            route.pop(key, None)
        else:
            route[key] = value
    return doc


def _rotation(**changes: Any) -> dict[str, Any]:
    rotation = {**copy.deepcopy(BASE["routes"]["legacy"]["rotation"]), **changes}
    return _route(rotation={k: v for k, v in rotation.items() if v is not None})


def _rotator(**changes: Any) -> dict[str, Any]:
    rotator = {**copy.deepcopy(HTTP), **changes}
    return _rotation(rotator={k: v for k, v in rotator.items() if v is not None})


def _command(**fields: Any) -> dict[str, Any]:
    return _rotation(rotator={"type": "command", **fields})


def _parse(doc: dict[str, Any]) -> config.Route:
    return config.parse(json.dumps(doc), {}).routes["legacy"]


def test_http_rotation_compiles() -> None:
    """A full http rotation compiles with its durations, calls, pointers and admin secret."""
    route = _parse(BASE)
    assert route.max_age == 48 * 3600
    assert route.rotation is not None
    assert (route.rotation.every, route.rotation.grace, route.rotation.lock_timeout) == (
        86400.0,
        600.0,
        300.0,
    )
    rotator = route.rotation.rotator
    assert isinstance(rotator, HttpRotator)
    assert rotator.admin_secret == SecretRef("secret", "keyproxy/admin/legacy", "token")
    assert rotator.create.method == "POST"
    assert ("Idempotency-Key", "{attempt}") in rotator.create.headers
    assert json.loads(rotator.create.body or "") == HTTP["create"]["body"]
    assert rotator.revoke.method == "DELETE"
    assert (rotator.key_pointer, rotator.id_pointer) == ("/data/secret", "/id")


def test_no_rotation_is_the_default() -> None:
    """A route without rotation or max_age has neither."""
    route = _parse(_route(rotation=None, max_age=None))
    assert (route.rotation, route.max_age) == (None, None)


def test_command_and_manual_rotators_compile() -> None:
    """command takes argv, verify and timeout; manual needs no every."""
    command = _parse(_command(command=["/bin/x", "-v"]))
    assert command.rotation is not None
    assert command.rotation.rotator == CommandRotator(("/bin/x", "-v"))
    manual = _parse(_route(max_age=None, rotation={"rotator": {"type": "manual"}}))
    assert manual.rotation is not None
    assert manual.rotation.rotator == ManualRotator()
    assert manual.rotation.every is None


@pytest.mark.parametrize(
    ("doc", "path", "message"),
    [
        (_route(max_age="1h"), "routes.legacy.max_age", "longer than rotation.every"),
        (_route(max_age="soon"), "routes.legacy.max_age", "positive duration"),
        (_rotation(every=None), "routes.legacy.rotation.every", "required"),
        (_rotation(grace="24h"), "routes.legacy.rotation.grace", "shorter than every"),
        (_rotation(every="5m", grace=None), "routes.legacy.rotation.every", "shorter than every"),
        (
            _rotator(revoke={"url": ADMIN + "/keys/{key_id}?a={attempt}"}),
            "routes.legacy.rotation.rotator.revoke.url",
            "unknown placeholder {attempt}",
        ),
        (_rotation(jitter="1m"), "routes.legacy.rotation.jitter", "unknown key"),
        (_rotation(evry="1d"), "routes.legacy.rotation.evry", "did you mean every?"),
        (_rotator(key_pionter="/k"), "routes.legacy.rotation.rotator.key_pionter", "key_pointer?"),
        (_rotation(rotator={"tpye": "http"}), "routes.legacy.rotation.rotator.tpye", "mean type?"),
        (_rotation(rotator=None), "routes.legacy.rotation.rotator", "required"),
        (_rotation(rotator={"kind": "http"}), "routes.legacy.rotation.rotator.kind", "unknown"),
        (_rotation(rotator={"type": "ftp"}), "routes.legacy.rotation.rotator.type", "one of"),
        (
            _rotation(rotator={"type": "manual", "command": ["x"]}),
            "routes.legacy.rotation.rotator.command",
            "unknown key",
        ),
        (_rotator(create=None), "routes.legacy.rotation.rotator.create", "required"),
        (_rotator(revoke=None), "routes.legacy.rotation.rotator.revoke", "required"),
        (
            _rotator(create={"url": ADMIN + "/keys/{key}"}),
            "routes.legacy.rotation.rotator.create.url",
            "unknown placeholder {key}",
        ),
        (
            _rotator(revoke={"url": ADMIN + "/keys/{nope}"}),
            "routes.legacy.rotation.rotator.revoke.url",
            "unknown placeholder {nope}",
        ),
        (
            _rotator(revoke={"url": ADMIN + "/keys/{key_id"}),
            "routes.legacy.rotation.rotator.revoke.url",
            "unbalanced brace",
        ),
        (
            _rotator(create={"url": ADMIN, "headers": {"X-Note": "a\u0085b"}}),
            "routes.legacy.rotation.rotator.create.headers.X-Note",
            "control characters",
        ),
        (
            _rotator(create={"url": ADMIN, "headers": {"X-Note": "a\u202eb"}}),
            "routes.legacy.rotation.rotator.create.headers.X-Note",
            "control characters",
        ),
        (
            _rotator(create={"url": "http://admin.example.com/keys"}),
            "routes.legacy.rotation.rotator.create.url",
            "allow_http",
        ),
        (
            _rotator(create={"url": "ftp://admin.example.com/keys"}),
            "routes.legacy.rotation.rotator.create.url",
            "http(s) URL",
        ),
        (
            _rotator(create={"url": ADMIN, "method": "FETCH"}),
            "routes.legacy.rotation.rotator.create.method",
            "unknown method",
        ),
        (
            _rotator(create={"url": ADMIN, "headers": {"Bad Header": "x"}}),
            "routes.legacy.rotation.rotator.create.headers.Bad Header",
            "header name",
        ),
        (
            _rotator(create={"url": ADMIN, "body": {"name": "{key_id}"}}),
            "routes.legacy.rotation.rotator.create.body.name",
            "unknown placeholder",
        ),
        (
            _rotator(create={"url": ADMIN, "retries": 3}),
            "routes.legacy.rotation.rotator.create.retries",
            "unknown key",
        ),
        (_rotator(key_pointer="key"), "routes.legacy.rotation.rotator.key_pointer", "pointer"),
        (
            _rotator(admin_secret={"field": "x"}),
            "routes.legacy.rotation.rotator.admin_secret.path",
            "required",
        ),
        (
            _command(command=[]),
            "routes.legacy.rotation.rotator.command",
            "executable",
        ),
        (
            _command(command=["x"], verify="yes"),
            "routes.legacy.rotation.rotator.verify",
            "true or false",
        ),
    ],
)
def test_rotation_mistakes_name_their_path(doc: dict[str, Any], path: str, message: str) -> None:
    """Each mistake in a rotation setting is refused with its YAML path and the reason."""
    with pytest.raises(ConfigError) as raised:
        config.parse(json.dumps(doc), {})
    assert raised.value.path == path
    assert message in raised.value.message


@pytest.mark.parametrize("field", ["api_key", "other_key"])
def test_two_routes_rotating_one_secret_are_refused(field: str) -> None:
    """Two routes that rotate keys of one secret (the same key, or two fields of it) are
    refused: two journals and locks for one key, and one `key_id` and `created_at` shared
    by both keys (one route's revocation by id would hit the other's current key)."""
    doc = copy.deepcopy(BASE)
    twin = copy.deepcopy(doc["routes"]["legacy"])
    twin["secret"]["field"] = field
    doc["routes"]["twin"] = twin
    with pytest.raises(ConfigError) as raised:
        config.parse(json.dumps(doc), {})
    assert raised.value.path == "routes.twin.rotation"
    assert "route legacy rotates a key of the same secret" in raised.value.message


def test_routes_sharing_a_key_may_leave_its_rotation_to_one() -> None:
    """A route that injects a key another route rotates, without rotating it too, is fine."""
    doc = copy.deepcopy(BASE)
    twin = copy.deepcopy(doc["routes"]["legacy"])
    del twin["rotation"], twin["max_age"]
    doc["routes"]["twin"] = twin
    cfg = config.parse(json.dumps(doc), {})
    assert cfg.routes["twin"].secret == cfg.routes["legacy"].secret
