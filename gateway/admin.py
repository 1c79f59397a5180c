"""The admin API: register, update, list and remove backends; stats.

Each route names the roles it allows besides the admin (see admin_auth.allow); a host key
works on its own registrations only (admin_owners).
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from gateway.admin_auth import REGISTRATION_LIMIT, TokenBuckets, allow, limit_registrations
from gateway.admin_auth import resolve_admin_key as resolve_admin_key
from gateway.admin_owners import approve, audit_trail, check_owner, record, status_for
from gateway.checker import refuse_unless_conformant
from gateway.config import GatewayConfig, ModelProfile, _http_url
from gateway.endpoints import endpoints_problem
from gateway.errors import GatewayError
from gateway.identity import Identity
from gateway.jsonbody import parse_object, read_object
from gateway.netguard import BackendURL, check_backend_url
from gateway.registry import PENDING, STATUSES, Backend
from gateway.state import Gateway
from gateway.validate import ValidationError, build, positive


def _models_list(value: list[str] | None) -> str | None:
    if value is not None and (not value or not all(isinstance(m, str) and m for m in value)):
        return "must be a non-empty list of model names"
    return None


@dataclass(frozen=True)
class Registration:
    """Body of POST /admin/register (``endpoint_url`` required) and PUT (any subset)."""

    endpoint_url: str | None = field(
        default=None, metadata={"doc": "base URL of your server, without /v1", "check": lambda v: v and _http_url(v)}
    )
    model_name: str | None = None
    models: list[str] | None = field(default=None, metadata={"check": _models_list})
    name: str | None = None
    owner_name: str | None = None
    owner_email: str | None = None
    description: str | None = None
    api_key: str | None = field(default=None, metadata={"doc": "the backend's own key, sent to it as a bearer token"})
    connect_timeout: float | None = field(default=None, metadata={"check": positive})
    ttft_timeout: float | None = field(default=None, metadata={"check": positive})
    stall_timeout: float | None = field(default=None, metadata={"check": positive})
    weight: float | None = field(default=None, metadata={"check": positive})
    max_concurrency: int | None = field(
        default=None, metadata={"doc": "requests it works on at once (llama.cpp's server: 1)", "check": positive}
    )
    profile: ModelProfile | None = field(default=None, metadata={"doc": "capabilities, tier and cost of its models"})
    endpoints: list[str] | None = field(
        default=None,
        metadata={"doc": "the /v1/ endpoints it serves; unset: every OpenAI one", "check": endpoints_problem},
    )
    aliases: dict[str, str] | None = field(
        default=None, metadata={"doc": "the class's model name -> this server's own name for it"}
    )


def _validated(cls: type[Any], data: dict[str, Any]) -> Any:
    try:
        return build(cls, data)
    except ValidationError as exc:
        raise GatewayError(400, "; ".join(exc.problems), param=exc.problems[0].split(":")[0]) from None


def _models_of(body: Registration) -> list[str] | None:
    if body.model_name and body.models:
        raise GatewayError(400, "give either 'model_name' or 'models', not both", param="models")
    return [body.model_name] if body.model_name else body.models


MODEL_LIST_LIMIT = 4 * 1024 * 1024
"""Most bytes read from a backend's /v1/models at registration."""


async def discover_models(gateway: Gateway, url: str, api_key: str | None) -> list[str]:
    """Ask a backend which models it serves, through its /v1/models (``url`` is canonical: no /v1)."""
    target = f"{url}/v1/models"
    hint = "; check that endpoint_url is the server's base URL, or pass 'model_name' or 'models' instead"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    try:
        timeout = aiohttp.ClientTimeout(total=gateway.config.routing.connect_timeout + 5)
        async with gateway.http.get(target, timeout=timeout, allow_redirects=False, headers=headers) as response:
            if response.status != 200:
                raise GatewayError(400, f"could not list models at {target}: HTTP {response.status}{hint}")
            raw = await response.content.read(MODEL_LIST_LIMIT + 1)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise GatewayError(400, f"could not reach {target} to list its models ({type(exc).__name__}){hint}") from None
    if len(raw) > MODEL_LIST_LIMIT:
        raise GatewayError(400, f"{target} answered with more than {MODEL_LIST_LIMIT} bytes{hint}")
    try:
        payload = parse_object(raw, what=f"the answer of {target}")
    except GatewayError as exc:
        raise GatewayError(400, exc.message + hint) from None
    entries = payload.get("data")
    models = [e["id"] for e in entries or [] if isinstance(e, dict) and isinstance(e.get("id"), str)]
    if not models:
        raise GatewayError(400, f"{target} lists no models{hint}")
    return models


