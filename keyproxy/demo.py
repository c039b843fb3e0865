"""A demo upstream that speaks enough of the OpenAI API for the walkthrough.

It stands in for a legacy API that only takes a static key: it requires
`Authorization: Bearer <key>` and tells the caller only a short fingerprint of the key it
received (a SHA-256 prefix), never the key or a piece of it. That lets a person see, from
the agent's side, that a key was injected and which one, without the agent learning it.

    GET  /v1/models
    POST /v1/chat/completions      plain, or streamed as SSE with "stream": true
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from aiohttp import web

from keyproxy.secret import fingerprint

MODEL = "keyproxy-demo"


def build_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/chat/completions", _chat)
    return app


def _key_fingerprint(request: web.Request) -> str | None:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return fingerprint(key.strip())


def _unauthorized() -> web.Response:
    body = {"error": {"message": "missing API key", "type": "invalid_request_error"}}
    return web.json_response(body, status=401)


async def _models(request: web.Request) -> web.Response:
    if _key_fingerprint(request) is None:
        return _unauthorized()
    model = {"id": MODEL, "object": "model", "created": 0, "owned_by": "keyproxy"}
    return web.json_response({"object": "list", "data": [model]})


async def _chat(request: web.Request) -> web.StreamResponse:
    key_fp = _key_fingerprint(request)
    if key_fp is None:
        return _unauthorized()
    try:
        body = await request.json()
        messages = body["messages"]
        last = str(messages[-1]["content"]) if messages else ""
    except (ValueError, KeyError, TypeError, IndexError):
        return web.json_response({"error": {"message": "bad request body"}}, status=400)
    words = f"Hello from the demo upstream. You said: {last[:200]!r}.".split(" ")
    words.append(f"The key I received has fingerprint {key_fp}.")
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:12]}"
    if body.get("stream"):
        return await _stream(request, completion_id, words, key_fp)
    message = {"role": "assistant", "content": " ".join(words)}
    return web.json_response(
        {
            **_envelope(completion_id, "chat.completion"),
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": len(words), "total_tokens": 1},
        },
        headers={"X-Key-Fingerprint": key_fp},
    )


async def _stream(
    request: web.Request, completion_id: str, words: list[str], key_fp: str
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Key-Fingerprint": key_fp,
        }
    )
    await response.prepare(request)
    for i, word in enumerate(words):
        delta: dict[str, Any] = {"content": (" " if i else "") + word}
        if i == 0:
            delta["role"] = "assistant"
        await _event(response, completion_id, delta, None)
    await _event(response, completion_id, {}, "stop")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _event(
    response: web.StreamResponse, completion_id: str, delta: dict[str, Any], finish: str | None
) -> None:
    chunk = {
        **_envelope(completion_id, "chat.completion.chunk"),
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    await response.write(f"data: {json.dumps(chunk)}\n\n".encode())


def _envelope(completion_id: str, kind: str) -> dict[str, Any]:
    return {"id": completion_id, "object": kind, "created": int(time.time()), "model": MODEL}
