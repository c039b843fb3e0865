"""Rotators: how a route's key is created, verified and revoked at its upstream.

    Rotator (protocol)     create(attempt) -> NewKey · verify(key) · revoke(key)
    ├── HttpRotator        declarative templated HTTP calls (config.model.HttpRotator)
    └── CommandRotator     an executable speaking JSON on stdin/stdout

`attempt` is the rotation's idempotency key: the same attempt must yield the same upstream key,
so a create whose answer was lost in a crash is adopted, not orphaned (docs/rotation.md).
Manual routes have no rotator: `keyproxy keys put` stores their keys.

Every failure is a `RotatorError` whose message names the call and the HTTP status or exit
code, never a response body, stderr or any key or credential.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
from yarl import URL

from keyproxy import capped, command, netguard, secret, strictjson, text
from keyproxy.config import CommandRotator, HttpCall, HttpRotator, Network, SecretRef
from keyproxy.errors import EgressDenied, KeyproxyError
from keyproxy.secret import Secret
from keyproxy.vault import Vault

_MAX_ANSWER = 1024 * 1024
_REVOKED_ALREADY = frozenset({404, 410})


class RotatorError(KeyproxyError):
    """A create, verify or revoke call failed. The message holds no secret."""


@dataclass(frozen=True)
class UpstreamKey:
    """A key as the upstream knows it: its value and, when the upstream names keys, its id."""

    secret: Secret
    key_id: str | None = None


class Rotator(Protocol):
    async def create(self, attempt: str) -> UpstreamKey: ...

    async def verify(self, key: UpstreamKey) -> None: ...

    async def revoke(self, key: UpstreamKey) -> None: ...


def build(
    route: str,
    cfg: HttpRotator | CommandRotator,
    vault: Vault,
    session: aiohttp.ClientSession,
    egress_allow: Sequence[Network] = (),
) -> Rotator:
    """The rotator for `route`; its admin credential is read from Vault on first use.
    `session` must be fenced (keyproxy.upstream.UpstreamSessions); `egress_allow` is the route's
    allowance, checked here for IP-literal URLs, which skip the session's resolver."""
    if isinstance(cfg, HttpRotator):
        return _Http(route, cfg, _Admin(vault, cfg.admin_secret), session, egress_allow)
    return _Command(route, cfg, _Admin(vault, cfg.admin_secret))


class _Admin:
    """The admin credential a rotator presents upstream, read once from Vault."""

    def __init__(self, vault: Vault, ref: SecretRef | None) -> None:
        self._vault, self._ref = vault, ref
        self._value: str | None = None

    async def value(self) -> str | None:
        if self._ref is None or self._value is not None:
            return self._value
        data, _ = await self._vault.read_kv(self._ref.mount, self._ref.path)
        value = data.get(self._ref.field)
        if not isinstance(value, str) or not value:
            raise RotatorError(
                f"admin secret {self._ref.mount}/{self._ref.path}: no field {self._ref.field!r}"
            )
        why = secret.problem(value)
        if why is not None:
            raise RotatorError(f"admin secret {self._ref.mount}/{self._ref.path}: the value {why}")
        secret.register(value)
        self._value = value
        return value


MAX_KEY_ID = 256  # characters of an upstream's key id


def _upstream_key(value: Any, key_id: Any, what: str) -> UpstreamKey:
    if not isinstance(value, str) or not value:
        raise RotatorError(f"{what}: the answer holds no usable key")
    why = secret.problem(value)
    if why is not None:
        raise RotatorError(f"{what}: the key {why}")
    secret.register(value)
    if key_id is None:
        return UpstreamKey(Secret(value), None)
    # SECURITY: the id goes into the journal, a revocation's URL and the operator's terminal
    # (keys status): text of a sensible length without controls, or a whole number.
    text_id = str(key_id) if isinstance(key_id, str | int) and not isinstance(key_id, bool) else ""
    if not 0 < len(text_id) <= MAX_KEY_ID or text.hidden(text_id):
        raise RotatorError(
            f"{what}: the key id is not a string of 1 to {MAX_KEY_ID} characters without "
            "controls, or a whole number"
        )
    return UpstreamKey(Secret(value), text_id)


# ---------------------------------------------------------------------------- http


