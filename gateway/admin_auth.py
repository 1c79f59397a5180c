"""Who may use the admin API: the admin key, roles per route, how a presented key is checked, the rate of registrations.

The config's admin key is a superuser. Any other key is identified through the ``authenticate``
hook (the ``auth`` plugin), and each route says which roles it allows (``@allow("host")``).
"""

from __future__ import annotations

import hmac
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.config import MIN_ADMIN_KEY_LENGTH, ConfigError, GatewayConfig
from gateway.errors import GatewayError
from gateway.handler import authenticate
from gateway.identity import Identity
from gateway.state import GATEWAY, Gateway

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RoleHandler = Callable[[web.Request, Gateway, Identity], Awaitable[web.StreamResponse]]

ADMIN = Identity("admin", "admin", role="admin")
"""Whoever presents the config's admin key."""


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


def limit_registrations(request: web.Request, gateway: Gateway) -> None:
    """429 once the presented admin key has used up its registrations for now."""
    wait = request.app[REGISTRATION_LIMIT].take(presented_key(request) or "")
    if wait:
        per_minute = gateway.config.admin.registrations_per_minute
        raise GatewayError(
            429,
            f"too many registrations: at most {per_minute} a minute per key "
            f"(admin.registrations_per_minute); retry in {wait:.0f} s",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(max(1, round(wait)))},
        )


def presented_key(request: web.Request) -> str | None:
    """The key the caller sent: ``X-API-Key``, else ``Authorization: Bearer`` (as the OpenAI SDK sends it)."""
    given = request.headers.get("X-API-Key")
    if given is None:
        auth = request.headers.get("Authorization", "")
        given = auth[7:] if auth[:7].lower() == "bearer " else None
    return given


def _authorized(request: web.Request, key: str) -> bool:
    given = presented_key(request)
    if given is None:
        return False
    try:  # aiohttp reads header bytes that are not UTF-8 as surrogate escapes: compare those same bytes
        presented = given.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(presented, key.encode())


def allow(*roles: str) -> Callable[[RoleHandler], Handler]:
    """An admin route that the config's admin key and keys with one of ``roles`` (plus ``admin``) may call."""
    allowed = ("admin", *roles)

    def decorate(handler: RoleHandler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            gateway = request.app[GATEWAY]
            try:
                caller = await _caller(request, gateway)
                if caller.role not in allowed:
                    route = request.match_info.route.resource
                    path = route.canonical if route is not None else request.path
                    raise GatewayError(
                        403,
                        f"a key with role '{caller.role}' may not use {request.method} {path}; it needs role "
                        f"{' or '.join(allowed)} (ask the gateway's admin for such a key)",
                        code="insufficient_role",
                    )
                return await handler(request, gateway, caller)
            except GatewayError as exc:
                return exc.to_response()

        guarded.roles = allowed  # type: ignore[attr-defined]
        return guarded

    return decorate


admin_only = allow()


async def _caller(request: web.Request, gateway: Gateway) -> Identity:
    """Who calls the admin API: the admin key, else an identity with a role from the ``authenticate`` hook."""
    if _authorized(request, gateway.admin_key):
        return ADMIN
    identity = await authenticate(gateway, request) if gateway.plugins.authenticate else None
    if isinstance(identity, Identity):
        return identity
    missing = "X-API-Key" not in request.headers and "Authorization" not in request.headers
    reason = "is missing" if missing else "is not valid"
    raise GatewayError(
        401,
        f"the admin key {reason}; send it as 'X-API-Key: <key>' or 'Authorization: Bearer <key>' "
        f"(admin.api_key in the config, or the file {gateway.config.admin_key_path.name} beside the database)",
        code="invalid_admin_key",
    )
