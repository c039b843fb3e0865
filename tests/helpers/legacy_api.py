"""A fake legacy API that issues, validates and revokes keys, for the rotation tests.

    python -m tests.helpers.legacy_api serve      listen on 127.0.0.1, print the port, serve forever
    python -m tests.helpers.legacy_api rotator URL
                                          a `command` rotator for it (JSON on stdin/stdout)

It runs as its own process (tests block on `keyproxy` subprocesses; an in-process server
would stall with them). The admin credential comes from LEGACY_ADMIN_TOKEN.

    POST   /admin/keys        create a key: 201 {"id", "key"}; an Idempotency-Key header
                              seen before answers the key it created then
    DELETE /admin/keys/{id}   revoke: 204, 404 if unknown
    GET    /admin/keys        {"keys": [{"id", "name", "revoked"}]}, never values
    *      /v1/...            the data API: 200 {"ok", "key_id"} for a valid Bearer key,
                              401 otherwise
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import secrets
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass

from aiohttp import web


@dataclass
class _Key:
    value: str
    name: str
    revoked: bool = False


class LegacyApi:
    def __init__(self, admin_token: str) -> None:
        self.admin_token = admin_token
        self.keys: dict[str, _Key] = {}
        self.by_value: dict[str, str] = {}
        self.attempts: dict[str, str] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/admin/keys", self.create)
        app.router.add_get("/admin/keys", self.list)
        app.router.add_delete("/admin/keys/{id}", self.revoke)
        app.router.add_route("*", "/v1/{tail:.*}", self.data)
        return app

    def _admin(self, request: web.Request) -> None:
        sent = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(sent.encode(), self.admin_token.encode()):
            raise web.HTTPUnauthorized(text="bad admin credential")

    async def create(self, request: web.Request) -> web.Response:
        self._admin(request)
        attempt = request.headers.get("Idempotency-Key", "")
        if attempt and attempt in self.attempts:
            key_id = self.attempts[attempt]
        else:
            body = await request.json() if request.can_read_body else {}
            key_id = "k" + secrets.token_hex(6)
            value = "sk-legacy-" + secrets.token_urlsafe(24)
            self.keys[key_id] = _Key(value, str(body.get("name", "")))
            self.by_value[value] = key_id
            if attempt:
                self.attempts[attempt] = key_id
        return web.json_response({"id": key_id, "key": self.keys[key_id].value}, status=201)

    async def revoke(self, request: web.Request) -> web.Response:
        self._admin(request)
        key = self.keys.get(request.match_info["id"])
        if key is None:
            raise web.HTTPNotFound(text="no such key")
        key.revoked = True
        return web.Response(status=204)

    async def list(self, request: web.Request) -> web.Response:
        self._admin(request)
        keys = [{"id": i, "name": k.name, "revoked": k.revoked} for i, k in self.keys.items()]
        return web.json_response({"keys": keys})

    async def data(self, request: web.Request) -> web.Response:
        sent = request.headers.get("Authorization", "").removeprefix("Bearer ")
        key_id = self.by_value.get(sent)
        if key_id is None or self.keys[key_id].revoked:
            return web.json_response({"error": "invalid key"}, status=401)
        await request.read()
        return web.json_response({"ok": True, "key_id": key_id})


async def _serve() -> None:
    api = LegacyApi(os.environ["LEGACY_ADMIN_TOKEN"])
    runner = web.AppRunner(api.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.base_events.Server)
    print(server.sockets[0].getsockname()[1], flush=True)  # noqa: T201
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def _rotator(base: str) -> int:
    """The `command` rotator protocol of keyproxy.rotation.rotators, for this API."""
    request = json.load(sys.stdin)
    headers = {"Authorization": f"Bearer {request['admin']}"}
    action = request["action"]
    method, url = "DELETE", f"{base}/admin/keys/{request.get('key_id')}"
    if action == "create":
        headers["Idempotency-Key"] = request["attempt"]
        method, url = "POST", f"{base}/admin/keys"
    elif action == "verify":
        headers["Authorization"] = f"Bearer {request['key']}"
        method, url = "GET", f"{base}/v1/check"
    # The base URL is the test's own http://127.0.0.1 server.
    call = urllib.request.Request(url, method=method, headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(call, timeout=10) as response:  # noqa: S310
            answer = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return 0 if action == "revoke" and exc.code == 404 else 1
    if action == "create":
        json.dump({"key": answer["key"], "key_id": answer["id"]}, sys.stdout)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["rotator"]:
        sys.exit(_rotator(sys.argv[2]))
    asyncio.run(_serve())