class _Http:
    def __init__(
        self,
        route: str,
        cfg: HttpRotator,
        admin: _Admin,
        session: aiohttp.ClientSession,
        egress_allow: Sequence[Network],
    ) -> None:
        self._route, self._cfg, self._admin, self._session = route, cfg, admin, session
        self._egress_allow = egress_allow
        self._ssl: ssl.SSLContext | bool = cfg.tls_verify
        if cfg.ca_file is not None:
            self._ssl = ssl.create_default_context(cafile=str(cfg.ca_file))

    async def create(self, attempt: str) -> UpstreamKey:
        status, answer = await self._send("create", self._cfg.create, attempt, None)
        if not 200 <= status < 300:
            raise RotatorError(f"create: the upstream answered {status}")
        try:
            # Strictly: a key given twice (`{"key": "a", "key": "b"}`) is no answer.
            document = strictjson.loads(answer)
        except ValueError:
            raise RotatorError("create: the answer is not JSON") from None
        value = _pointer(document, self._cfg.key_pointer)
        key_id = _pointer(document, self._cfg.id_pointer)
        return _upstream_key(value, key_id, "create")

    async def verify(self, key: UpstreamKey) -> None:
        if self._cfg.verify is None:
            return
        status, _ = await self._send("verify", self._cfg.verify, "", key)
        if not 200 <= status < 300:
            raise RotatorError(f"verify: the upstream answered {status}")

    async def revoke(self, key: UpstreamKey) -> None:
        status, _ = await self._send("revoke", self._cfg.revoke, "", key)
        if not 200 <= status < 300 and status not in _REVOKED_ALREADY:
            raise RotatorError(f"revoke: the upstream answered {status}")

    async def _send(
        self, what: str, call: HttpCall, attempt: str, key: UpstreamKey | None
    ) -> tuple[int, bytes]:
        values = {"route": self._route, "attempt": attempt, "admin": await self._admin.value()}
        if key is not None:
            values["key"], values["key_id"] = key.secret.reveal(), key.key_id
        url = _render(call.url, values, what, quote_values=True)
        headers = {name: _render(v, values, what) for name, v in call.headers}
        body = None
        if call.body is not None:
            body = json.dumps(_render_json(json.loads(call.body), values, what)).encode()
            headers.setdefault("Content-Type", "application/json")
        try:
            netguard.check_host(URL(url).host or "", self._egress_allow)
        except EgressDenied as exc:
            raise RotatorError(f"{what}: {exc.message}") from None
        try:
            async with self._session.request(
                call.method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                ssl=self._ssl,
                timeout=aiohttp.ClientTimeout(total=self._cfg.timeout),
            ) as response:
                answer = await capped.read_body(response.content, _MAX_ANSWER)
        except (aiohttp.ClientError, TimeoutError) as exc:
            denial = netguard.egress_denial(exc)  # a name the fence resolved to no allowed address
            if denial is not None:
                raise RotatorError(f"{what}: {denial.message}") from None
            # SECURITY: the URL may carry the key; name only the error type.
            raise RotatorError(f"{what}: request failed ({type(exc).__name__})") from None
        if answer is None:
            raise RotatorError("the upstream answer is too large")
        return response.status, answer


_PLACEHOLDER = re.compile(r"\{(route|attempt|admin|key|key_id)\}")


def _render(
    template: str, values: dict[str, str | None], what: str, quote_values: bool = False
) -> str:
    """One pass over the template: a value is never itself searched for placeholders."""

    def substitute(match: re.Match[str]) -> str:
        name = match[1]
        value = values.get(name)
        if value is None or (value == "" and name == "attempt"):
            raise RotatorError(f"{what}: {{{name}}} is used but has no value here")
        return quote(value, safe="") if quote_values else value

    return _PLACEHOLDER.sub(substitute, template)


def _render_json(value: Any, values: dict[str, str | None], what: str) -> Any:
    if isinstance(value, str):
        return _render(value, values, what)
    if isinstance(value, list):
        return [_render_json(v, values, what) for v in value]
    if isinstance(value, dict):
        return {k: _render_json(v, values, what) for k, v in value.items()}
    return value


def _pointer(document: Any, pointer: str) -> Any:
    """RFC 6901: the value at `pointer`, or None where the path does not exist."""
    for raw in pointer.split("/")[1:]:
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(document, dict):
            document = document.get(part)
        elif isinstance(document, list) and part.isdigit() and int(part) < len(document):
            document = document[int(part)]
        else:
            return None
    return document


# ---------------------------------------------------------------------------- command


class _Command:
    """Runs `argv` once per call with one JSON object on stdin:

        {"action": "create"|"verify"|"revoke", "route": ..., "attempt": ...,
         "admin": ... (if admin_secret), "key": ..., "key_id": ... (verify, revoke)}

    and expects exit status 0 and, for create, {"key": ..., "key_id": ...} on stdout.
    """

    def __init__(self, route: str, cfg: CommandRotator, admin: _Admin) -> None:
        self._route, self._cfg, self._admin = route, cfg, admin

    async def create(self, attempt: str) -> UpstreamKey:
        answer = await self._run("create", {"attempt": attempt})
        if not isinstance(answer, dict):
            raise RotatorError("create: the command's answer is not a JSON object")
        return _upstream_key(answer.get("key"), answer.get("key_id"), "create")

    async def verify(self, key: UpstreamKey) -> None:
        if self._cfg.verify:
            await self._run("verify", {"key": key.secret.reveal(), "key_id": key.key_id})

    async def revoke(self, key: UpstreamKey) -> None:
        await self._run("revoke", {"key": key.secret.reveal(), "key_id": key.key_id})

    async def _run(self, action: str, fields: dict[str, Any]) -> Any:
        request = {"action": action, "route": self._route, **fields}
        admin = await self._admin.value()
        if admin is not None:
            request["admin"] = admin
        try:
            async with asyncio.timeout(self._cfg.timeout):
                done = await command.run(
                    self._cfg.argv,
                    limit=_MAX_ANSWER,
                    stdin=json.dumps(request).encode(),
                    # SECURITY: not our environment: it holds the Vault token (BAO_TOKEN).
                    env=_command_env(),
                    stderr=asyncio.subprocess.DEVNULL,  # SECURITY: may echo what it was given
                )
        except TimeoutError:  # an OSError too: caught first
            raise RotatorError(f"{action}: the command ran longer than its timeout") from None
        except OSError as exc:
            raise RotatorError(f"{action}: cannot run the command ({exc.strerror})") from None
        except command.CommandError as exc:
            raise RotatorError(f"{action}: the command {exc}") from None
        if done.status != 0:
            raise RotatorError(f"{action}: the command exited with status {done.status}")
        if action != "create":
            return None
        try:
            return strictjson.loads(done.output)  # strictly, as an HTTP rotator's
        except ValueError:
            raise RotatorError(f"{action}: the command's answer is not JSON") from None


# What a rotator command inherits from keyproxy's environment: enough to run, no credentials.
_COMMAND_ENV = ("PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "SSL_CERT_FILE", "SSL_CERT_DIR")


def _command_env() -> dict[str, str]:
    return {name: os.environ[name] for name in _COMMAND_ENV if name in os.environ}


__all__ = ["Rotator", "RotatorError", "UpstreamKey", "build"]
