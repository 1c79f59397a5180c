"""``multiverse demo-backend``: a tiny OpenAI-compatible server that echoes prompts word by word.

For trying the gateway without a GPU and for classes. The response builders are
also what the tests' fake backend sends.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct
import time
import uuid
from typing import Any

from aiohttp import web
from aiohttp_sse import sse_response

from gateway.call import prompt_text

MODEL = web.AppKey("model", str)
DELAY = web.AppKey("delay", float)


def _usage(prompt: str, completion: str) -> dict[str, int]:
    p, c = len(prompt.split()), len(completion.split())
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def completion_body(kind: str, model: str, text: str, prompt: str = "") -> dict[str, Any]:
    """A whole chat (``kind='chat'``) or text completion."""
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
        }
        obj, prefix = "chat.completion", "chatcmpl"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}
        obj, prefix = "text_completion", "cmpl"
    return {
        "id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": obj, "created": int(time.time()), "model": model,
        "choices": [choice], "usage": _usage(prompt, text),
    }  # fmt: skip


def chunk_body(kind: str, model: str, piece: str, chunk_id: str, finish: str | None = None) -> dict[str, Any]:
    """One streamed chunk of a chat or text completion."""
    if kind == "chat":
        delta = {"role": "assistant", "content": piece} if piece or not finish else {}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": chunk_id, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}


def embedding_body(model: str, inputs: list[str], encoding_format: str = "float") -> dict[str, Any]:
    """Deterministic 8-dimensional embeddings derived from each input's hash."""
    data = []
    for index, text in enumerate(inputs):
        digest = hashlib.sha256(text.encode()).digest()
        vector = [round(b / 255 - 0.5, 4) for b in digest[:8]]
        encoded: Any = vector
        if encoding_format == "base64":
            encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = sum(len(t.split()) for t in inputs)
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def error_body(message: str, code: str = "model_not_found") -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": "model", "code": code}}


async def _body_for(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = await request.json()
    except ValueError:
        return web.json_response(error_body("body is not JSON", "invalid_json"), status=400)
    if body.get("model") != request.app[MODEL]:
        return web.json_response(error_body(f"this server serves '{request.app[MODEL]}' only"), status=404)
    return dict(body)


async def _complete(request: web.Request, kind: str) -> web.StreamResponse:
    body = await _body_for(request)
    if isinstance(body, web.Response):
        return body
    model, prompt = request.app[MODEL], prompt_text(body)
    words = prompt.split() or ["(empty", "prompt)"]
    if not body.get("stream"):
        return web.json_response(completion_body(kind, model, " ".join(words), prompt))
    chunk_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    async with sse_response(request, allow_all_methods=True) as sse:
        for i, word in enumerate(words):
            await sse.send(json.dumps(chunk_body(kind, model, word if i == 0 else " " + word, chunk_id)))
            await asyncio.sleep(request.app[DELAY])
        await sse.send(json.dumps(chunk_body(kind, model, "", chunk_id, finish="stop")))
        await sse.send("[DONE]")
    return sse


async def chat(request: web.Request) -> web.StreamResponse:
    return await _complete(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, "text")


async def embeddings(request: web.Request) -> web.Response:
    body = await _body_for(request)
    if isinstance(body, web.Response):
        return body
    raw = body.get("input", "")
    inputs = [raw] if isinstance(raw, str) else [str(x) for x in raw]
    return web.json_response(embedding_body(request.app[MODEL], inputs, body.get("encoding_format", "float")))


async def models(request: web.Request) -> web.Response:
    model = request.app[MODEL]
    return web.json_response(
        {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "demo"}]}
    )


async def health(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(model: str = "echo", delay: float = 0.05) -> web.Application:
    app = web.Application()
    app[MODEL], app[DELAY] = model, delay
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/health", health)
    return app


def run(host: str, port: int, model: str, delay: float) -> None:
    print(f"demo backend serving model '{model}' on http://{host}:{port} (Ctrl-C to stop)", flush=True)
    web.run_app(create_app(model, delay), host=host, port=port, print=lambda *_: None, access_log=None)
