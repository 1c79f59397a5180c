"""Routing, in one place for requests and ``/v1/route/explain``: which models, which backends, in what order.

registry (routable backends of the model) → ``filter_candidates`` hooks → the strategy.
A filter or strategy that raises is logged with its plugin's name and routing goes on
without it (a strategy's candidates keep the registry's order). On a dry run (explain)
nothing is advanced: no group turn, and strategies are told through ``call.dry_run``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.backend import MISMATCHED
from gateway.endpoints import not_served, serves
from gateway.errors import GatewayError
from gateway.refused import KEY_REFUSED

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.registry import Backend
    from gateway.state import Gateway


class PluginFailed(Exception):
    """A plugin's routing code raised; explain shows it, requests route around it."""


def model_chain(gateway: Gateway, call: Call) -> list[str]:
    """The models to try in turn: a group's members (rotated per call), else the model, then the fallbacks
    the caller may use."""
    routing = gateway.config.routing
    members = routing.groups.get(call.model)
    if members:
        turn = gateway.group_turns.get(call.model, 0)
        if not call.dry_run:
            gateway.group_turns[call.model] = turn + 1
        start = turn % len(members)
        return [*members[start:], *members[:start]]
    fallbacks = call.fallbacks if call.fallbacks is not None else routing.fallbacks.get(call.model, ())
    if fallbacks:  # only models the caller may use (filter_models: e.g. the auth plugin's per-key list)
        fallbacks = gateway.plugins.pipe("filter_models", list(fallbacks), call.identity)
    return [call.model, *fallbacks]


def route(gateway: Gateway, call: Call, trace: dict[str, Any] | None = None) -> list[Backend]:
    """The backends to try for ``call.model``, best first; GatewayError when none may serve it.

    With ``trace`` (explain), every step is written into it, and a plugin that raises is
    reported as ``PluginFailed`` instead of being routed around.
    """
    candidates = list(gateway.registry.for_model(call.model))
    if trace is not None:
        _trace_registry(gateway, call, trace)
    if not candidates:
        raise no_backend(gateway, call.model)
    endpoint = call.endpoint
    candidates = [b for b in candidates if serves(b, endpoint)]
    if not candidates:
        raise not_served(call.model, endpoint)
    for plugin, fn in gateway.plugins.filters:
        try:
            kept = fn(call, candidates)
        except Exception as exc:
            _plugin_failed(gateway, call, plugin, "filter_candidates", exc, trace)
            continue
        if kept is None:
            continue
        if trace is not None:
            reasons = call.explain.get("excluded", {})
            trace["removed"] += [
                {"backend": b.name, "by": plugin, "reason": reasons.get(b.name, "filtered")}
                for b in candidates
                if b not in kept
            ]
        candidates = list(kept)
    if not candidates:
        raise GatewayError(
            503,
            f"no backend may serve model '{call.model}' for this request right now; try again later",
            code="no_backend_available",
        )
    call.route = gateway.config.routing.strategy
    plugin, strategy = gateway.plugins.strategy_owner, gateway.plugins.strategy
    try:
        if trace is not None:
            scores = getattr(strategy, "scores", None)
            trace["scores"] = (
                [{"backend": b.name, "score": round(s, 6)} for b, s in scores(candidates, call)] if scores else None
            )
        ordered = list(strategy(candidates, call))
    except Exception as exc:
        _plugin_failed(gateway, call, plugin, f"strategy '{call.route}'", exc, trace)
        call.route = "registry_order"
        return candidates
    if trace is not None:
        trace["order"] = [b.name for b in ordered][: gateway.config.routing.max_attempts]
    return ordered


def _trace_registry(gateway: Gateway, call: Call, trace: dict[str, Any]) -> None:
    call.explain["excluded"] = {}
    registered = [b for b in gateway.registry.backends.values() if call.model in b.models]
    trace.update(model=call.model, candidates=[b.name for b in registered], scores=None, order=[])
    trace["removed"] = [
        {"backend": b.name, "by": "registry", "reason": b.status + (f": {b.last_error}" if b.last_error else "")}
        for b in registered
        if not b.routable
    ]


def _plugin_failed(
    gateway: Gateway, call: Call, plugin: str, what: str, exc: Exception, trace: dict[str, Any] | None
) -> None:
    message = f"plugin '{plugin}' failed in {what}: {type(exc).__name__}: {exc}"
    if trace is not None:
        raise PluginFailed(message) from exc
    gateway.log.exception(
        "plugin_failed", plugin=plugin, hook=what, request_id=call.request_id, error=f"{type(exc).__name__}: {exc}"
    )


def no_backend(gateway: Gateway, model: str) -> GatewayError:
    if model in gateway.registry.all_models():
        serving = [b for b in gateway.registry.backends.values() if model in b.models]
        refused = [b.name for b in serving if b.status == MISMATCHED and KEY_REFUSED in b.notes]
        if refused and not any(b.routable for b in serving):
            return GatewayError(
                503,
                f"model '{model}' is out of service: its provider refused the gateway's own API key "
                f"({', '.join(refused)}); ask the gateway's admin to fix the backend's api_key",
                code="provider_key_refused",
            )
        return GatewayError(
            503,
            f"every backend serving model '{model}' is unhealthy; try again shortly or choose another model",
            code="model_unavailable",
        )
    available = ", ".join(gateway.registry.models()) or "none (no backend is registered and healthy)"
    shown = model if len(model) <= 80 else model[:80] + "..."
    return GatewayError(
        404, f"model '{shown}' is not served here; available: {available}", code="model_not_found", param="model"
    )