def given_fields(body: Registration) -> dict[str, Any]:
    """The registration's optional fields that were given, by registry field name."""
    skip = ("endpoint_url", "model_name", "models")
    given = {k: v for k, v in vars(body).items() if v is not None and k not in skip}
    if "profile" in given:
        given["profile"] = dataclasses.asdict(given["profile"])
    return given


def _existing(gateway: Gateway, url: str) -> Backend | None:
    """The registration ``url`` refreshes, or None if there is room for a new one; 409 otherwise."""
    existing = gateway.registry.by_url(url)
    if existing is not None and existing.read_only:
        raise GatewayError(409, f"{url} is already configured in gateway.yaml as '{existing.name}'")
    limit = gateway.config.admin.max_backends
    if existing is None and sum(b.source == "api" for b in gateway.registry.backends.values()) >= limit:
        raise GatewayError(
            409, f"the gateway already holds {limit} registered backends (admin.max_backends); remove one first"
        )
    return existing


def _url_taken(url: str) -> GatewayError:
    """A write refused by the database's unique URL (another gateway on the same database got there first)."""
    return GatewayError(409, f"{url} is already registered; GET /admin/servers lists it", param="endpoint_url")


@allow("host")
async def register(request: web.Request, gateway: Gateway, caller: Identity) -> web.Response:
    limit_registrations(request, gateway)
    body: Registration = _validated(Registration, await read_object(request))
    if body.endpoint_url is None:
        raise GatewayError(400, "endpoint_url: required (the base URL of your server)", param="endpoint_url")
    url: BackendURL = await check_backend_url(body.endpoint_url, gateway.config.admin.allow_private_backends)
    existing = _existing(gateway, url.url)  # refuse early, before asking the backend for its models
    if existing is not None:
        check_owner(caller, existing)
    models = _models_of(body) or await discover_models(gateway, url.url, body.api_key)
    status = status_for(gateway, caller, models)
    if request.query.get("check") in ("1", "true"):
        await refuse_unless_conformant(gateway, url.url, models[0], body.api_key)
    fields = given_fields(body)
    async with gateway.registry.lock:  # discovery awaited: check again, and write before anyone else checks
        existing = _existing(gateway, url.url)
        try:
            if existing is not None:  # registering again is idempotent: refresh the registration
                check_owner(caller, existing)
                backend = await gateway.registry.update(existing, {"models": models, **fields})
                if status == PENDING and backend.status != PENDING:
                    await gateway.registry.approve(backend, pending=True)
            else:
                name = fields.pop("name", None)
                backend = await gateway.registry.add(
                    url.url, models, name, owner_key=caller.key_id, status=status, **fields
                )
        except sqlite3.IntegrityError:
            raise _url_taken(url.url) from None
    given = sorted(given_fields(body))
    await record(gateway, caller, "updated" if existing else "registered", backend, fields=given)
    gateway.log.info(
        "backend_registered", registration_id=backend.id, backend=backend.name, models=list(backend.models)
    )
    answer = {"registration_id": backend.id, **backend.public()}
    if url.note:
        answer["warnings"] = [url.note]
        gateway.log.info("backend_url_normalised", registration_id=backend.id, note=url.note)
    if backend.status == PENDING:
        answer.setdefault("warnings", []).append(
            f"pending: it takes no traffic until an admin approves it (POST /admin/register/{backend.id}/approve)"
        )
    return web.json_response(answer, status=200 if existing is not None else 201)


def _registered(gateway: Gateway, registration_id: str, caller: Identity) -> Backend:
    backend = gateway.registry.backends.get(registration_id)
    if backend is None:
        raise GatewayError(404, f"no registration with id '{registration_id}'; GET /admin/servers lists them")
    check_owner(caller, backend)
    if backend.read_only:
        raise GatewayError(
            403, f"backend '{backend.name}' comes from the config file and is read-only; edit gateway.yaml"
        )
    return backend


