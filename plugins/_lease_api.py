"""The leases plugin's HTTP side: heartbeat (register, move, renew), drain, leave, and backend tokens.

An agent proves who it is with a ``host`` (or admin) key plus its own ``agent_token`` in the
body, or with a backend token ``mvb-...`` alone (a gateway without the auth plugin: the admin
hands one out per backend with ``POST /admin/agent/tokens``).
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.admin_auth import allow, presented_key
from gateway.admin_owners import check_owner, record, status_for
from gateway.backend import PENDING, UNHEALTHY, UNKNOWN, Backend
from gateway.errors import GatewayError
from gateway.identity import Identity
from gateway.jsonbody import read_object
from gateway.netguard import check_backend_url
from gateway.state import GATEWAY, Gateway
from gateway.validate import ValidationError, build

if TYPE_CHECKING:
    from plugins.leases import Lease, Plugin

TOKEN_PREFIX = "mvb-"
OFFLINE = "offline: its agent stopped; it comes back with the agent's next heartbeat"
Handler = Callable[[web.Request, Gateway, Identity, str, dict[str, Any]], Awaitable[web.Response]]


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def _models(value: list[str] | None) -> str | None:
    return None if value and all(isinstance(m, str) and m for m in value) else "must list at least one model name"


@dataclass(frozen=True)
class Beat:
    """Body of ``POST /admin/agent/heartbeat``."""

    name: str
    endpoint_url: str = field(metadata={"doc": "the URL the gateway reaches the backend at (no /v1)"})
    models: list[str] = field(metadata={"check": _models})
    interval: float = 10.0
    load: dict[str, Any] | None = None
    agent_token: str | None = None


def routes(plugin: Plugin) -> list[web.RouteDef]:
    return [
        web.post("/admin/agent/heartbeat", _agent(plugin, plugin_heartbeat(plugin))),
        web.post("/admin/agent/drain", _agent(plugin, plugin_drain(plugin))),
        web.post("/admin/agent/leave", _agent(plugin, plugin_leave(plugin))),
        web.post("/admin/register/{registration_id}/drain", allow("host")(plugin_drain_by_id(plugin))),
        web.post("/admin/agent/tokens", allow()(plugin_token(plugin))),
    ]


def _agent(plugin: Plugin, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An agent route: a backend token alone, else an admin or host key (checked by ``allow``) plus ``agent_token``."""

    async def with_key(request: web.Request, gateway: Gateway, caller: Identity) -> web.Response:
        body = await read_object(request)
        token = body.get("agent_token")
        if not isinstance(token, str) or len(token) < 16:
            raise GatewayError(
                400,
                "agent_token: required with a key (the agent's own secret, from its state file)",
                param="agent_token",
            )
        return await handler(request, gateway, caller, digest(token), body)

    keyed = allow("host")(with_key)

    async def route(request: web.Request) -> web.StreamResponse:
        given = presented_key(request) or ""
        if not given.startswith(TOKEN_PREFIX):
            return await keyed(request)
        try:
            lease = plugin.by_hash.get(digest(given))
            if lease is None:
                raise GatewayError(
                    401,
                    "this backend token is not known here; check it was copied whole, or ask the "
                    "gateway's admin for one (POST /admin/agent/tokens)",
                    code="invalid_backend_token",
                )
            caller = Identity(lease.owner_key, lease.name, role="host")
            return await handler(request, request.app[GATEWAY], caller, lease.token_hash, await read_object(request))
        except GatewayError as exc:
            return exc.to_response()

    return route


def _lease_of(plugin: Plugin, caller: Identity, token_hash: str, name: str) -> Lease:
    from plugins.leases import Lease

    lease = plugin.by_hash.get(token_hash)
    if lease is None:
        return Lease(token_hash, name, caller.key_id, None, plugin.options.lease_intervals)
    if not caller.is_admin and lease.owner_key != caller.key_id:
        raise GatewayError(
            403,
            "this agent's registration belongs to another key; run the agent with the key that "
            "registered it, or delete its state file to register anew",
            code="not_owner",
        )
    return lease


