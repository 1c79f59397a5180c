"""``POST /v1/route/explain``: how the gateway would route a request, without calling a backend.

The body is a chat completion's. The answer shows what plugins concluded (for
task_aware: ``task_type``, ``complexity`` and the signals behind them), then, for each
model that would be tried: the candidate backends, what the registry and each filter
removed and why, each candidate's score, and the final order.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.call import Call, parse_body, request_id_of
from gateway.errors import GatewayError
from gateway.relay import model_chain
from gateway.state import GATEWAY, Gateway


async def explain(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    request_id = request_id_of(request)
    try:
        body = await request.read()
        call = Call(request, request_id, "chat/completions", body, parse_body(body))
        call.dry_run = True
        return web.json_response(await _decide(gateway, call))
    except GatewayError as exc:
        return exc.to_response({"X-Request-ID": request_id})


async def _decide(gateway: Gateway, call: Call) -> dict[str, Any]:
    answered = await gateway.plugins.call_first(gateway.plugins.before_request, call=call)
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
    call.explain["excluded"] = {}
    registered = [b for b in gateway.registry.backends.values() if model in b.models]
    candidates = [b for b in registered if b.routable]
    removed: list[dict[str, Any]] = [
        {"backend": b.name, "by": "registry", "reason": f"{b.status}" + (f": {b.last_error}" if b.last_error else "")}
        for b in registered
        if not b.routable
    ]
    for plugin, fn in gateway.plugins.filter_candidates:
        kept = fn(call=call, candidates=candidates)
        kept = candidates if kept is None else kept
        reasons = call.explain["excluded"]
        removed += [
            {"backend": b.name, "by": plugin, "reason": reasons.get(b.name, "filtered")}
            for b in candidates
            if b not in kept
        ]
        candidates = kept
    strategy = gateway.plugins.strategy
    scores = getattr(strategy, "scores", None)
    scored = [{"backend": b.name, "score": round(s, 6)} for b, s in scores(candidates, call)] if scores else None
    order = [b.name for b in strategy(candidates, call)] if candidates else []
    return {
        "model": model,
        "candidates": [b.name for b in registered],
        "removed": removed,
        "scores": scored,
        "order": order[: gateway.config.routing.max_attempts],
    }
