"""The admin API: register, update, list and remove backends; stats. Needs the admin key."""

from __future__ import annotations

import dataclasses
import hmac
import json
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from gateway.config import (
    MIN_ADMIN_KEY_LENGTH,
    ConfigError,
    GatewayConfig,
    ModelProfile,
    _http_url,
)
from gateway.errors import GatewayError
from gateway.netguard import check_backend_url
from gateway.registry import STATUSES, Backend
from gateway.state import GATEWAY, Gateway
from gateway.validate import ValidationError, build, positive

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
    profile: ModelProfile | None = field(default=None, metadata={"doc": "capabilities, tier and cost of its models"})


def resolve_admin_key(config: GatewayConfig, log: Any) -> str:
    """The configured admin key, else the one kept beside the database, else a new one."""
    if config.admin.api_key:
        return config.admin.api_key
    path = config.admin_key_path
    if path.exists():
        key = path.read_text(encoding="utf-8").strip()
        if len(key) < MIN_ADMIN_KEY_LENGTH:
            problem = f"the key in {path} is shorter than {MIN_ADMIN_KEY_LENGTH} characters"
            raise ConfigError([f"admin.api_key: {problem}; delete the file to generate a new one"])
        return key
    key = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(key + "\n")
        handle.flush()
        os.fsync(handle.fileno())  # the key must outlive a crash, like the registrations it guards
    log.warning(
        "admin_key_generated",
        path=str(path),
        how_to_use=f'send it as the X-API-Key header: curl -H "X-API-Key: $(cat {path})" ...',
        note="set admin.api_key in gateway.yaml (or MULTIVERSE_ADMIN_KEY) to choose your own",
    )
    return key


class TokenBuckets:
    """Per-key token buckets: ``per_minute`` actions a minute, bursts up to that many."""

    def __init__(self, per_minute: int) -> None:
        self.rate = per_minute / 60
        self.capacity = float(per_minute)
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """Take a token; return 0 if allowed, else the seconds until one is available."""
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1 - tokens) / self.rate


REGISTRATION_LIMIT = web.AppKey("registration_limit", TokenBuckets)


def _limit_registrations(request: web.Request, gateway: Gateway) -> None:
    wait = request.app[REGISTRATION_LIMIT].take(_presented_key(request) or "")
    if wait:
        per_minute = gateway.config.admin.registrations_per_minute
        raise GatewayError(
            429,
            f"too many registrations: at most {per_minute} a minute per admin key "
            f"(admin.registrations_per_minute); retry in {wait:.0f} s",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(max(1, round(wait)))},
        )


def _presented_key(request: web.Request) -> str | None:
    given = request.headers.get("X-API-Key")
    if given is None:
        auth = request.headers.get("Authorization", "")
        given = auth[7:] if auth[:7].lower() == "bearer " else None
    return given


def _authorized(request: web.Request, key: str) -> bool:
    given = _presented_key(request)
    return given is not None and hmac.compare_digest(given.encode(), key.encode())