def plugin_heartbeat(plugin: Plugin) -> Handler:
    async def heartbeat(
        request: web.Request, gateway: Gateway, caller: Identity, token_hash: str, body: dict[str, Any]
    ) -> web.Response:
        try:
            beat = build(Beat, {**body, "agent_token": None})
        except ValidationError as exc:
            raise GatewayError(400, "; ".join(exc.problems), param=exc.problems[0].split(":")[0]) from None
        low, high = plugin.options.min_interval, plugin.options.max_interval
        if not low <= beat.interval <= high:
            raise GatewayError(400, f"interval must be between {low:g} and {high:g} seconds", param="interval")
        url = (await check_backend_url(beat.endpoint_url, gateway.config.admin.allow_private_backends)).url
        backend, lease, events = await keep(plugin, gateway, caller, token_hash, beat, url)
        answer = {
            "registration_id": backend.id,
            "name": backend.name,
            "endpoint_url": backend.url,
            "models": list(backend.models),
            "status": backend.status,
            "lease_seconds": lease.seconds,
            "in_flight": backend.in_flight,
            "draining": bool(lease.draining),
            "changed": events,
        }
        return web.json_response(answer, status=201 if events[:1] == ["registered"] else 200)

    return heartbeat


async def keep(
    plugin: Plugin, gateway: Gateway, caller: Identity, token_hash: str, beat: Beat, url: str
) -> tuple[Backend, Lease, list[str]]:
    """Register, move or renew the agent's backend at ``url``; the events that changed something."""
    async with gateway.registry.lock:
        lease = _lease_of(plugin, caller, token_hash, beat.name)
        backend = gateway.registry.backends.get(lease.registration_id or "")
        changed = await (
            _move(gateway, caller, backend, url, beat) if backend else _add(gateway, caller, lease, url, beat)
        )
        backend = changed[0]
        if lease.registration_id != backend.id or lease.interval != beat.interval or lease.name != beat.name:
            lease.registration_id, lease.interval, lease.name = backend.id, beat.interval, beat.name
            await plugin.save(gateway, lease)
    lease.renew()
    if lease.draining == "agent":  # a restarted agent; an admin's drain holds until the agent leaves
        lease.draining = ""
    if backend.status == UNHEALTHY and backend.last_error == OFFLINE:
        await gateway.registry.set_status(backend, UNKNOWN, event="online")
    from plugins.leases import agent_note

    backend.notes["agent"] = agent_note(lease, beat.load or {})
    events = changed[1]
    if events:
        await record(gateway, caller, events[0], backend, fields=events[1:])
        gateway.log.info("agent_" + events[0], registration_id=backend.id, backend=backend.name, fields=events[1:])
    return backend, lease, events


async def _add(gateway: Gateway, caller: Identity, lease: Lease, url: str, beat: Beat) -> tuple[Backend, list[str]]:
    """A first heartbeat: register the backend (or take back the agent's own registration at that URL)."""
    existing = gateway.registry.by_url(url)
    if existing is not None:
        raise GatewayError(
            409,
            f"{url} is already registered as '{existing.id}' by someone else; remove that "
            "registration first, or give the agent another --public-url",
            param="endpoint_url",
        )
    status = status_for(gateway, caller, beat.models)
    try:
        backend = await gateway.registry.add(url, beat.models, beat.name, owner_key=lease.owner_key, status=status)
    except sqlite3.IntegrityError:
        raise GatewayError(409, f"{url} is already registered", param="endpoint_url") from None
    return backend, ["registered"]


async def _move(
    gateway: Gateway, caller: Identity, backend: Backend, url: str, beat: Beat
) -> tuple[Backend, list[str]]:
    """Apply what changed (a new tunnel URL, new models) in place; nothing changed: nothing written."""
    changes: dict[str, Any] = {}
    if backend.url != url:
        other = gateway.registry.by_url(url)
        if other is not None and other is not backend:
            raise GatewayError(409, f"{url} is already registered as '{other.id}'", param="endpoint_url")
        changes["url"] = url
    if tuple(beat.models) != backend.models:
        changes["models"] = beat.models
    if backend.name != beat.name:
        changes["name"] = beat.name
    if not changes:
        return backend, []
    status = status_for(gateway, caller, beat.models) if "models" in changes or "url" in changes else None
    await gateway.registry.update(backend, changes)
    if status == PENDING and backend.status != PENDING:
        await gateway.registry.approve(backend, pending=True)
    return backend, ["updated", *sorted(changes)]


