"""Backends belong to someone: what a host key may register and change, protected models, approval, audit.

A registration records the key that made it (``owner_key``; ``"admin"`` for the config's admin
key). A ``host`` key sees and changes only its own. Protected models (``admin.protected_models``
and every model of a backend in gateway.yaml) are served only by backends the admin registered
or approved, so nobody can register a server claiming a model to receive everyone's prompts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aiohttp import web

from gateway import audit
from gateway.admin_auth import allow
from gateway.backend import PENDING, UNKNOWN, Backend
from gateway.errors import GatewayError
from gateway.identity import Identity
from gateway.state import Gateway

AUDIT_LIMIT = 1000


def check_owner(caller: Identity, backend: Backend) -> None:
    """403 unless ``caller`` is the admin or the key that registered ``backend``."""
    if not caller.is_admin and backend.owner_key != caller.key_id:
        raise GatewayError(
            403,
            f"registration '{backend.id}' belongs to another key: a host key sees and changes only the "
            "registrations it made; ask the gateway's admin to change it",
            code="not_owner",
        )


def status_for(gateway: Gateway, caller: Identity, models: Iterable[str]) -> str:
    """The status a registration of ``models`` by ``caller`` starts in; 403 for what the caller may not register."""
    if caller.is_admin:
        return UNKNOWN
    models = list(models)
    outside = [m for m in models if not caller.may_use(m)]
    if outside:
        raise GatewayError(
            403,
            f"this key may register backends only for {', '.join(caller.models or ())}, "
            f"not {', '.join(outside)}; ask the admin for a key that allows them",
            code="model_not_allowed",
            param="models",
        )
    if gateway.config.admin.approve_registrations:
        return PENDING
    protected = sorted(set(models) & gateway.config.protected_models)
    if protected:
        raise GatewayError(
            403,
            f"{', '.join(protected)} is protected (admin.protected_models, or served by a backend in gateway.yaml): "
            "only the admin may register a backend for it; ask the admin to register it, or to turn on "
            "admin.approve_registrations so that yours waits for approval",
            code="protected_model",
            param="models",
        )
    return UNKNOWN


async def record(gateway: Gateway, caller: Identity, action: str, backend: Backend, **detail: Any) -> None:
    """Add an entry about ``backend`` to the audit trail (never a secret: fields are named, not shown)."""
    facts = {"name": backend.name, "endpoint_url": backend.url, "models": list(backend.models), **detail}
    await audit.record(gateway.registry.db, caller.key_id, caller.name, action, backend.id, facts)


@allow()
async def approve(request: web.Request, gateway: Gateway, caller: Identity) -> web.Response:
    """``POST /admin/register/{id}/approve``: a pending backend starts taking traffic."""
    registration_id = request.match_info["registration_id"]
    backend = gateway.registry.backends.get(registration_id)
    if backend is None:
        raise GatewayError(404, f"no registration with id '{registration_id}'; GET /admin/servers?status=pending")
    if backend.status != PENDING:
        raise GatewayError(409, f"registration '{registration_id}' is not pending (it is {backend.status})")
    await gateway.registry.approve(backend)
    await record(gateway, caller, "approved", backend, owner_key=backend.owner_key)
    gateway.log.info("backend_approved", registration_id=backend.id, backend=backend.name)
    return web.json_response(backend.public())


@allow()
async def audit_trail(request: web.Request, gateway: Gateway, caller: Identity) -> web.Response:
    """``GET /admin/audit?since=<Unix seconds>&limit=<n>``: who did what to which backend or key, oldest first."""
    try:
        since = float(request.query.get("since", "0"))
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise GatewayError(400, "since must be Unix seconds (e.g. 1767225600) and limit a whole number") from None
    if not 1 <= limit <= AUDIT_LIMIT:
        raise GatewayError(400, f"limit must be between 1 and {AUDIT_LIMIT}", param="limit")
    found = await audit.entries(gateway.registry.db, since, limit)
    return web.json_response({"entries": found, "count": len(found)})