@allow("host")
async def update(request: web.Request, gateway: Gateway, caller: Identity) -> web.Response:
    backend = _registered(gateway, request.match_info["registration_id"], caller)
    limit_registrations(request, gateway)
    body: Registration = _validated(Registration, await read_object(request))
    changes = given_fields(body)
    url: BackendURL | None = None
    if body.endpoint_url:
        url = await check_backend_url(body.endpoint_url, gateway.config.admin.allow_private_backends)
        changes["url"] = url.url
    models = _models_of(body)
    if models:
        changes["models"] = models
    if not changes:
        raise GatewayError(400, "nothing to update; send any of: " + ", ".join(vars(body)))
    recheck = "url" in changes or "models" in changes  # a host's new address or models: approved again
    status = status_for(gateway, caller, changes.get("models", backend.models)) if recheck else None
    async with gateway.registry.lock:
        other = gateway.registry.by_url(url.url) if url is not None else None
        if url is not None and other is not None and other is not backend:
            raise GatewayError(409, f"{url.url} is already registered as '{other.id}'", param="endpoint_url")
        if backend.id not in gateway.registry.backends:
            raise GatewayError(404, f"registration '{backend.id}' was removed while this update waited")
        try:
            await gateway.registry.update(backend, changes, pending=status == PENDING and backend.status != PENDING)
        except sqlite3.IntegrityError:
            raise _url_taken(changes["url"]) from None
    await record(gateway, caller, "updated", backend, fields=sorted(changes))
    gateway.log.info("backend_updated", registration_id=backend.id, fields=sorted(changes))
    answer = backend.public()
    if url is not None and url.note:
        answer["warnings"] = [url.note]
    return web.json_response(answer)


@allow("host")
async def deregister(request: web.Request, gateway: Gateway, caller: Identity) -> web.Response:
    backend = _registered(gateway, request.match_info["registration_id"], caller)
    await gateway.registry.remove(backend)
    await record(gateway, caller, "removed", backend, owner_key=backend.owner_key)
    gateway.log.info("backend_removed", registration_id=backend.id, backend=backend.name)
    return web.json_response({"registration_id": backend.id, "deleted": True})


@allow("host", "readonly")
async def servers(request: web.Request, gateway: Gateway, caller: Identity) -> web.Response:
    """Every backend; a host key sees only its own; a readonly key sees no addresses or contacts."""
    mine = caller.role == "host"
    full = caller.role in ("admin", "host")
    model = request.query.get("model")
    status = request.query.get("status")
    if status is not None and status not in STATUSES:
        raise GatewayError(400, f"status must be one of {', '.join(STATUSES)}", param="status")
    found = [
        b.public() if full else b.summary()
        for b in gateway.registry.backends.values()
        if (model is None or model in b.models)
        and (status is None or b.status == status)
        and (not mine or b.owner_key == caller.key_id)
    ]
    return web.json_response({"servers": found, "count": len(found)})


@allow("readonly")
async def stats(request: web.Request, gateway: Gateway, caller: Identity) -> web.Response:
    models: dict[str, dict[str, int]] = {}
    by_status = dict.fromkeys(STATUSES, 0)
    for backend in gateway.registry.backends.values():
        by_status[backend.status] = by_status.get(backend.status, 0) + 1
        for model in backend.models:
            counts = models.setdefault(model, dict.fromkeys(STATUSES, 0))
            counts[backend.status] = counts.get(backend.status, 0) + 1
    return web.json_response(
        {
            "uptime_seconds": round(time.time() - gateway.started_at, 1),
            "servers": {"total": len(gateway.registry.backends), **by_status},
            "models": models,
            "requests": {"total": gateway.requests_total, "failed": gateway.requests_failed},
        }
    )


def add_routes(app: web.Application, config: GatewayConfig) -> None:
    app[REGISTRATION_LIMIT] = TokenBuckets(config.admin.registrations_per_minute)
    app.router.add_post("/admin/register", register)
    app.router.add_put("/admin/register/{registration_id}", update)
    app.router.add_delete("/admin/register/{registration_id}", deregister)
    app.router.add_get("/admin/servers", servers)
    app.router.add_get("/admin/stats", stats)
    app.router.add_post("/admin/register/{registration_id}/approve", approve)
    app.router.add_get("/admin/audit", audit_trail)
