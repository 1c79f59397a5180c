"""The floor: the least an aiohttp relay can do (read body, POST it upstream, return the answer).

    python bench/bare_relay.py PORT BACKEND_URL
No routing, no logging, no error handling. The gateway's cost is compared against this.
"""

from __future__ import annotations

import sys

import aiohttp
from aiohttp import web

UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)


async def relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    async with request.app[SESSION].post(request.app[UPSTREAM] + request.path, data=body) as upstream:
        if upstream.content_type == "text/event-stream":
            response = web.StreamResponse(status=upstream.status, headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
        return web.Response(status=upstream.status, body=await upstream.read(), content_type=upstream.content_type)


async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
    app[SESSION] = aiohttp.ClientSession()
    yield
    await app[SESSION].close()


if __name__ == "__main__":
    app = web.Application()
    app[UPSTREAM] = sys.argv[2]
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", relay)
    app.router.add_get("/health", lambda _: web.json_response({}))  # type: ignore[arg-type,return-value]
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=lambda *_: None)
