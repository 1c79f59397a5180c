"""The gateway's events, derived from the hooks every plugin sees: what the ``webhooks`` plugin sends.

``backend.up`` / ``backend.down`` / ``backend.registered`` / ``backend.removed`` come from
``backend_status_changed``; ``budget.exceeded`` and ``request.failed`` from ``request_complete``.
An event is a plain dict: ``{"event", "id", "time", "data"}``; it never holds a key, a prompt or a
backend's URL (which may carry its address or a token).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from gateway.call import new_id, shown
from gateway.identity import Identity

if TYPE_CHECKING:
    from gateway.call import Call
    from gateway.registry import Backend

EVENTS = ("backend.up", "backend.down", "backend.registered", "backend.removed", "budget.exceeded", "request.failed")
BACKEND_EVENTS = {
    "healthy": "backend.up",
    "circuit_closed": "backend.up",
    "unhealthy": "backend.down",
    "mismatched": "backend.down",
    "circuit_open": "backend.down",
    "registered": "backend.registered",
    "removed": "backend.removed",
}


def event(name: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"event": name, "id": new_id(), "time": time.time(), "data": data}


def backend_event(backend: Backend, change: str, reason: str | None) -> dict[str, Any] | None:
    """The event for a ``backend_status_changed`` call, or None if it is not one."""
    name = BACKEND_EVENTS.get(change)
    if name is None:
        return None
    data = {"backend": backend.name, "models": list(backend.models), "status": backend.status, "change": change}
    return event(name, {**data, "reason": reason})


def key_name(call: Call) -> str | None:
    identity = call.identity
    return identity.name if isinstance(identity, Identity) else None


def error_code(call: Call) -> str | None:
    """The ``code`` of the error envelope the client got (rate_limit_exceeded, budget_exceeded ...), if any."""
    body = getattr(call.response, "body", None)
    if not isinstance(body, bytes) or not body.startswith(b'{"error"'):
        return None
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
    return code if isinstance(code, str) and len(code) <= 40 else None


def call_event(call: Call) -> dict[str, Any] | None:
    """``budget.exceeded`` or ``request.failed`` for a finished call, or None."""
    if call.dry_run or call.client_disconnected:
        return None
    data: dict[str, Any] = {"request_id": call.request_id, "model": shown(call.requested_model), "key": key_name(call)}
    if call.status == 429 and not call.attempts and error_code(call) == "budget_exceeded":
        return event("budget.exceeded", data)
    if not (call.status >= 500 or (call.status < 400 and call.error is not None)):  # a 5xx, or a broken stream
        return None
    attempts = [a.public() for a in call.attempts]
    data.update(status=call.status, error=call.error, endpoint=call.endpoint, attempts=attempts)
    data["backend"] = call.backend.name if call.backend is not None else None
    return event("request.failed", data)