def admin_only(handler: Callable[[web.Request, Gateway], Awaitable[web.StreamResponse]]) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        gateway = request.app[GATEWAY]
        if not _authorized(request, gateway.admin_key):
            missing = "X-API-Key" not in request.headers and "Authorization" not in request.headers
            reason = "is missing" if missing else "is not valid"
            return GatewayError(
                401,
                f"the admin key {reason}; send it as 'X-API-Key: <key>' or 'Authorization: Bearer <key>' "
                f"(admin.api_key in the config, or the file {gateway.config.admin_key_path.name} beside the database)",
                code="invalid_admin_key",
            ).to_response()
        try:
            return await handler(request, gateway)
        except GatewayError as exc:
            return exc.to_response()

    return guarded


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError) as exc:
        raise GatewayError(400, f"the request body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise GatewayError(400, "the request body must be a JSON object")
    return data


def _validated(cls: type[Any], data: dict[str, Any]) -> Any:
    try:
        return build(cls, data)
    except ValidationError as exc:
        raise GatewayError(400, "; ".join(exc.problems), param=exc.problems[0].split(":")[0]) from None


def _models_of(body: Registration) -> list[str] | None:
    if body.model_name and body.models:
        raise GatewayError(400, "give either 'model_name' or 'models', not both", param="models")
    return [body.model_name] if body.model_name else body.models


async def discover_models(gateway: Gateway, url: str, api_key: str | None) -> list[str]:
    """Ask a backend which models it serves, through its /v1/models."""
    target = f"{url.rstrip('/')}/v1/models"
    hint = "; pass 'model_name' or 'models' in the registration instead"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    try:
        timeout = aiohttp.ClientTimeout(total=gateway.config.routing.connect_timeout + 5)
        async with gateway.http.get(target, timeout=timeout, allow_redirects=False, headers=headers) as response:
            if response.status != 200:
                raise GatewayError(400, f"could not list models at {target}: HTTP {response.status}{hint}")
            payload = json.loads(await response.read())
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise GatewayError(400, f"could not reach {target} to list its models ({type(exc).__name__}){hint}") from None
    except ValueError:
        raise GatewayError(400, f"{target} did not answer with JSON{hint}") from None
    entries = payload.get("data") if isinstance(payload, dict) else None
    models = [e["id"] for e in entries or [] if isinstance(e, dict) and isinstance(e.get("id"), str)]
    if not models:
        raise GatewayError(400, f"{target} lists no models{hint}")
    return models


def _given_fields(body: Registration) -> dict[str, Any]:
    """The registration's optional fields that were given, by registry field name."""
    skip = ("endpoint_url", "model_name", "models")
    given = {k: v for k, v in vars(body).items() if v is not None and k not in skip}
    if "profile" in given:
        given["profile"] = dataclasses.asdict(given["profile"])
    return given


@admin_only
async def register(request: web.Request, gateway: Gateway) -> web.Response:
    _limit_registrations(request, gateway)
    body: Registration = _validated(Registration, await _body(request))
    if body.endpoint_url is None:
        raise GatewayError(400, "endpoint_url: required (the base URL of your server)", param="endpoint_url")
    await check_backend_url(body.endpoint_url, gateway.config.admin.allow_private_backends)
    existing = gateway.registry.by_url(body.endpoint_url)
    if existing is not None and existing.read_only:
        raise GatewayError(409, f"{body.endpoint_url} is already configured in gateway.yaml as '{existing.name}'")
    limit = gateway.config.admin.max_backends
    if existing is None and sum(b.source == "api" for b in gateway.registry.backends.values()) >= limit:
        raise GatewayError(
            409, f"the gateway already holds {limit} registered backends (admin.max_backends); remove one first"
        )
    models = _models_of(body) or await discover_models(gateway, body.endpoint_url, body.api_key)
    fields = _given_fields(body)
    if existing is not None:  # registering again is idempotent: refresh the registration
        backend = await gateway.registry.update(existing, {"models": models, **fields})
        status = 200
    else:
        name = fields.pop("name", None)
        backend = await gateway.registry.add(body.endpoint_url, models, name, **fields)
        status = 201
    gateway.log.info(
        "backend_registered", registration_id=backend.id, backend=backend.name, models=list(backend.models)
    )
    return web.json_response({"registration_id": backend.id, **backend.public()}, status=status)


def _registered(gateway: Gateway, registration_id: str) -> Backend:
    backend = gateway.registry.backends.get(registration_id)
    if backend is None:
        raise GatewayError(404, f"no registration with id '{registration_id}'; GET /admin/servers lists them")
    if backend.read_only:
        raise GatewayError(
            403, f"backend '{backend.name}' comes from the config file and is read-only; edit gateway.yaml"
        )
    return backend


@admin_only
async def update(request: web.Request, gateway: Gateway) -> web.Response:
    backend = _registered(gateway, request.match_info["registration_id"])
    _limit_registrations(request, gateway)
    body: Registration = _validated(Registration, await _body(request))
    changes = _given_fields(body)
    if body.endpoint_url:
        await check_backend_url(body.endpoint_url, gateway.config.admin.allow_private_backends)
        other = gateway.registry.by_url(body.endpoint_url)
        if other is not None and other is not backend:
            raise GatewayError(409, f"{body.endpoint_url} is already registered as '{other.id}'")
        changes["url"] = body.endpoint_url
    models = _models_of(body)
    if models:
        changes["models"] = models
    if not changes:
        raise GatewayError(400, "nothing to update; send any of: " + ", ".join(vars(body)))
    await gateway.registry.update(backend, changes)
    gateway.log.info("backend_updated", registration_id=backend.id, fields=sorted(changes))
    return web.json_response(backend.public())


@admin_only
async def deregister(request: web.Request, gateway: Gateway) -> web.Response:
    backend = _registered(gateway, request.match_info["registration_id"])
    await gateway.registry.remove(backend)
    gateway.log.info("backend_removed", registration_id=backend.id, backend=backend.name)
    return web.json_response({"registration_id": backend.id, "deleted": True})


@admin_only
async def servers(request: web.Request, gateway: Gateway) -> web.Response:
    model = request.query.get("model")
    status = request.query.get("status")
    if status is not None and status not in STATUSES:
        raise GatewayError(400, f"status must be one of {', '.join(STATUSES)}", param="status")
    found = [
        b.public()
        for b in gateway.registry.backends.values()
        if (model is None or model in b.models) and (status is None or b.status == status)
    ]
    return web.json_response({"servers": found, "count": len(found)})


@admin_only
async def stats(request: web.Request, gateway: Gateway) -> web.Response:
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