def plugin_drain(plugin: Plugin) -> Handler:
    async def drain(
        request: web.Request, gateway: Gateway, caller: Identity, token_hash: str, body: dict[str, Any]
    ) -> web.Response:
        lease = plugin.by_hash.get(token_hash)
        backend = gateway.registry.backends.get(lease.registration_id or "") if lease else None
        if lease is None or backend is None:
            raise GatewayError(404, "this agent has no registration here (nothing to drain)")
        return _drained(gateway, lease, backend)

    return drain


def _drained(gateway: Gateway, lease: Lease, backend: Backend, by: str = "agent") -> web.Response:
    if not lease.draining:
        lease.draining = by
        gateway.log.info("backend_draining", registration_id=backend.id, backend=backend.name)
    backend.notes.setdefault("agent", {})["draining"] = True
    return web.json_response({"registration_id": backend.id, "draining": True, "in_flight": backend.in_flight})


def plugin_drain_by_id(plugin: Plugin) -> Callable[[web.Request, Gateway, Identity], Awaitable[web.Response]]:
    async def drain_by_id(request: web.Request, gateway: Gateway, caller: Identity) -> web.Response:
        registration_id = request.match_info["registration_id"]
        backend = gateway.registry.backends.get(registration_id)
        lease = plugin.by_registration(registration_id)
        if backend is None or lease is None:
            raise GatewayError(404, f"no agent-kept registration with id '{registration_id}'; GET /admin/servers")
        check_owner(caller, backend)
        return _drained(gateway, lease, backend, by="admin" if caller.is_admin else "agent")

    return drain_by_id


def plugin_leave(plugin: Plugin) -> Handler:
    async def leave(
        request: web.Request, gateway: Gateway, caller: Identity, token_hash: str, body: dict[str, Any]
    ) -> web.Response:
        lease = plugin.by_hash.get(token_hash)
        backend = gateway.registry.backends.get(lease.registration_id or "") if lease else None
        if lease is None or backend is None:
            raise GatewayError(404, "this agent has no registration here (nothing to remove)")
        answer = await leave_now(gateway, caller, lease, backend, bool(body.get("keep")))
        return web.json_response(answer)

    return leave


async def leave_now(gateway: Gateway, caller: Identity, lease: Lease, backend: Backend, kept: bool) -> dict[str, Any]:
    """An agent leaves: its backend is removed, or kept as offline."""
    lease.expires_at, lease.draining = 0.0, ""
    if kept:
        await gateway.registry.set_status(backend, UNHEALTHY, OFFLINE, event="offline")
        answer = {"registration_id": backend.id, "kept": True, "status": backend.status}
    else:
        await gateway.registry.remove(backend)
        await record(gateway, caller, "removed", backend, owner_key=backend.owner_key)
        answer = {"registration_id": backend.id, "deleted": True}
    gateway.log.info("agent_left", registration_id=backend.id, backend=backend.name, kept=kept)
    return answer


def plugin_token(plugin: Plugin) -> Callable[[web.Request, Gateway, Identity], Awaitable[web.Response]]:
    async def token(request: web.Request, gateway: Gateway, caller: Identity) -> web.Response:
        from plugins.leases import Lease

        name = (await read_object(request)).get("name")
        if not isinstance(name, str) or not name:
            raise GatewayError(400, "name: required (whose backend the token is for)", param="name")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        owner = "token:" + digest(secret)[:12]
        await plugin.save(gateway, Lease(digest(secret), name, owner, None, 10.0, plugin.options.lease_intervals))
        gateway.log.info("backend_token_created", name=name, owner_key=owner)
        return web.json_response(
            {
                "token": secret,
                "name": name,
                "owner_key": owner,
                "note": "the token is shown once: hand it to the student, who runs multiverse agent --key <token>",
            },
            status=201,
        )

    return token
