"""The aiohttp application: app factory, lifecycle, and the OpenAI endpoints."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from gateway import admin, explain, relay
from gateway.call import Call, parse_body, request_id_of
from gateway.config import GatewayConfig
from gateway.errors import GatewayError
from gateway.netguard import PublicOnlyResolver
from gateway.plugins import Plugins
from gateway.registry import Registry
from gateway.state import GATEWAY, Gateway

ENDPOINTS = ("chat/completions", "completions", "embeddings")


def _proxy_handler(endpoint: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        gateway = request.app[GATEWAY]
        request_id = request_id_of(request)
        body = await request.read()
        try:
            call = Call(request, request_id, endpoint, body, parse_body(body))
        except GatewayError as exc:
            gateway.log.info("request_rejected", request_id=request_id, endpoint=endpoint, reason=exc.message)
            return exc.to_response({"X-Request-ID": request_id})
        return await _serve(gateway, call)

    return handle


async def _serve(gateway: Gateway, call: Call) -> web.StreamResponse:
    plugins = gateway.plugins
    gateway.requests_total += 1
    try:
        answered = await plugins.call_first(plugins.before_request, call=call) if plugins.before_request else None
        if answered is None:
            return await relay.relay(gateway, call)
        response: web.StreamResponse = answered[1]
        call.status = response.status
        return response
    except GatewayError as exc:
        call.status, call.error = exc.status, exc.message
        return exc.to_response({"X-Request-ID": call.request_id, "X-Multiverse-Attempts": str(call.attempts)})
    except asyncio.CancelledError:
        call.client_disconnected = True
        raise
    except Exception as exc:
        call.status, call.error = 500, f"{type(exc).__name__}: {exc}"
        gateway.log.exception("request_crashed", request_id=call.request_id)
        return GatewayError(
            500, "the gateway failed unexpectedly; see its log for request " + call.request_id
        ).to_response({"X-Request-ID": call.request_id})
    finally:
        if call.client_disconnected:
            call.status = call.status or 499
        if call.status >= 500 or call.error:
            gateway.requests_failed += 1
        outcome: dict[str, object] = {"error": call.error} if call.error else {}
        if call.client_disconnected:
            outcome["client_disconnected"] = True
        if call.model != call.requested_model:
            outcome["served_model"] = call.model
        core = {
            "request_id": call.request_id,
            "endpoint": call.endpoint,
            "model": call.requested_model,
            "stream": call.stream,
            "backend": call.backend.name if call.backend else None,
            "status": call.status,
            "attempts": call.attempts,
            "latency_ms": round(call.latency * 1000, 2),
        }
        gateway.log.info("request", **{**call.tags, **core, **outcome})  # a plugin's tag never hides a core field
        if plugins.request_complete:
            await plugins.call_all_logged(plugins.request_complete, "request_complete_failed", call=call)


async def list_models(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    created = int(gateway.started_at)
    served = gateway.registry.models()
    groups = [name for name, members in gateway.config.routing.groups.items() if set(members) & set(served)]
    data = [
        {"id": m, "object": "model", "created": created, "owned_by": "multiverse"} for m in sorted({*served, *groups})
    ]
    return web.json_response({"object": "list", "data": data})


async def health(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    database = "ok" if await gateway.registry.ping() else "unavailable"
    status = 200 if database == "ok" else 503
    return web.json_response(
        {
            "status": "ok" if status == 200 else "degraded",
            "database": database,
            "models": len(gateway.registry.models()),
        },
        status=status,
    )


@web.middleware
async def error_envelope(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Errors raised by aiohttp itself (unknown path, wrong method, body too large) in OpenAI's shape."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge as exc:
        limit = request.app[GATEWAY].config.server.max_body_bytes
        del exc
        return GatewayError(
            413, f"the request body is larger than {limit} bytes; send less, or raise server.max_body_bytes"
        ).to_response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            message = f"no such endpoint: {request.method} {request.path}; the OpenAI API is under /v1"
        elif exc.status == 405:
            message = f"{request.method} is not allowed on {request.path}"
        else:
            message = exc.text or exc.reason
        return GatewayError(exc.status, message).to_response()


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    gateway = app[GATEWAY]
    routing = gateway.config.routing
    await gateway.registry.open()
    gateway.admin_key = admin.resolve_admin_key(gateway.config, gateway.log)
    resolver = None
    if not gateway.config.admin.allow_private_backends:
        resolver = PublicOnlyResolver({urlsplit(b.url).hostname or "" for b in gateway.config.backends})
    gateway._http = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60, resolver=resolver),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=routing.connect_timeout),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent",),
    )
    try:
        await gateway.plugins.call_all("startup", gateway=gateway)
        yield
    finally:
        await gateway.stop_tasks()
        await gateway.plugins.call_all_logged(gateway.plugins.impls("shutdown"), "shutdown_failed", gateway=gateway)
        await gateway._http.close()
        await gateway.registry.close()


def create_app(config: GatewayConfig) -> web.Application:
    """A gateway application for ``config``; nothing global, so tests can run several."""
    plugins = Plugins(config)
    gateway = Gateway(config, plugins, Registry(config.database_path, config.backends))
    app = web.Application(middlewares=[error_envelope], client_max_size=config.server.max_body_bytes)
    app[GATEWAY] = gateway
    app.cleanup_ctx.append(_lifecycle)
    app.router.add_get("/v1/models", list_models)
    for endpoint in ENDPOINTS:
        app.router.add_post(f"/v1/{endpoint}", _proxy_handler(endpoint))
    app.router.add_post("/v1/route/explain", explain.explain)
    app.router.add_get("/health", health)
    admin.add_routes(app, config)
    return app
