"""The aiohttp application: app factory, lifecycle, and the OpenAI endpoints."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from gateway import admin, explain, handler
from gateway.call import shown
from gateway.config import ConfigError, GatewayConfig
from gateway.endpoints import ENDPOINTS
from gateway.errors import GatewayError, in_anthropic_shape
from gateway.handler import is_anthropic
from gateway.netguard import PublicOnlyResolver
from gateway.plugins import Plugins
from gateway.pool import Pool
from gateway.registry import Registry
from gateway.state import GATEWAY, Gateway
from gateway.store import Store


async def list_models(request: web.Request) -> web.Response:
    """The models served, with the routing groups that have one; ``filter_models`` narrows it per caller."""
    gateway = request.app[GATEWAY]
    try:
        identity = await handler.authenticate(gateway, request)
    except GatewayError as exc:
        return exc.to_response()
    created = int(gateway.started_at)
    served = gateway.registry.models()
    groups = [name for name, members in gateway.config.routing.groups.items() if set(members) & set(served)]
    names = sorted({*served, *groups})
    names = gateway.plugins.pipe("filter_models", names, identity)
    data = [{"id": m, "object": "model", "created": created, "owned_by": "multiverse"} for m in names]
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
    """Errors raised by aiohttp itself (unknown path, wrong method, body too large) in OpenAI's shape
    (Anthropic's under /v1/messages)."""
    response = await _enveloped(request, handler)
    if response.status >= 400 and not response.prepared and is_anthropic(request):
        return in_anthropic_shape(response)  # type: ignore[arg-type]
    return response


async def _enveloped(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
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
            served = ", ".join(f"/v1/{e}" for e in ("models", *ENDPOINTS))
            message = f"no such endpoint: {request.method} {shown(request.path)}; this gateway serves {served}"
        elif exc.status == 405:
            message = f"{request.method} is not allowed on {shown(request.path)}"
        else:
            message = exc.text or exc.reason
        return GatewayError(exc.status, message).to_response()


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    gateway = app[GATEWAY]
    routing = gateway.config.routing
    if gateway.config.state.redis:
        gateway.store = await _redis_store(gateway.config.state.redis)
    await gateway.registry.open()
    gateway.admin_key = admin.resolve_admin_key(gateway.config, gateway.log)
    gateway._http = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60, resolver=_resolver(gateway)),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=routing.connect_timeout),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent",),
    )
    gateway._pool = Pool(_resolver(gateway), connect_timeout=routing.connect_timeout)
    try:
        await gateway.plugins.call_all("startup", gateway)
        yield
    finally:
        await gateway.stop_tasks()
        shutdowns = gateway.plugins.impls("shutdown")  # one that never ends (Redis gone quiet) never holds the stop
        bound = gateway.config.server.shutdown_timeout
        await gateway.plugins.call_logged(shutdowns, "shutdown_failed", gateway, timeout=bound)
        await gateway._pool.close()
        await gateway._http.close()
        await gateway.registry.close()
        await gateway.store.close()


def _resolver(gateway: Gateway) -> PublicOnlyResolver | None:
    """Unless private backends are allowed, a resolver that refuses private addresses for registered hosts."""
    if gateway.config.admin.allow_private_backends:
        return None
    configured = [b for b in gateway.registry.backends.values() if b.read_only]  # URLs normalised (xn--)
    return PublicOnlyResolver({urlsplit(b.url).hostname or "" for b in configured})


async def _redis_store(url: str) -> Store:
    """The shared store of ``state.redis``; a start-up error naming the problem if Redis cannot be reached."""
    from gateway.redis_store import RedisStore  # imported only by gateways that use Redis

    store = RedisStore(url)
    try:
        await store.ping()
    except Exception as exc:
        await store.close()
        where = urlsplit(url).netloc.rpartition("@")[2] or url.partition("?")[0]  # never a password
        raise ConfigError(
            [f"state.redis: cannot reach Redis at {where} ({type(exc).__name__}); start it, or remove state.redis"]
        ) from None
    return store


def create_app(config: GatewayConfig) -> web.Application:
    """A gateway application for ``config``; nothing global, so tests can run several."""
    plugins = Plugins(config)
    gateway = Gateway(config, plugins, Registry(config.database_path, config.backends))
    app = web.Application(middlewares=[error_envelope], client_max_size=config.server.max_body_bytes)
    app[GATEWAY] = gateway
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(lambda app: app[GATEWAY].close_connections())
    app.router.add_get("/v1/models", list_models)
    for endpoint in ENDPOINTS:
        app.router.add_post(f"/v1/{endpoint}", handler.proxy(endpoint))
    app.router.add_post("/v1/route/explain", explain.explain)
    app.router.add_get("/health", health)
    admin.add_routes(app, config)
    _plugin_routes(app, gateway)
    return app


def _plugin_routes(app: web.Application, gateway: Gateway) -> None:
    """Routes from ``register_routes``; a path the core already serves is a start-up error."""
    taken = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None}
    for plugin, fn in gateway.plugins.impls("register_routes"):
        routes = list(fn(gateway) or ())
        for route in routes:
            if isinstance(route, web.RouteDef) and (route.method, route.path) in taken:
                raise ConfigError([f"plugins.{plugin}: {route.method} {route.path} is already served by the gateway"])
        app.router.add_routes(routes)
