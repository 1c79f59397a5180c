"""``POST /v1/route/explain``: how the gateway would route a request, without calling a backend.

The body is a chat completion's. The answer shows what plugins concluded (for
task_aware: ``task_type``, ``complexity`` and the signals behind them), then, for each
model that would be tried: the candidate backends, what the registry and each filter
removed and why, each candidate's score, and the final order. It is a dry run: no
strategy, group rotation or circuit moves on because of it. A plugin that raises is
reported as a 500 naming it.
"""

from __future__ import annotations

import contextlib
from typing import Any

from aiohttp import web

from gateway.call import Call, parse_body, request_id_of
from gateway.errors import GatewayError
from gateway.handler import authenticate, observe, read_body, send
from gateway.routing import PluginFailed, model_chain, route
from gateway.state import GATEWAY, Gateway


async def explain(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    request_id = request_id_of(request)
    call = Call(gateway, request, request_id, "route/explain", b"", {})
    try:
        identity = await authenticate(gateway, request)
        body = await read_body(request)
        call = Call(gateway, request, request_id, "chat/completions", body, parse_body(body))
        call.identity, call.dry_run = identity, True
        response = web.json_response(await _decide(gateway, call))
    except GatewayError as exc:
        call.error = exc.message
        response = exc.to_response({"X-Request-ID": request_id})
    except PluginFailed as exc:
        call.error = str(exc)
        response = GatewayError(
            500, f"{exc}; fix the plugin (requests meanwhile skip it)", code="plugin_failed"
        ).to_response({"X-Request-ID": request_id})
    call.status = response.status
    await send(call, response)
    observe(gateway, call)
    return response


async def _decide(gateway: Gateway, call: Call) -> dict[str, Any]:
    plugins = gateway.plugins
    try:
        await plugins.call_refusable(plugins.before_request, "before_request_failed", call)
        answered = await plugins.call_first(plugins.answer_request, call) if plugins.answer_request else None
    except GatewayError:
        raise
    except Exception as exc:
        raise PluginFailed(f"a plugin failed before routing: {type(exc).__name__}: {exc}") from exc
    answered_by = answered[0] if answered else None
    steps = [] if answered_by else [_route_model(gateway, call, model) for model in model_chain(gateway, call)]
    analysis = call.explain.get("analysis", {})
    return {
        "requested_model": call.requested_model,
        "model": call.model if not steps else steps[0]["model"],
        **call.tags,
        "signals": analysis.get("signals", []),
        "strategy": gateway.config.routing.strategy,
        "answered_by_plugin": answered_by,
        "models": steps,
        "plugins": {k: v for k, v in call.explain.items() if k not in ("analysis", "excluded")},
    }


def _route_model(gateway: Gateway, call: Call, model: str) -> dict[str, Any]:
    if model != call.model:
        call.replace_json({**call.json, "model": model})
    trace: dict[str, Any] = {}
    with contextlib.suppress(GatewayError):  # nothing can serve it: the trace says why
        route(gateway, call, trace)
    return trace
