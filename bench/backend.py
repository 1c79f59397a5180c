"""The benchmark's backend: as cheap as aiohttp allows, so the gateway's cost stands out.

    python bench/backend.py PORT [LATENCY_MS CAPACITY]
POST /v1/chat/completions answers a fixed small completion, or with "stream": true,
CHUNKS server-sent events GAP_MS apart (read from the request's "n_chunks" / "gap_ms").
With LATENCY_MS, each answer takes that long and at most CAPACITY are worked on at
once (the rest queue), like a GPU server with a batch limit.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

BODY = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}).encode()  # fmt: skip
CHUNK = (
    b'data: {"id":"c","object":"chat.completion.chunk","created":0,"model":"bench",'
    b'"choices":[{"index":0,"delta":{"content":"tok"},"finish_reason":null}]}\n\n'
)


LATENCY = float(sys.argv[2]) / 1000 if len(sys.argv) > 2 else 0.0
SLOTS = asyncio.Semaphore(int(sys.argv[3]) if len(sys.argv) > 3 else 1_000_000)


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if not body.get("stream"):
        if LATENCY:
            async with SLOTS:
                await asyncio.sleep(LATENCY)
        return web.Response(body=BODY, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    gap = body.get("gap_ms", 10) / 1000
    for _ in range(body.get("n_chunks", 20)):
        await response.write(CHUNK)
        await asyncio.sleep(gap)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def models(_: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "bench", "object": "model"}]})


if __name__ == "__main__":
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=lambda *_: None)
